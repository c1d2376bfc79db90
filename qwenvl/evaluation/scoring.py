"""Scoring predictions against references: grounding at IoU >= 0.5, exact match for the other task kinds, and the
trivial baselines (the mean box, the most common answer) that every result is compared with."""
from __future__ import annotations

import re
from collections import Counter

from ..processing import box_iou, parse_grounding

IOU_THRESHOLD = 0.5
_TAGS = re.compile(r"<ref>|</ref>|<box>.*?</box>", re.DOTALL)


def normalize(text: str) -> str:
    """Exact match up to case, surrounding and repeated whitespace, and a final full stop."""
    text = " ".join(text.strip().lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def infer_kind(record: dict, reference: str) -> str:
    """The task kind of an evaluation record: its own "kind", else grounding when the answer is boxes only."""
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind:
        return kind
    if "<box>" in reference:
        rest = _TAGS.sub("", re.sub(r"<ref>.*?</ref>", "", reference)).strip()
        return "grounding" if not rest else "grounded_caption"
    return "vqa"


def boxes_of(text: str) -> list[tuple]:
    """Boxes of a (possibly malformed) model answer; corners put in order so that a swapped box still scores."""
    out = []
    for entry in parse_grounding(text, strict=False):
        for x1, y1, x2, y2 in entry["boxes"]:
            out.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return out


def score_grounding(prediction: str, reference: str) -> tuple[bool, float]:
    """(hit, IoU) of the first predicted box against the first reference box."""
    ref = boxes_of(reference)
    if not ref:
        raise ValueError(f"the reference {reference!r} holds no <box>")
    pred = boxes_of(prediction)
    if not pred:
        return False, 0.0
    iou = box_iou(pred[0], ref[0])
    return iou >= IOU_THRESHOLD, iou


def score_grounded_caption(prediction: str, reference: str) -> tuple[bool, float]:
    """Hit when the text without boxes matches exactly and every box, in order, has IoU >= 0.5 with its reference.
    The second value is the mean IoU over the reference boxes (a missing box counts 0)."""
    ref, pred = boxes_of(reference), boxes_of(prediction)
    ious = [box_iou(p, r) for p, r in zip(pred, ref)] + [0.0] * max(0, len(ref) - len(pred))
    same_text = normalize(_TAGS.sub("", prediction)) == normalize(_TAGS.sub("", reference))
    hit = same_text and len(pred) == len(ref) and all(i >= IOU_THRESHOLD for i in ious)
    return hit, (sum(ious) / len(ious) if ious else 0.0)


def score(kind: str, prediction: str, reference: str) -> dict:
    if kind == "grounding":
        hit, iou = score_grounding(prediction, reference)
        return {"correct": hit, "iou": iou}
    if kind == "grounded_caption":
        hit, iou = score_grounded_caption(prediction, reference)
        return {"correct": hit, "iou": iou}
    return {"correct": normalize(prediction) == normalize(reference)}


class Baseline:
    """Answers without looking at the image: the mean reference box, and the most common answer (per question
    when the question was seen, else per task kind), learnt from a set of (kind, question, reference) triples."""

    def __init__(self, triples):
        boxes = []
        per_kind, per_question = {}, {}
        for kind, question, reference in triples:
            if kind == "grounding":
                b = boxes_of(reference)
                if b:
                    boxes.append(b[0])
            per_kind.setdefault(kind, Counter())[reference] += 1
            per_question.setdefault((kind, question), Counter())[reference] += 1
        self.mean_box = tuple(round(sum(b[k] for b in boxes) / len(boxes)) for k in range(4)) if boxes else None
        self.per_kind = {k: c.most_common(1)[0][0] for k, c in per_kind.items()}
        self.per_question = {k: c.most_common(1)[0][0] for k, c in per_question.items()}

    def answer(self, kind: str, question: str) -> str:
        if kind == "grounding" and self.mean_box is not None:
            x1, y1, x2, y2 = self.mean_box
            return f"<box>({x1},{y1}),({x2},{y2})</box>"
        return self.per_question.get((kind, question), self.per_kind.get(kind, ""))


def summarize(results: list[dict]) -> dict:
    """Per task kind: n, accuracy of the model and of the baseline (and mean IoU where boxes are involved)."""
    out = {}
    for kind in sorted({r["kind"] for r in results}):
        rs = [r for r in results if r["kind"] == kind]
        row = {"n": len(rs), "accuracy": sum(r["correct"] for r in rs) / len(rs),
               "baseline_accuracy": sum(r["baseline_correct"] for r in rs) / len(rs)}
        if any("iou" in r for r in rs):
            row["mean_iou"] = sum(r.get("iou", 0.0) for r in rs) / len(rs)
            row["baseline_mean_iou"] = sum(r.get("baseline_iou", 0.0) for r in rs) / len(rs)
        out[kind] = row
    return out
