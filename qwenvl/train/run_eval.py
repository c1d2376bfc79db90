"""`qwenvl eval` (and the evaluation at the end of `qwenvl train`): load, pick the data, score, report, draw."""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from ..model import QwenVL
from . import evaluate, scoring
from .formatting import DEFAULT_SYSTEM, turns
from .pipeline import resolve_model, scene_options
from .recipe import DEMO_SYSTEM
from .sources import FileSource, SyntheticSource
from .state import STATE_FILE
from .synthetic import SyntheticTasks

log = logging.getLogger("qwenvl.train")

# the held-out mix: every kind, grounding twice as often since it carries the headline number
EVAL_MIX = "caption=1,vqa=1,grounding=2,grounded_caption=1,ocr=1"
BASELINE_EXAMPLES = 4000


def _trained_with(model_path: str) -> dict:
    """The system prompt and scene options the checkpoint was trained with (written by the trainer), if known."""
    file = os.path.join(model_path, STATE_FILE) if os.path.isdir(model_path) else ""
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f).get("data", {})


def evaluate_run(args, model_path: str, out_dir: str, demo_note: bool = False) -> dict:
    config, tokenizer, scratch = resolve_model(model_path, args.tokenizer)
    trained = _trained_with(model_path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if os.path.isdir(model_path):
        model = QwenVL.from_pretrained(model_path, dtype=args.dtype, device=device, kernels=args.kernels)
    else:
        torch.manual_seed(args.seed)
        model = QwenVL(config.replace(dtype=args.dtype), kernels=args.kernels).to(device)
    system = args.system if args.system is not None else trained.get("system", DEMO_SYSTEM if scratch else
                                                                     DEFAULT_SYSTEM)
    style = args.style or "chatml"
    image_size = args.image_size or config.vision.image_size
    eval_data = getattr(args, "eval_data", None) or (args.data if args.data != "synthetic" else None)
    if eval_data:
        source = FileSource(eval_data, root=args.image_root)
        indices = list(range(len(source)))
        # no training split at hand: the baseline's statistics come from the evaluated file itself (optimistic)
        baseline_records = [(source.record(i), i) for i in indices]
        baseline_from = f"{eval_data} itself"
    else:
        scenes = trained.get("scenes") or scene_options(args)
        scenes = dict(scenes, sizes=tuple(scenes["sizes"]))
        source = SyntheticSource(SyntheticTasks(seed=args.seed, split="eval", mix=EVAL_MIX, **scenes))
        indices = list(range(args.eval_samples))
        train = SyntheticTasks(seed=args.seed, split="train", mix=EVAL_MIX, **scenes)
        baseline_records = [(train.record(i), i) for i in range(BASELINE_EXAMPLES)]
        baseline_from = f"{BASELINE_EXAMPLES} synthetic training examples"
    triples = []
    for record, i in baseline_records:
        reference = turns(record, i)[-1][1]
        triples.append((scoring.infer_kind(record, reference), evaluate.question_of(record), reference))
    baseline = scoring.Baseline(triples)

    t0 = time.perf_counter()
    results = evaluate.run(model, tokenizer, source, indices, style=style, system=system, image_size=image_size,
                           baseline=baseline, batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens,
                           progress=not args.quiet)
    seconds = time.perf_counter() - t0
    pngs = evaluate.draw(results, source, out_dir, n=args.draw)
    summary = evaluate.report(results, out_dir, extra={
        "model": model_path, "data": eval_data or "synthetic eval split", "style": style, "system": system,
        "baseline": {"from": baseline_from, "mean_box": baseline.mean_box}, "seconds": seconds, "images": pngs})
    print(f"\nevaluation of {model_path} on {eval_data or 'the held-out synthetic split'} "
          f"({len(results)} examples, greedy decoding, {seconds:.0f} s)")
    print(scoring.table(summary))
    print(f"baseline: the mean box {baseline.mean_box} and the most common answer, from {baseline_from}")
    if demo_note and scratch is False and trained.get("defaults") == "demo":
        print("note: trained with the demo defaults (learning rates above the paper's, for a from-scratch tiny "
              "model); the paper's values stay the defaults for released checkpoints")
    print(f"report: {os.path.join(out_dir, 'report.json')}; boxes drawn: {len(pngs)} PNG(s) in {out_dir}")
    return summary
