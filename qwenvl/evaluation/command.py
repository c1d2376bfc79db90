"""`qwenvl eval` (and the evaluation at the end of `qwenvl train`): check the job, load, pick the data, answer,
score, report, draw. The data and the model folder are checked before the model is loaded."""
from __future__ import annotations

import logging
import os
import time

import torch

from ..cli import check_kernels
from ..config import resolve_device
from ..jsonfile import read_json_object
from ..model import QwenVL
from ..prompts import DEFAULT_SYSTEM
from ..train.formatting import STYLES, turns
from ..train.job import Job
from ..train.pipeline import resolve_model
from ..train.recipe import DEMO_SYSTEM
from ..train.sources import FileSource, SyntheticSource
from ..train.state import STATE_FILE
from ..train.synthetic import SyntheticTasks
from . import answers, report, scoring

log = logging.getLogger("qwenvl.train")

# the held-out mix: every kind, grounding twice as often since it carries the headline number
EVAL_MIX = "caption=1,vqa=1,grounding=2,grounded_caption=1,ocr=1"
BASELINE_EXAMPLES = 4000


def _trained_with(model_path: str) -> dict:
    """The system prompt and scene options the checkpoint was trained with (written by the trainer), if known."""
    file = os.path.join(model_path, STATE_FILE) if os.path.isdir(model_path) else ""
    if not os.path.isfile(file):
        return {}
    data = read_json_object(file).get("data", {})
    return data if isinstance(data, dict) else {}


def _data(job: Job, scenes: dict):
    """(source, indices, baseline records, where the baseline comes from)."""
    eval_data = job.eval.data or (job.data if job.data != "synthetic" else None)
    if eval_data:
        source = FileSource(eval_data, root=job.image_root)
        indices = list(range(len(source)))
        for i in indices:
            source.check_images(i)
        # no training split at hand: the baseline's statistics come from the evaluated file itself (optimistic)
        return source, indices, [(source.record(i), i) for i in indices], f"{eval_data} itself"
    source = SyntheticSource(SyntheticTasks(seed=job.seed, split="eval", mix=EVAL_MIX, **scenes))
    train = SyntheticTasks(seed=job.seed, split="train", mix=EVAL_MIX, **scenes)
    baseline = [(train.record(i), i) for i in range(BASELINE_EXAMPLES)]
    return source, list(range(job.eval.samples)), baseline, f"{BASELINE_EXAMPLES} synthetic training examples"


def evaluate_run(job: Job, model_path: str, out_dir: str, demo_note: bool = False) -> dict:
    config, tokenizer, scratch = resolve_model(model_path, job.tokenizer)
    trained = _trained_with(model_path)
    device = resolve_device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_kernels(job.kernels)
    system = job.system if job.system is not None else trained.get("system", DEMO_SYSTEM if scratch else
                                                                   DEFAULT_SYSTEM)
    style = job.style or "chatml"
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    image_size = job.eval.image_size or config.vision.image_size
    if image_size % config.vision.patch_size:
        raise ValueError(f"--image-size {image_size} is not a multiple of the patch size {config.vision.patch_size}")
    scenes = dict(trained.get("scenes") or job.scenes.to_dict())
    scenes["sizes"] = tuple(scenes["sizes"])
    source, indices, baseline_records, baseline_from = _data(job, scenes)
    triples = []
    for record, i in baseline_records:
        reference = turns(record, i)[-1][1]
        triples.append((scoring.infer_kind(record, reference), answers.question_of(record), reference))
    baseline = scoring.Baseline(triples)

    if os.path.isdir(model_path):
        model = QwenVL.from_pretrained(model_path, dtype=job.dtype, device=device, kernels=job.kernels)
    else:
        torch.manual_seed(job.seed)
        model = QwenVL(config.replace(dtype=job.dtype), kernels=job.kernels).to(device)
    t0 = time.perf_counter()
    results = answers.run(model, tokenizer, source, indices, style=style, system=system, image_size=image_size,
                          baseline=baseline, batch_size=job.eval.batch_size, max_new_tokens=job.eval.max_new_tokens,
                          progress=job.progress)
    seconds = time.perf_counter() - t0
    pngs = report.draw(results, source, out_dir, n=job.eval.draw)
    where = job.eval.data or (job.data if job.data != "synthetic" else None)
    summary = report.write(results, out_dir, extra={
        "model": model_path, "data": where or "synthetic eval split", "style": style, "system": system,
        "baseline": {"from": baseline_from, "mean_box": baseline.mean_box}, "seconds": seconds, "images": pngs})
    print(f"\nevaluation of {model_path} on {where or 'the held-out synthetic split'} "
          f"({len(results)} examples, greedy decoding, {seconds:.0f} s)")
    print(report.table(summary))
    print(f"baseline: the mean box {baseline.mean_box} and the most common answer, from {baseline_from}")
    if demo_note and scratch is False and trained.get("defaults") == "demo":
        print("note: trained with the demo defaults (learning rates above the paper's, for a from-scratch tiny "
              "model); the paper's values stay the defaults for released checkpoints")
    print(f"report: {os.path.join(out_dir, 'report.json')}; boxes drawn: {len(pngs)} PNG(s) in {out_dir}")
    return summary
