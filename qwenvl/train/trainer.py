"""The training loop of one stage: freeze, wrap, accumulate, clip, step, log, checkpoint.

Loss normalization: the model returns the mean over the target tokens of one micro-batch. Each micro-batch's
loss is weighted by its share of the target tokens of the whole global step (all micro-batches on all ranks,
counted with an all-reduce before the first backward), times the world size because DDP and FSDP average gradients
over ranks. The sum of the weighted losses is then exactly the mean over every target token of the global batch, so
2 micro-batches of 4 give the gradients of 1 batch of 8, and N ranks those of one process with the global batch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import resolve_dtype
from ..inputs import IGNORE_INDEX
from . import state as ckpt
from .data import Batch, Examples, PlanSpec, loader, plan
from .distributed import Dist, all_reduce_sum, no_sync, wrap
from .metrics import MetricsLog
from .recipe import StageRecipe, apply_freeze, build_optimizer, build_scheduler

log = logging.getLogger("qwenvl.train")


@dataclass
class Options:
    out: str
    seed: int = 0
    workers: int = 1
    dtype: str = "float32"          # compute dtype (autocast); the weights and optimizer stay float32
    pack_tokens: int = 0
    pool: int = 8
    save_every: int = 0             # steps between checkpoints (0: only the stage's final one)
    keep: int = 2                   # checkpoints kept per stage besides the final one
    progress: bool = True
    shuffle: bool = True
    data_info: dict = field(default_factory=dict)  # how examples were made (system prompt, canvas): eval reuses it


def _inputs(batch: Batch, pad_id: int, device) -> dict:
    if not batch.empty:
        return batch.model_inputs(device)
    # a micro-batch whose records were all dropped still has to run forward and backward so that every rank joins
    # the gradient all-reduce; with no target its loss and gradients are zero
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    return {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}


def plan_spec(recipe: StageRecipe, opts: Options, d: Dist) -> PlanSpec:
    return PlanSpec(batch_size=recipe.batch_size, grad_accum=recipe.grad_accum, world=d.world, seed=opts.seed,
                    pool=opts.pool, pack_tokens=opts.pack_tokens, shuffle=opts.shuffle)


def _check_resume(saved: dict, recipe: StageRecipe, spec: PlanSpec) -> None:
    old = saved["plan"]
    global_now = spec.batch_size * spec.grad_accum * spec.world
    global_then = old["batch_size"] * old["grad_accum"] * old["world"]
    problems = []
    if saved["stage"] != recipe.stage:
        problems.append(f"the checkpoint is of stage {saved['stage']}, not {recipe.stage}")
    if global_now != global_then and not spec.pack_tokens:
        problems.append(f"global batch {global_then} then, {global_now} now")
    for key in ("seed", "pool", "pack_tokens", "shuffle"):
        if old[key] != getattr(spec, key):
            problems.append(f"{key} {old[key]!r} then, {getattr(spec, key)!r} now")
    if saved["recipe"]["steps"] != recipe.steps:
        problems.append(f"{saved['recipe']['steps']} steps then, {recipe.steps} now (the schedule would change)")
    if problems:
        raise ValueError("cannot resume: the run differs from the checkpoint's: " + "; ".join(problems))


def train_stage(model, tokenizer, recipe: StageRecipe, examples: Examples, opts: Options, d: Dist,
                metrics: MetricsLog, resume: str | None = None, model_source: str = "") -> dict:
    """Train `model` through one stage (resuming from checkpoint folder `resume`, whose weights the model already
    holds). Writes checkpoints under <out>/stage<N>/ and the stage's final model to <out>/stage<N>/final."""
    counts = apply_freeze(model, recipe)
    model.train()
    wrapped = wrap(model, d)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe)
    spec = plan_spec(recipe, opts, d)
    compute = resolve_dtype(opts.dtype)
    scaler = torch.amp.GradScaler(d.device.type, enabled=compute == torch.float16)

    start = 0
    tokens_seen = 0
    if resume is not None:
        saved = ckpt.read_state(resume)
        _check_resume(saved, recipe, spec)
        ckpt.load_optimizer(resume, model, optimizer, scheduler)
        ckpt.load_rng(resume)
        start, tokens_seen = saved["step"], saved["tokens_seen"]
        if saved.get("grad_scaler"):
            scaler.load_state_dict(saved["grad_scaler"])
        metrics.rewind(recipe.stage, start)
        if d.main:
            log.info("stage %d: resuming at step %d from %s", recipe.stage, start, resume)

    if d.main:
        log.info("stage %d (%s defaults): trainable %s; %d steps, lr %.2g -> %.2g, warm-up %d, images %dpx, %s text",
                 recipe.stage, recipe.defaults, {g: c["trainable"] for g, c in counts.items()}, recipe.steps,
                 recipe.lr, recipe.min_lr, recipe.warmup_steps, recipe.image_size, recipe.style)
    micro = plan(examples, spec, recipe.steps, d.rank)
    batches = iter(loader(examples, micro, start * recipe.grad_accum, opts.workers, bool(opts.pack_tokens)))
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (torch.autocast(d.device.type, dtype=compute) if compute != torch.float32
                else contextlib.nullcontext())
    stage_folder = ckpt.stage_dir(opts.out, recipe.stage)

    def trainer_state(step):
        return {"stage": recipe.stage, "step": step, "tokens_seen": tokens_seen, "plan": asdict(spec),
                "recipe": recipe.to_dict(), "model_source": model_source,
                "data": {**opts.data_info, "style": recipe.style, "defaults": recipe.defaults},
                "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None}

    bar = None
    if opts.progress and d.main:
        from tqdm import tqdm

        bar = tqdm(total=recipe.steps, initial=start, desc=f"stage {recipe.stage}", dynamic_ncols=True,
                   mininterval=0.5)
    first_loss = last_loss = None
    t_stage = time.perf_counter()
    for step in range(start, recipe.steps):
        t0 = time.perf_counter()
        group = [next(batches) for _ in range(recipe.grad_accum)]
        for b in group:
            for rid, reason in b.skipped:
                log.warning("skipped malformed record %s: %s", rid, reason)
        n_targets, n_tokens = all_reduce_sum([sum(b.n_targets for b in group), sum(b.n_tokens for b in group)], d)
        loss_sum = 0.0
        for a, b in enumerate(group):
            kw = _inputs(b, tokenizer.eod_id, d.device)
            weight = b.n_targets / n_targets * d.world if n_targets else 0.0
            with no_sync(wrapped, d, skip=a < recipe.grad_accum - 1):
                with autocast:
                    out = wrapped(**kw)
                loss = out.loss.float()
                scaler.scale(loss * weight).backward()
            loss_sum += float(loss.detach()) * b.n_targets
        loss_sum = all_reduce_sum([loss_sum], d)[0]
        loss_value = loss_sum / n_targets if n_targets else float("nan")
        scaler.unscale_(optimizer)
        clip = recipe.grad_clip if recipe.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = max(g["lr"] for g in optimizer.param_groups)
        if n_targets:
            scaler.step(optimizer)
            scaler.update()
        elif d.main:
            log.warning("stage %d step %d: no target token in the whole global batch; optimizer step skipped",
                        recipe.stage, step + 1)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += int(n_tokens)
        dt = time.perf_counter() - t0
        first_loss = loss_value if first_loss is None else first_loss
        last_loss = loss_value
        metrics.write({"stage": recipe.stage, "step": step + 1, "loss": loss_value, "lr": lr,
                       "grad_norm": grad_norm, "tokens": int(n_tokens), "targets": int(n_targets),
                       "step_seconds": dt, "tokens_per_s": n_tokens / dt if dt > 0 else 0.0,
                       "time": time.time()})
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{n_tokens / dt:,.0f}", lr=f"{lr:.1e}", refresh=False)
            bar.update(1)
        done = step + 1
        if opts.save_every and done % opts.save_every == 0 and done < recipe.steps:
            ckpt.save(os.path.join(stage_folder, f"checkpoint-{done:06d}"), model, tokenizer, optimizer, scheduler,
                      trainer_state(done), d, keep=opts.keep)
    if bar is not None:
        bar.close()
    ckpt.save(ckpt.final_dir(opts.out, recipe.stage), model, tokenizer, optimizer, scheduler,
              trainer_state(recipe.steps), d)
    return {"stage": recipe.stage, "steps": recipe.steps, "resumed_at": start, "first_loss": first_loss,
            "last_loss": last_loss, "seconds": time.perf_counter() - t_stage, "tokens": tokens_seen,
            "parameters": counts}
