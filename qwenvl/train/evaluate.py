"""Evaluation by greedy decoding: prompts batched with left padding through `model.generate`, answers scored per
task kind beside a baseline measured in the same run, and a few images drawn with the predicted boxes."""
from __future__ import annotations

import json
import math
import os
import re

import torch
from PIL import Image

from ..processing import draw_boxes, load_image, parse_grounding
from . import scoring
from .formatting import prompt

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
        text, reference = prompt(record, tokenizer, style, system, index=i)
        out.append({"index": i, "id": record.get("id", f"#{i}"), "prompt": text, "reference": reference,
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
    # a model whose embedding is wider than the tokenizer (tiny: 512 vs 303 ids) can emit ids that name no token;
    # they cannot be part of a right answer, so they are dropped rather than failing the whole evaluation
    return tokenizer.decode([t for t in row if t < tokenizer.vocab_size])


@torch.no_grad()
def generate_answers(model, tokenizer, source, batch: list[dict], image_size: int, max_new_tokens: int) -> list[str]:
    ids, mask = tokenizer.batch_encode([b["prompt"] for b in batch], padding_side="left")
    pixels = [load_image(im, image_size) for b in batch for im in source.images(b["index"])]
    px = torch.stack(pixels).to(model.device) if pixels else None
    out = model.generate(ids.to(model.device), pixel_values=px, attention_mask=mask.to(model.device),
                         max_new_tokens=max_new_tokens, eos_token_id=_stops(tokenizer), pad_token_id=tokenizer.eod_id)
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


def draw(results: list[dict], source, out_dir: str, n: int = 6, size: int = 448) -> list[str]:
    """PNGs of the first n box-answer results: the reference box and the predicted one, scaled up to be seen."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    boxed = [r for r in results if r["kind"] == "grounding"] + [r for r in results if r["kind"] == "grounded_caption"]
    for r in boxed[:n]:
        images = source.images(r["index"])
        if not images:
            continue
        img = images[0] if isinstance(images[0], Image.Image) else Image.open(images[0])
        img = img.convert("RGB").resize((size, size), Image.NEAREST)
        ref = [{"ref": "reference", "boxes": [b for e in parse_grounding(r["reference"], strict=False)
                                              for b in e["boxes"]]}]
        pred_boxes = scoring._boxes(r["prediction"])
        pred = [{"ref": "model" + (" (hit)" if r["correct"] else " (miss)"), "boxes": pred_boxes}] if pred_boxes else []
        path = os.path.join(out_dir, f"boxes_{len(written):02d}_{_safe(r['id'])}.png")
        draw_boxes(img, ref + pred, path)
        written.append(path)
    return written


def _safe(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:60]


def report(results: list[dict], out_dir: str, extra: dict | None = None) -> dict:
    """Write report.json (summary + every prediction) and return the summary."""
    summary = scoring.summarize(results)
    os.makedirs(out_dir, exist_ok=True)
    doc = {"summary": summary, **(extra or {}), "predictions": [
        {k: r[k] for k in ("id", "kind", "question", "reference", "prediction", "correct", "baseline",
                           "baseline_correct") if k in r} | ({"iou": r["iou"]} if "iou" in r else {})
        for r in results]}
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    return summary
