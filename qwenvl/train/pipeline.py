"""A training run: the stages in order (each starting from the previous one's final model), then the evaluation.

Layout of --out: run.json (arguments and the resolved recipe of every stage), metrics.jsonl, loss.png,
stage<N>/checkpoint-<step>/ and stage<N>/final/ (loadable model folders that also resume), eval/ (report.json and
PNGs with boxes). `--resume` skips finished stages and continues an unfinished one from its newest checkpoint.
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
from .data import Examples
from .distributed import Dist, barrier, broadcast_object
from .formatting import DEFAULT_SYSTEM
from .init import init_from_scratch
from .metrics import MetricsLog, plot_loss, read, summarize
from .recipe import DEMO_SYSTEM, StageRecipe, stage_recipe
from .sources import FileSource, SyntheticSource
from .synthetic import SyntheticTasks
from .trainer import Options, train_stage

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


def make_source(args, recipe: StageRecipe, stage: int):
    if args.data == "synthetic":
        mix = args.mix or recipe.mix
        pairs = stage == 1 and args.mix is None and recipe.mix == "caption=1"
        # each stage draws its own stream of scenes: later stages never replay earlier ones
        # training grounding records ask for every object of the picture (one turn each): several boxes per encoded
        # image; evaluation asks for one
        tasks = SyntheticTasks(seed=args.seed * 1000 + stage, split="train", mix=mix, pairs=pairs, all_refs=True,
                               **scene_options(args))
        return SyntheticSource(tasks)
    return FileSource(args.data, root=args.image_root)


def scene_options(args) -> dict:
    """How synthetic scenes are drawn (the evaluation must draw them the same way)."""
    return {"canvas": args.canvas, "snap": args.snap, "sizes": tuple(args.sizes), "max_things": args.max_things}


def system_prompt(args, demo: bool) -> str:
    if args.system is not None:
        return args.system
    return DEMO_SYSTEM if demo and args.data == "synthetic" else DEFAULT_SYSTEM


def recipe_overrides(args) -> dict:
    train = None
    if args.train is not None:
        parts = {p.strip() for p in args.train.split(",") if p.strip()}
        unknown = parts - {"vit", "adapter", "llm"}
        if unknown:
            raise ValueError(f"--train takes parts among vit, adapter, llm; got {sorted(unknown)}")
        train = parts
    betas = None
    if args.beta1 is not None or args.beta2 is not None:
        betas = (args.beta1 if args.beta1 is not None else 0.9, args.beta2 if args.beta2 is not None else 0.98)
    return dict(lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps, steps=args.steps,
                weight_decay=args.weight_decay, grad_clip=args.grad_clip, eps=args.eps, betas=betas,
                vit_lr_decay=args.vit_lr_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
                image_size=args.image_size, style=args.style,
                train_vit=None if train is None else "vit" in train,
                train_adapter=None if train is None else "adapter" in train,
                train_llm=None if train is None else "llm" in train)


def _check_out(out: str, resume, d: Dist) -> None:
    busy = os.path.isdir(out) and any(n.startswith("stage") for n in os.listdir(out))
    if busy and not resume:
        raise FileExistsError(f"{out} already holds a training run: pass --resume to continue it, or another --out")


def run(args, d: Dist) -> dict:
    stages = args.stages
    config, tokenizer, scratch = resolve_model(args.model, args.tokenizer)
    demo = scratch and args.data == "synthetic"
    recipes = {s: stage_recipe(s, config, demo=scratch, **recipe_overrides(args)) for s in stages}
    system = system_prompt(args, demo)
    out = args.out
    _check_out(out, args.resume, d)
    if d.main:
        os.makedirs(out, exist_ok=True)
        if scratch:
            lrs = "/".join(f"{recipes[s].lr:g}" for s in stages)
            log.info("model %s from scratch: the demo defaults (from-scratch init, learning rates %s for stage(s) %s,"
                     " short schedules), not the paper's 2e-4/5e-5/1e-5, which stay the defaults for released "
                     "checkpoints", args.model, lrs, ",".join(map(str, stages)))
        with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not callable(v)}, "system": system,
                       "recipes": {s: r.to_dict() for s, r in recipes.items()}}, f, indent=2, default=str)
    barrier(d)
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"), enabled=d.main)
    opts = Options(out=out, seed=args.seed, workers=args.workers, dtype=args.dtype, pack_tokens=args.pack_tokens,
                   pool=args.bucket_pool, save_every=args.save_every, keep=args.keep, progress=not args.quiet,
                   shuffle=args.data != "synthetic",
                   data_info={"system": system, "data": args.data, "scenes": scene_options(args)})
    source_model = args.model
    summaries = []
    t_run = time.perf_counter()
    for s in stages:
        recipe = recipes[s]
        final = ckpt.final_dir(out, s)
        if args.resume and ckpt.is_complete(final):
            if d.main:
                log.info("stage %d already finished (%s): skipping", s, final)
            source_model = final
            continue
        resume_from = None
        if args.resume:
            found = ckpt.checkpoints(ckpt.stage_dir(out, s))
            resume_from = found[-1][1] if found else None
            resume_from = broadcast_object(resume_from, d)
            if resume_from is None:
                metrics.rewind(s, 0)  # killed before its first checkpoint: the stage starts over, so do its lines
        model = build_model(resume_from or source_model, args.seed, args.kernels, d.device, args.grad_checkpointing)
        examples = Examples(make_source(args, recipe, s), tokenizer, recipe.style, system, recipe.image_size,
                            args.max_len, bad=args.bad_records, validate=args.data != "synthetic")
        summary = train_stage(model, tokenizer, recipe, examples, opts, d, metrics, resume=resume_from,
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
