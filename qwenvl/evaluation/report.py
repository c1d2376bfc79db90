"""What an evaluation leaves behind: report.json (summary and every prediction), the table it prints, and PNGs of
box answers with the question above the picture, the reference box and the model's."""
from __future__ import annotations

import json
import os
import re

from PIL import Image

from ..drawing import draw_boxes
from ..processing import parse_grounding
from . import scoring

METRIC_NAMES = {"grounding": "acc@IoU>=0.5", "grounded_caption": "exact text + boxes@0.5", "vqa": "exact match",
                "caption": "exact match", "ocr": "exact match"}


def table(summary: dict) -> str:
    lines = [f"{'task':<18}{'metric':<24}{'n':>5}{'model':>9}{'baseline':>10}{'mean IoU':>10}"]
    for kind, row in summary.items():
        iou = f"{row['mean_iou']:.3f}" if "mean_iou" in row else "-"
        lines.append(f"{kind:<18}{METRIC_NAMES.get(kind, 'exact match'):<24}{row['n']:>5}{row['accuracy']:>9.3f}"
                     f"{row['baseline_accuracy']:>10.3f}{iou:>10}")
    return "\n".join(lines)


def draw(results: list[dict], source, out_dir: str, n: int = 6, size: int = 448) -> list[str]:
    """PNGs of the first n box-answer results: the question on top, the reference box and the predicted one on the
    picture scaled up to be seen."""
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
        pred_boxes = scoring.boxes_of(r["prediction"])
        pred = [{"ref": "model" + (" (hit)" if r["correct"] else " (miss)"), "boxes": pred_boxes}] if pred_boxes else []
        path = os.path.join(out_dir, f"boxes_{len(written):02d}_{_safe(r['id'])}.png")
        draw_boxes(img, ref + pred, path, title=f"Q: {r['question'] or '(caption)'}   A: {r['prediction'] or '-'}")
        written.append(path)
    return written


def _safe(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:60]


def write(results: list[dict], out_dir: str, extra: dict | None = None) -> dict:
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
