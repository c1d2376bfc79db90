"""A training run: the stages in order (each starting from the previous one's final model), then the evaluation.

Layout of --out: run.json (the job and the resolved recipe of every stage), metrics.jsonl, loss.png,
stage<N>/checkpoint-<step>/ and stage<N>/final/ (loadable model folders that also resume), eval/ (report.json and
PNGs with boxes). `--resume` skips finished stages and continues an unfinished one from its newest checkpoint.

Everything that can be checked without a model is checked before the first model is built: the model and tokenizer
names, the recipes, the run folder, the checkpoints to resume from, and every record of a data file.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from ..config import PRESETS, QwenVLConfig
from ..model import QwenVL
from ..tokenizer import QwenVLTokenizer
from . import state as ckpt
from .data import Examples, check_plan
from .distributed import Dist, barrier, broadcast_object
from ..prompts import DEFAULT_SYSTEM
from .job import Job
from .metrics import MetricsLog, plot_loss, read, summarize
from .recipe import DEMO_SYSTEM, StageRecipe, stage_recipe
from .scratch_init import init_from_scratch
from .sources import FileSource, SyntheticSource
from .synthetic import SyntheticTasks
from .trainer import Options, plan_spec, train_stage

log = logging.getLogger("qwenvl.train")

RELEASED = ("qwen-vl", "qwen-vl-chat")


def resolve_model(model: str, tokenizer_path: str | None = None):
    """(config, tokenizer, from_scratch) for a preset name or a checkpoint folder."""
    if os.path.isdir(model):
        config = QwenVLConfig.from_json(model)
        tok_source = tokenizer_path or model
        if not os.path.isfile(os.path.join(tok_source, "qwen.tiktoken")) and tokenizer_path is None:
            raise FileNotFoundError(f"{model} holds no qwen.tiktoken: pass --tokenizer with the folder that does")
        tokenizer = QwenVLTokenizer.from_pretrained(tok_source, n_image_tokens=config.vision.n_queries)
        scratch = False
    elif model in PRESETS:
        config = QwenVLConfig.from_name(model)
        if tokenizer_path:
            tokenizer = QwenVLTokenizer.from_pretrained(tokenizer_path, n_image_tokens=config.vision.n_queries)
        elif model in RELEASED:
            raise ValueError(f"--model {model} needs the released vocabulary: pass --tokenizer with a folder holding "
                             f"qwen.tiktoken (models and vocabularies are never downloaded here)")
        else:
            tokenizer = QwenVLTokenizer.byte_level(config.vision.image_start_id, config.vision.n_queries)
        scratch = True
    else:
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a folder")
    if tokenizer.img_start_id != config.vision.image_start_id or tokenizer.n_image_tokens != config.vision.n_queries:
        raise ValueError(
            f"tokenizer and model disagree: <img> is {tokenizer.img_start_id} vs image_start_id "
            f"{config.vision.image_start_id}, image span {tokenizer.n_image_tokens} vs n_queries "
            f"{config.vision.n_queries}")
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {config.text.vocab_size}")
    return config, tokenizer, scratch and model not in RELEASED


def build_model(source: str, seed: int, kernels: str, device, grad_checkpointing: bool) -> QwenVL:
    """A preset built from random weights (seeded: every rank builds the same) or a checkpoint folder, in float32
    (the master weights; --dtype sets the compute dtype)."""
    if os.path.isdir(source):
        model = QwenVL.from_pretrained(source, dtype=torch.float32, kernels=kernels)
    else:
        torch.manual_seed(seed)
        model = QwenVL(QwenVLConfig.from_name(source).replace(dtype="float32"), kernels=kernels)
        init_from_scratch(model)
    model.to(device)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def make_source(job: Job, recipe: StageRecipe, stage: int, files: FileSource | None = None):
    """The stage's records: the data file's (one FileSource for every stage), or a synthetic stream of its own."""
    if job.data != "synthetic":
        return files if files is not None else FileSource(job.data, root=job.image_root)
    pairs = stage == 1 and job.recipe.get("mix") is None and recipe.mix == "caption=1"
    # each stage draws its own stream of scenes: later stages never replay earlier ones. Training grounding records
    # ask for every object of the picture (one turn each: several boxes per encoded image); evaluation asks for one
    tasks = SyntheticTasks(seed=job.seed * 1000 + stage, split="train", mix=recipe.mix, pairs=pairs, all_refs=True,
                           **job.scenes.to_dict())
    return SyntheticSource(tasks)


def system_prompt(job: Job, demo: bool) -> str:
    if job.system is not None:
        return job.system
    return DEMO_SYSTEM if demo and job.data == "synthetic" else DEFAULT_SYSTEM


def _check_out(out: str, resume: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file, not a folder")
    busy = os.path.isdir(out) and any(n.startswith("stage") for n in os.listdir(out))
    if busy and not resume:
        raise FileExistsError(f"{out} already holds a training run: pass --resume to continue it, or another --out")


def _stage_starts(job: Job, d: Dist) -> dict:
    """stage -> "done", a checkpoint folder to resume from, or None (from the start); resumability checked."""
    starts = {}
    for s in job.stages:
        if job.resume and ckpt.is_complete(ckpt.final_dir(job.out, s)):
            starts[s] = "done"
            continue
        found = ckpt.checkpoints(ckpt.stage_dir(job.out, s)) if job.resume else []
        start = broadcast_object(found[-1][1] if found else None, d)
        if start is not None:
            ckpt.check_resumable(start)
        starts[s] = start
    return starts


def run(job: Job, d: Dist) -> dict:
    config, tokenizer, scratch = resolve_model(job.model, job.tokenizer)
    demo = scratch and job.data == "synthetic"
    recipes = {s: stage_recipe(s, config, demo=scratch, **job.recipe) for s in job.stages}
    system = system_prompt(job, demo)
    out = job.out
    _check_out(out, job.resume)
    if d.main and os.path.isdir(out):
        for s in job.stages:
            ckpt.remove_orphans(ckpt.stage_dir(out, s))
    barrier(d)
    starts = _stage_starts(job, d)
    files = FileSource(job.data, root=job.image_root) if job.data != "synthetic" else None
    examples = {s: Examples(make_source(job, recipes[s], s, files), tokenizer, recipes[s].style, system,
                            recipes[s].image_size, job.max_len, bad=job.bad_records, validate=files is not None)
                for s in job.stages if starts[s] != "done"}
    if d.main:
        os.makedirs(out, exist_ok=True)
        if scratch:
            lrs = "/".join(f"{recipes[s].lr:g}" for s in job.stages)
            log.info("model %s from scratch: the demo defaults (from-scratch init, learning rates %s for stage(s) %s,"
                     " short schedules), not the paper's 2e-4/5e-5/1e-5, which stay the defaults for released "
                     "checkpoints", job.model, lrs, ",".join(map(str, job.stages)))
        with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
            json.dump({"job": job.to_dict(), "system": system,
                       "recipes": {s: r.to_dict() for s, r in recipes.items()}}, f, indent=2, default=str)
    barrier(d)
    opts = Options(out=out, seed=job.seed, workers=job.workers, dtype=job.dtype, pack_tokens=job.pack_tokens,
                   pool=job.bucket_pool, save_every=job.save_every, keep=job.keep, progress=job.progress,
                   shuffle=job.data != "synthetic",
                   data_info={"system": system, "data": job.data, "scenes": job.scenes.to_dict()})
    for s, ex in examples.items():  # a data set smaller than one global batch is refused before any model is built
        check_plan(len(ex), plan_spec(recipes[s], opts, d))
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), enabled=d.main)
    source_model = job.model
    summaries = []
    t_run = time.perf_counter()
    for s in job.stages:
        final = ckpt.final_dir(out, s)
        if starts[s] == "done":
            if d.main:
                log.info("stage %d already finished (%s): skipping", s, final)
            source_model = final
            continue
        resume_from = starts[s]
        if job.resume and resume_from is None:
            metrics.rewind(s, 0)  # killed before its first checkpoint: the stage starts over, so do its lines
        model = build_model(resume_from or source_model, job.seed, job.kernels, d.device, job.grad_checkpointing)
        summary = train_stage(model, tokenizer, recipes[s], examples[s], opts, d, metrics, resume=resume_from,
                              model_source=resume_from or source_model)
        summaries.append(summary)
        source_model = final
        if d.main and os.path.isfile(metrics.path):
            plot_loss(metrics.path, os.path.join(out, "loss.png"))
        del model
    result = {"final_model": source_model, "train_seconds": time.perf_counter() - t_run, "stages": summaries}
    if d.main and os.path.isfile(metrics.path):
        result["loss_summary"] = summarize(read(metrics.path))
    return result
