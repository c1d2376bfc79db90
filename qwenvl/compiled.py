"""A compiled one-token decode step over a static-shape KV cache: `generate(..., compile=True)`.

Eager decoding changes shapes at every step (the cache's valid length is a Python int, the decoder slices by it),
which torch.compile would answer with a recompile per step. Here every tensor the step reads has a shape fixed for
the whole generation, and nothing the graph depends on is a host value that changes between steps:
- the KV cache has a fixed capacity, the prompt plus max_new_tokens rounded up to a bucket (`capacity_bucket`), and
  is allocated once per (batch, capacity, dtype, device) and reused by later generations of the same bucket;
- the write position is a device tensor: a step writes its keys and values there (index_put) and attention masks
  the unwritten tail (the Triton decode kernel reads the per-row lengths on the device; the torch path masks a
  full-capacity SDPA), so the step compiles once for a whole generation, and not again for the next one;
- the rotary tables are laid out once per generation as one `[batch * capacity, rotary_dim / 2]` block (row b's
  NTK factor at offset b * capacity), so the step only computes where each row reads them.
The prefill stays eager (its length varies from prompt to prompt, and the images are spliced there) and writes the
prompt's keys and values into the same buffers. A caller's KVCache (a chat's earlier turns) is copied in before the
prefill and the grown cache copied back when the generation ends, so the caller's cache sees what eager decoding
would have left in it.
On CUDA the step is compiled with mode="reduce-overhead" (CUDA graphs: the buffers are marked static, so a replay
reads them in place and launches nothing from the host); elsewhere with inductor, or with the backend named
(`generate(..., compile="aot_eager")`). Each (batch, capacity) is one compilation of the one step function, so
torch._dynamo's recompile limit (8) bounds how many such shapes a process compiles before falling back to eager.
"""
from __future__ import annotations

import logging
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F

from qwenvl_kernels import UnsupportedInput, get_backend, reference

from .cache import KVCache
from .config import MAX_CONTEXT
from .text import RotaryInputs, logn_scale

log = logging.getLogger("qwenvl")

BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


def check_compile(compile, device) -> str | None:
    """The torch.compile backend `generate(compile=...)` asks for on `device` (None: eager), checked before any
    heavy step."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "inductor"
    if not isinstance(compile, str) or compile not in BACKENDS:
        raise ValueError(f"compile must be True, False or a torch.compile backend name ({', '.join(BACKENDS)}); "
                         f"got {compile!r}")
    if compile == "cudagraphs" and torch.device(device).type != "cuda":
        raise ValueError(f"compile='cudagraphs' needs the model on a CUDA device, it is on {device}")
    return compile


def capacity_bucket(tokens: int) -> int:
    """The cache capacity for `tokens` (prompt + new): a power of two from 64 up to 1024, then a multiple of 1024,
    so generations of similar lengths share one compiled step (capacity is a shape) at most twice the memory."""
    bucket = max(64, 1 << (tokens - 1).bit_length()) if tokens <= 1024 else -(-tokens // 1024) * 1024
    return min(bucket, max(tokens, MAX_CONTEXT))


def masked_decode_attention(q, k_cache, v_cache, cache_seqlens, cache_starts):
    """`decode_attention` for one new token per row over the whole cache: keys outside `cache_starts[b] <= j <
    cache_seqlens[b]` are masked instead of sliced away (the reference slices per row, which reads the lengths on
    the host). The unwritten tail must hold finite values (the static cache starts zeroed): weight 0 times NaN is
    NaN."""
    S = k_cache.shape[1]
    j = torch.arange(S, device=q.device)
    visible = (j >= cache_starts[:, None]) & (j < cache_seqlens[:, None])
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         attn_mask=bias[:, None, None, :])
    return out.transpose(1, 2)


def _decode_attention_for(kernels, probe):
    """The decode attention the static step calls: the backend's kernel when it takes the lengths on the device and
    serves these shapes (tried once, eagerly, on `probe`, so a refusal comes before the prefill), else the masked
    torch version. kernels="triton" never falls back silently: what its kernel refuses is an error here."""
    if kernels.name == "torch" or kernels.decode_attention is reference.decode_attention:
        return masked_decode_attention
    kernel = get_backend("triton").decode_attention if kernels.name == "auto" else kernels.decode_attention
    try:
        with torch.no_grad():
            kernel(*probe)
    except UnsupportedInput as e:
        if kernels.name != "auto":
            raise ValueError(f"generate(compile=...) with kernels={kernels.name!r}: the decode kernel cannot serve "
                             f"this cache: {e}") from e
        log.warning("generate(compile=...): the decode kernel cannot serve this cache (%s); masked torch attention", e)
        return masked_decode_attention
    return kernel


class StaticDecoder:
    """Everything a compiled decode step reads, at fixed shapes and fixed addresses, for one (batch, capacity).

    To the decoder layers it is the cache (`empty`, `write`, `attend`, as `KVCache`): it writes at `position` and
    attends through the lengths `position + 1`. `cache` is the eager `KVCache` over the same buffers that the prefill
    fills. `compiles` counts the graphs torch.compile built for this decoder's steps.
    """

    empty = False  # the prefill went through `cache`; every step here decodes

    def __init__(self, model, batch: int, capacity: int, backend: str):
        cfg = model.config.text
        device, dtype = model.device, model.dtype
        self.capacity = capacity
        self.cache = KVCache(cfg.num_hidden_layers, batch, capacity, cfg.num_attention_heads, cfg.kv_channels, dtype,
                             device)
        self.k, self.v = self.cache.k, self.cache.v
        for t in self.k + self.v:
            t.zero_()  # finite everywhere: the masked attention multiplies the unwritten tail by weight 0
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.lengths = torch.ones(batch, dtype=torch.int32, device=device)
        self.seq_start = torch.zeros(batch, dtype=torch.int32, device=device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        half = model.transformer.rotary_emb.dim // 2
        self.cos = torch.zeros(batch * capacity, half, device=device)
        self.sin = torch.zeros(batch * capacity, half, device=device)
        self.row_offset = (torch.arange(batch, device=device) * capacity)[:, None]
        self.logn = False
        probe = (torch.zeros(batch, 1, cfg.num_attention_heads, cfg.kv_channels, dtype=dtype, device=device),
                 self.k[0], self.v[0], self.lengths, self.seq_start)
        self._attention = _decode_attention_for(model.kernels, probe)
        for t in self.k + self.v + [self.position, self.lengths, self.seq_start, self.ids, self.cos, self.sin,
                                    self.row_offset]:
            torch._dynamo.mark_static_address(t)  # CUDA graphs read them in place instead of copying them in
        self.cuda_graphs = device.type == "cuda" and backend == "inductor"
        options = {"mode": "reduce-overhead"} if self.cuda_graphs else {}
        self._step = torch.compile(_decode_step, backend=backend, fullgraph=True, dynamic=False, **options)
        self.compiles = 0

    # --- the cache interface of the decoder layers (inside the compiled step) ---------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][:, self.position] = k
        self.v[layer][:, self.position] = v

    def attend(self, kernels, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self._attention(q, self.k[layer], self.v[layer], self.lengths, self.seq_start)

    # --- eager: before the prefill, after it, each step ---------------------------------------------------------------
    def start(self, cache: KVCache | None = None) -> KVCache:
        """The cache for the prefill, on this decoder's buffers: emptied, or holding what `cache` holds (a chat's
        earlier turns). The tail beyond the prompt is masked."""
        self.cache.reset()
        if cache is not None:
            self.cache.load(cache)
        return self.cache

    def prefilled(self, model) -> None:
        """Take over the prefilled cache: the write position, each row's padding and the rotary tables of its NTK
        factor (fixed at prefill), and whether log-n scaling can apply (as eager: inference, past the trained
        length; below it the scale is exactly 1, so applying it at every step changes nothing)."""
        cfg, cap = model.config.text, self.capacity
        self.position.fill_(self.cache.length)
        self.lengths.fill_(self.cache.length + 1)
        self.seq_start.copy_(self.cache.seq_start)
        rotary = model.transformer.rotary_emb
        for b, alpha in enumerate(self.cache.ntk_alphas):
            cos, sin = rotary.tables(cap, alpha, self.cos.device)
            self.cos[b * cap:(b + 1) * cap] = cos[:cap]
            self.sin[b * cap:(b + 1) * cap] = sin[:cap]
        self.logn = bool(cfg.use_logn_attn and not model.training and cap > cfg.seq_length)

    def step(self, model, ids: torch.Tensor) -> torch.Tensor:
        """Logits `[B, vocab]` of the next token after `ids [B]`, written at the current position."""
        if self.cache.length >= self.capacity:  # the host's copy of the position: no sync
            raise RuntimeError(f"the static KV cache is full ({self.capacity} tokens)")
        self.ids.copy_(ids[:, None])
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self._step(model, self)
        self.compiles += torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
        self.position += 1
        self.lengths += 1
        self.cache.length += 1
        # a CUDA graph's output is overwritten by its next replay: the caller gets its own copy
        return logits.clone() if self.cuda_graphs else logits


def _decode_step(model, state: StaticDecoder) -> torch.Tensor:
    """One token per row through the decoder over the static cache (compiled): embedding, rotary inputs of the
    position (counted from each row's first real token, as the eager decode), the blocks, the final norm, the head."""
    h = model.transformer.wte(state.ids)
    positions = (state.position - state.seq_start).clamp(min=0)[:, None]
    logn = logn_scale(positions, model.config.text.seq_length)[:, :, None, None] if state.logn else None
    rope = RotaryInputs(state.cos, state.sin, positions + state.row_offset, logn)
    h = model.transformer(h, rope, state, state.seq_start)
    return model.lm_head(h[:, -1])


# per model, its most recently used decoders: each holds a KV cache of its capacity, so they are not kept forever
# (a dropped one costs an allocation when it comes back, not a compilation: the graph does not depend on the buffers)
MAX_DECODERS = 4
_decoders: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def static_decoder(model, batch: int, tokens: int, backend: str) -> StaticDecoder:
    """The model's compiled decoder for `batch` rows and `tokens` (prompt + new) of the same capacity bucket, built
    on first use and kept with the model (its buffers and its compiled step are reused)."""
    key = (batch, capacity_bucket(tokens), model.dtype, model.device, backend, model.kernels.name)
    decoders = _decoders.setdefault(model, OrderedDict())
    if key in decoders:
        decoders.move_to_end(key)
    else:
        decoders[key] = StaticDecoder(model, batch, key[1], backend)
        while len(decoders) > MAX_DECODERS:
            decoders.popitem(last=False)
    return decoders[key]


def clear(model) -> None:
    """Drop the model's compiled decoders and their caches (their memory returns on the next collection)."""
    _decoders.pop(model, None)
