"""Examples, batch plans and collation: what each rank feeds the model at each step, decided ahead of time.

The order of micro-batches is a pure function of (seed, sizes), computed before training from token lengths alone
(no image is touched), so a resumed run can skip exactly the micro-batches it has already trained on. Lengths are
bucketed (a pool of global batches is sorted by length before it is cut) or packed (sequences concatenated into one
row up to a token budget, trained through the model's cu_seqlens path) so that little compute goes to padding.

A global step holds `batch_size * grad_accum * world` examples; it is split into `grad_accum * world` micro-batches
of neighbouring lengths, micro-batch m going to rank m % world. The same global batch is therefore seen whatever the
split between ranks and accumulation steps, which is what makes those runs comparable. A bucketing pool never holds
a record twice (it is capped to the data set and skips a record's next-epoch copy), so a step never trains on two
copies of one record, however small the data set.
"""
from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass, field

import torch

from ..inputs import IGNORE_INDEX, next_token_targets
from ..processing import load_image
from .formatting import MalformedRecord, encode, record_id

log = logging.getLogger("qwenvl.train")


class Examples:
    """Records of a source as (ids, labels) and pixels; malformed records are refused or skipped (`bad`)."""

    def __init__(self, source, tokenizer, style: str, system: str, image_size: int, max_len: int,
                 bad: str = "error", validate: bool = True):
        if bad not in ("error", "skip"):
            raise ValueError(f"bad must be 'error' or 'skip', got {bad!r}")
        self.source, self.tokenizer, self.style, self.system = source, tokenizer, style, system
        self.image_size, self.max_len, self.bad = image_size, max_len, bad
        self._lengths: dict[int, int] = {}
        self.skipped: list[tuple] = []
        self.valid = None
        if validate:
            self._validate()

    def _validate(self) -> None:
        """Encode every record once: report each malformed one by id, then refuse or drop them all."""
        valid, problems = [], []
        for i in range(len(self.source)):
            try:
                self._lengths[i] = len(self.encode(i)[0])
                self.source.check_images(i)
                valid.append(i)
            except MalformedRecord as e:
                problems.append((e.record_id, e.reason))
        if problems:
            listing = "; ".join(f"{rid}: {reason}" for rid, reason in problems[:20])
            more = f"; ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            if self.bad == "error":
                raise MalformedRecord(
                    problems[0][0],
                    f"{len(problems)} malformed record(s) of {len(self.source)}: {listing}{more} (fix them, or pass "
                    f"--bad-records skip to train without them)",
                )
            for rid, reason in problems:
                log.warning("skipping malformed record %s: %s", rid, reason)
            self.skipped += problems
        if not valid:
            raise ValueError("no trainable record left after skipping the malformed ones")
        self.valid = valid

    def __len__(self) -> int:
        return len(self.valid) if self.valid is not None else len(self.source)

    def index(self, k: int) -> int:
        """The source index of the k-th trainable record."""
        return self.valid[k] if self.valid is not None else k

    def encode(self, i: int) -> tuple[list[int], list[int]]:
        return encode(self.source.record(i), self.tokenizer, self.style, self.system, self.max_len, index=i)

    def length(self, i: int) -> int:
        n = self._lengths.get(i)
        if n is None:
            try:
                n = len(self.encode(i)[0])
            except MalformedRecord:
                if self.bad == "error":
                    raise
                n = 0  # planned anyway: loading it reports and drops it
            self._lengths[i] = n
        return n

    def load(self, i: int):
        """(ids, labels, pixels [n, 3, S, S], id), or a MalformedRecord to report (skip mode) - run in workers."""
        rid = record_id(self.source.record(i), i)
        try:
            ids, labels = self.encode(i)
            images = self.source.images(i)
            n_spans = sum(1 for t in ids if t == self.tokenizer.img_start_id)
            if n_spans != len(images):
                raise MalformedRecord(rid, f"{n_spans} <img> span(s) but {len(images)} image(s)")
            try:
                pixels = [load_image(im, self.image_size) for im in images]
            except (OSError, ValueError) as e:
                raise MalformedRecord(rid, f"cannot load its image: {e}") from None
        except MalformedRecord as e:
            if self.bad == "error":
                raise
            return e
        px = torch.stack(pixels) if pixels else torch.empty(0, 3, self.image_size, self.image_size)
        return ids, labels, px, rid


# --- batch plans ---------------------------------------------------------------------------------------------
@dataclass
class PlanSpec:
    batch_size: int          # examples per micro-batch (padding mode)
    grad_accum: int = 1
    world: int = 1
    seed: int = 0
    pool: int = 8            # global batches sorted together for bucketing (1 = no bucketing)
    pack_tokens: int = 0     # > 0: pack sequences into rows of at most this many tokens instead of padding
    shuffle: bool = True     # shuffle record order per epoch (file data; the synthetic stream is random already)

    @property
    def micro_per_step(self) -> int:
        return self.grad_accum * self.world


def _order(n: int, spec: PlanSpec):
    """Endless stream of example positions 0..n-1: epoch after epoch, each shuffled with (seed, epoch)."""
    for epoch in itertools.count():
        if not spec.shuffle:  # lazily: the synthetic set is practically endless
            yield from range(n)
            continue
        idx = list(range(n))
        random.Random(f"qwenvl-order/{spec.seed}/{epoch}").shuffle(idx)
        yield from idx


def check_plan(n_records: int, spec: PlanSpec) -> None:
    """Refuse a data set that cannot fill one global step with distinct records."""
    _pool_size(n_records, spec)


def _pool_size(n_records: int, spec: PlanSpec) -> int:
    """Examples drawn per pool: `pool` global batches' worth, but never more distinct records than there are."""
    if spec.pack_tokens:
        # enough examples to fill the pool's rows on average
        want = spec.pool * spec.micro_per_step * max(1, spec.pack_tokens // 64)
        return max(1, min(want, n_records))
    step = spec.micro_per_step * spec.batch_size
    if n_records < step:
        raise ValueError(
            f"the data set has {n_records} trainable record(s), fewer than one global batch of {step} (batch size "
            f"{spec.batch_size} x {spec.grad_accum} accumulation step(s) x {spec.world} rank(s)): a step would hold "
            f"copies of one record; lower --batch-size or --grad-accum"
        )
    return step * max(1, min(spec.pool, n_records // step))


def _draw_pool(stream, carry: list, size: int) -> tuple[list, list]:
    """(pool, deferred): `size` distinct records, the carried ones first; a record already in the pool (its copy
    from the next epoch) is deferred to the next pool instead."""
    pool, seen, deferred = [], set(), []
    for i in itertools.chain(carry, stream):
        if i in seen:
            deferred.append(i)
        else:
            pool.append(i)
            seen.add(i)
        if len(pool) == size:
            return pool, deferred
    return pool, deferred


def _global_steps(examples: Examples, spec: PlanSpec):
    """Endless stream of global steps, each a list of micro_per_step micro-batches (lists of source indices)."""
    stream = (examples.index(k) for k in _order(len(examples), spec))
    n_micro = spec.micro_per_step
    size = _pool_size(len(examples), spec)
    carry: list[int] = []
    for pool_no in itertools.count():
        pool, carry = _draw_pool(stream, carry, size)
        pool.sort(key=examples.length)  # stable: equal lengths keep the stream's order
        if spec.pack_tokens:
            rows = _pack(pool, examples.length, spec.pack_tokens)
            # the last row is rarely full, and rows short of a whole step cannot be used yet: both go back into
            # the next pool, so no example is lost and no step trains on a half-empty row
            usable = (len(rows) - 1) // n_micro * n_micro
            carry = [i for row in rows[usable:] for i in row] + carry
            micro = rows[:usable]
        else:
            micro = [pool[k:k + spec.batch_size] for k in range(0, len(pool), spec.batch_size)]
        steps = [micro[k:k + n_micro] for k in range(0, len(micro), n_micro)]
        # sorted pools would otherwise run short-to-long inside every pool: shuffle whole steps, not examples
        random.Random(f"qwenvl-steps/{spec.seed}/{pool_no}").shuffle(steps)
        yield from steps


def _pack(indices, length, budget):
    rows, row, used = [], [], 0
    for i in indices:
        n = length(i)
        if n > budget:
            raise ValueError(f"an example of {n} tokens does not fit the packing budget of {budget} tokens")
        if used + n > budget:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def plan(examples: Examples, spec: PlanSpec, steps: int, rank: int = 0) -> list[list[int]]:
    """This rank's micro-batches for `steps` optimizer steps: steps * grad_accum lists of source indices."""
    if not 0 <= rank < spec.world:
        raise ValueError(f"rank {rank} is outside 0..{spec.world - 1}")
    out = []
    for step in itertools.islice(_global_steps(examples, spec), steps):
        out += [step[m] for m in range(rank, len(step), spec.world)]
    return out


# --- collation -----------------------------------------------------------------------------------------------
def count_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> int:
    """Target tokens the model's loss averages over (the model's own shift rule, `next_token_targets`)."""
    return int((next_token_targets(labels, cu_seqlens) != IGNORE_INDEX).sum())


@dataclass
class Batch:
    """One micro-batch, collated: model inputs, the counts the loss weighting needs, and what was skipped."""

    input_ids: torch.Tensor | None          # [B, T] right-padded, or [1, total] packed; None: every record dropped
    labels: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None   # packed rows only
    n_targets: int = 0
    n_tokens: int = 0
    ids: list = field(default_factory=list)       # record ids, for messages
    skipped: list = field(default_factory=list)   # (record id, reason) of malformed records dropped (skip mode)

    @property
    def empty(self) -> bool:
        return self.input_ids is None

    def model_inputs(self, device) -> dict:
        kw = {"input_ids": self.input_ids.to(device), "labels": self.labels.to(device)}
        if self.pixel_values is not None:
            kw["pixel_values"] = self.pixel_values.to(device)
        if self.cu_seqlens is not None:
            kw["cu_seqlens"] = self.cu_seqlens.to(device)
        return kw


def collate(items, pad_id: int, image_size: int, pack: bool = False) -> Batch:
    """Loaded examples -> a Batch. Padding: right-padded rows (causal attention makes a mask unnecessary).
    Packing: one row with `cu_seqlens`, each example's first label ignored so nothing crosses a boundary."""
    skipped = [(e.record_id, e.reason) for e in items if isinstance(e, MalformedRecord)]
    items = [e for e in items if not isinstance(e, MalformedRecord)]
    if not items:
        return Batch(input_ids=None, skipped=skipped)
    pixels = [e[2] for e in items]
    px = torch.cat(pixels) if any(p.shape[0] for p in pixels) else None
    cu = None
    if pack:
        ids = torch.tensor([t for e in items for t in e[0]], dtype=torch.long)[None]
        labels = torch.tensor([t for e in items for t in e[1]], dtype=torch.long)[None]
        lengths = torch.tensor([len(e[0]) for e in items], dtype=torch.int32)
        cu = torch.zeros(len(items) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
    else:
        T = max(len(e[0]) for e in items)
        ids = torch.full((len(items), T), pad_id, dtype=torch.long)
        labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
        for r, e in enumerate(items):
            ids[r, :len(e[0])] = torch.tensor(e[0], dtype=torch.long)
            labels[r, :len(e[1])] = torch.tensor(e[1], dtype=torch.long)
    return Batch(input_ids=ids, labels=labels, pixel_values=px, cu_seqlens=cu, n_targets=count_targets(labels, cu),
                 n_tokens=sum(len(e[0]) for e in items), ids=[e[3] for e in items], skipped=skipped)


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch j of a plan, loaded and collated (in a DataLoader worker when there are workers)."""

    def __init__(self, examples: Examples, micro: list[list[int]], pack: bool):
        self.examples, self.micro, self.pack = examples, micro, pack

    def __len__(self) -> int:
        return len(self.micro)

    def __getitem__(self, j: int) -> Batch:
        items = [self.examples.load(i) for i in self.micro[j]]
        return collate(items, self.examples.tokenizer.eod_id, self.examples.image_size, self.pack)


def _identity(x):
    return x


def loader(examples: Examples, micro: list[list[int]], start: int = 0, workers: int = 1, pack: bool = False):
    """A DataLoader over micro-batches start.. of a plan; images are drawn or read in `workers` processes."""
    ds = MicroBatches(examples, micro, pack)
    kw = dict(num_workers=workers, prefetch_factor=4, persistent_workers=False) if workers > 0 else {}
    return torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(start, len(micro)), collate_fn=_identity,
                                       **kw)
