"""Greedy answers of evaluation records: prompts (the training example's ids up to the last reply) batched with
left padding through `model.generate`, each answer scored per task kind beside the baseline's answer."""
from __future__ import annotations

import math
import re

import torch

from ..processing import load_image
from ..train.formatting import prompt
from . import scoring

_PICTURE = re.compile(r"Picture \d+: <img>.*?</img>\n?", re.DOTALL)


def question_of(record: dict) -> str:
    """The last user turn without its image tags: the key of the most-common-answer baseline."""
    if "caption" in record:
        return ""
    users = [t["value"] for t in record["conversations"] if t.get("from") in ("user", "human")]
    return _PICTURE.sub("", users[-1]).strip() if users else ""


def items(source, indices, tokenizer, style: str, system: str) -> list[dict]:
    out = []
    for i in indices:
        record = source.record(i)
        ids, reference = prompt(record, tokenizer, style, system, index=i)
        out.append({"index": i, "id": record.get("id", f"#{i}"), "prompt_ids": ids, "reference": reference,
                    "kind": scoring.infer_kind(record, reference), "question": question_of(record)})
    return out


def _stops(tokenizer):
    return [tokenizer.im_end_id, tokenizer.eod_id]


def _decode_new(tokenizer, row: list[int]) -> str:
    stops = set(_stops(tokenizer))
    for k, t in enumerate(row):
        if t in stops:
            row = row[:k]
            break
    return tokenizer.decode(row)


@torch.no_grad()
def generate_answers(model, tokenizer, source, batch: list[dict], image_size: int, max_new_tokens: int) -> list[str]:
    ids, mask = tokenizer.pad_rows([b["prompt_ids"] for b in batch], padding_side="left")
    pixels = [load_image(im, image_size) for b in batch for im in source.images(b["index"])]
    px = torch.stack(pixels).to(model.device) if pixels else None
    # vocab_size: a model whose embedding is wider than the tokenizer (tiny: 512 vs 303 ids) never emits those ids
    out = model.generate(ids.to(model.device), pixel_values=px, attention_mask=mask.to(model.device),
                         max_new_tokens=max_new_tokens, eos_token_id=_stops(tokenizer), pad_token_id=tokenizer.eod_id,
                         vocab_size=tokenizer.vocab_size)
    return [_decode_new(tokenizer, row[ids.shape[1]:].tolist()) for row in out]


def run(model, tokenizer, source, indices, *, style: str, system: str, image_size: int, baseline: scoring.Baseline,
        batch_size: int = 32, max_new_tokens: int = 0, progress: bool = True) -> list[dict]:
    """Greedy answers for the records `indices` of `source`, each scored, with the baseline's answer scored too."""
    model.eval()
    todo = items(source, indices, tokenizer, style, system)
    by_kind: dict[str, list] = {}
    for it in todo:
        by_kind.setdefault(it["kind"], []).append(it)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="eval", dynamic_ncols=True, mininterval=0.5)
    for kind, group in by_kind.items():
        # enough room for the longest reference of this kind, and then some: a budget, never a hint
        longest = max(len(tokenizer.encode(g["reference"])) for g in group)
        budget = max_new_tokens or int(math.ceil(1.5 * longest)) + 4
        for k in range(0, len(group), batch_size):
            chunk = group[k:k + batch_size]
            for it, answer in zip(chunk, generate_answers(model, tokenizer, source, chunk, image_size, budget)):
                it["prediction"] = answer
                it.update(scoring.score(kind, answer, it["reference"]))
                it["baseline"] = baseline.answer(kind, it["question"])
                b = scoring.score(kind, it["baseline"], it["reference"])
                it["baseline_correct"] = b["correct"]
                if "iou" in b:
                    it["baseline_iou"] = b["iou"]
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return todo
