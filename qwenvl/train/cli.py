"""`qwenvl train` and `qwenvl eval`: argument parsing into a `Job`, logging, threads, the process group, exit codes.

`main_train(argv)` and `main_eval(argv)` take the arguments after the sub-command and return an exit code:
0 success, 2 bad input (arguments, data, checkpoints; one line that says what to fix).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ..cli import Parser, run_command
from .job import DEFAULT_OUT, EvalSpec, Job, Scenes

log = logging.getLogger("qwenvl.train")


def _stages(text: str) -> list[int]:
    if text == "all":
        return [1, 2, 3]
    try:
        stages = [int(s) for s in text.replace("-", ",").split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stage takes 1, 2, 3 or a list such as 1,2,3 (got {text!r})") from None
    if not stages or any(s not in (1, 2, 3) for s in stages) or stages != sorted(set(stages)):
        raise argparse.ArgumentTypeError(f"--stage takes stages among 1, 2, 3 in increasing order (got {text!r})")
    return stages


def _positive(kind):
    def parse(text):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def _sizes(text):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes min,max fractions such as 0.35,0.5 (got {text!r})") from None
    if not 0 < lo <= hi < 1:
        raise argparse.ArgumentTypeError(f"--sizes needs 0 < min <= max < 1 (got {text!r})")
    return lo, hi


def _non_negative(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _parts(text):
    parts = {p.strip() for p in text.split(",") if p.strip()}
    if not parts or parts - {"vit", "adapter", "llm"}:
        raise argparse.ArgumentTypeError(f"--train takes parts among vit, adapter, llm such as vit,adapter (got {text!r})")
    return parts


def _mix(text):
    from .synthetic import parse_mix

    try:
        parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo",
                   help="a preset (demo, tiny, qwen-vl) built from scratch, or a checkpoint folder (default: demo)")
    p.add_argument("--tokenizer", default=None, help="folder with qwen.tiktoken when the model folder has none")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (built in, the default) or a JSON/JSONL file in the fine-tuning format")
    p.add_argument("--image-root", default=None, help="folder of relative image paths (default: the data file's)")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--system", default=None,
                   help="ChatML system prompt (default: the official one; empty for the synthetic demo)")
    p.add_argument("--style", default=None, choices=("plain", "chatml"),
                   help="text format (default: plain in stages 1-2, chatml in stage 3 and in eval)")
    p.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("synthetic scenes")
    s.add_argument("--canvas", type=_positive(int), default=100,
                   help="pictures are drawn at this size, then resized to the model's (default: 100)")
    s.add_argument("--snap", type=_positive(int), default=5,
                   help="shape corners and sides on multiples of this many canvas pixels (default: 5, i.e. "
                        "multiples of 50 on the [0, 1000) grid with a 100-pixel canvas)")
    s.add_argument("--sizes", type=_sizes, default=(0.35, 0.5),
                   help="shape sides as fractions of the canvas, min,max (default: 0.35,0.5)")
    s.add_argument("--max-things", type=_positive(int), default=2, help="shapes per picture, at most (default: 2)")
    p.add_argument("--threads", type=_non_negative, default=0,
                   help="torch CPU threads (0: the cores not already busy, from the load average)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-samples", type=_non_negative, default=1000,
                   help="held-out synthetic examples to evaluate (0: no evaluation)")
    p.add_argument("--eval-data", default=None, help="evaluate on this fine-tuning-format file instead")
    p.add_argument("--eval-batch-size", type=_positive(int), default=50)
    p.add_argument("--max-new-tokens", type=_non_negative, default=0,
                   help="generation budget (0: 1.5x the longest reference of each task kind)")
    p.add_argument("--draw", type=_non_negative, default=6, help="PNGs of predicted boxes to write")


def train_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qwenvl train",
        description="Train Qwen-VL with the paper's three-stage recipe. With no arguments: a small model from "
                    "scratch through stages 1, 2 and 3 on the built-in synthetic set, then its evaluation.")
    p.add_argument("--stage", type=_stages, default=[1, 2, 3], dest="stages",
                   help="1, 2, 3, or several in order such as 1,2,3 (default: all)")
    _common(p)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default: {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"), help="under torchrun (default: ddp)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (autocast); weights and optimizer state stay float32")
    p.add_argument("--grad-checkpointing", action="store_true")
    g = p.add_argument_group("recipe overrides (default: the paper's values, or the demo's for a from-scratch preset)")
    g.add_argument("--steps", type=_positive(int))
    g.add_argument("--batch-size", type=_positive(int), help="examples per micro-batch and rank")
    g.add_argument("--grad-accum", type=_positive(int))
    g.add_argument("--lr", type=_positive(float), help="peak learning rate")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=_non_negative)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--beta1", type=float)
    g.add_argument("--beta2", type=float)
    g.add_argument("--eps", type=_positive(float))
    g.add_argument("--grad-clip", type=float, help="max gradient norm (<= 0: no clipping)")
    g.add_argument("--vit-lr-decay", type=_positive(float), help="layer-wise learning-rate decay of the ViT")
    g.add_argument("--image-size", type=_positive(int), help="input resolution (default: 224/448 or half/full)")
    g.add_argument("--train", type=_parts, default=None, help="parts that train, e.g. vit,adapter (default: the stage's)")
    g.add_argument("--mix", type=_mix, default=None,
                   help="synthetic task mix, e.g. grounding=4,vqa=1 (default: the stage's)")
    d = p.add_argument_group("data")
    d.add_argument("--max-len", type=_positive(int), default=2048, help="longest example in tokens; longer ones are "
                   "malformed (never truncated)")
    d.add_argument("--bad-records", default="error", choices=("error", "skip"),
                   help="malformed records: refuse the data (default) or skip them, reporting each id")
    d.add_argument("--pack-tokens", type=_non_negative, default=0,
                   help="pack examples into rows of this many tokens (cu_seqlens) instead of padding")
    d.add_argument("--bucket-pool", type=_positive(int), default=8,
                   help="global batches sorted by length together (1: no bucketing); capped to the data set, and a "
                        "record never appears twice in one step")
    d.add_argument("--workers", type=_non_negative, default=1, help="DataLoader worker processes")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--save-every", type=_non_negative, default=500,
                   help="steps between checkpoints, besides each stage's final one (0: only those; default: 500)")
    c.add_argument("--keep", type=_non_negative, default=2, help="checkpoints kept per stage (0: all)")
    _eval_args(p)
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qwenvl eval",
        description="Evaluate a checkpoint: grounding accuracy at IoU >= 0.5, exact match for VQA, captions and OCR, "
                    "beside a trivial baseline (the mean box, the most common answer) measured in the same run.")
    _common(p)
    p.add_argument("--out", default=None, help="folder for report.json and the PNGs (default: <model>/eval)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--image-size", type=_positive(int), default=None, help="default: the model's")
    _eval_args(p)
    return p


def _setup_logging(quiet_rank: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet_rank else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def _idle_cores(cores: int) -> float:
    """Cores idle right now: /proc/stat sampled over half a second (the load average lags by a minute)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(0.5)
        idle1, total1 = sample()
        return cores * (idle1 - idle0) / max(1, total1 - total0)
    except (OSError, ValueError, IndexError):
        try:
            return cores - os.getloadavg()[0]
        except OSError:
            return float(cores)


def _threads(n: int) -> None:
    import torch

    if n == 0:
        if torch.cuda.is_available():
            return
        # on a shared CPU, threads beyond the idle cores make every small kernel wait on the others (we measured
        # a step 10x slower with 2 threads than with 1 on a busy 2-core machine): take only the idle cores
        cores = os.cpu_count() or 1
        n = max(1, min(cores, int(_idle_cores(cores) + 0.5)))
        n = max(1, n // int(os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(n)
    log.info("torch uses %d CPU thread(s)", n)


def _job(args, training: bool) -> Job:
    """The one place argparse's Namespace becomes the library's Job."""
    evaluation = EvalSpec(samples=args.eval_samples, data=args.eval_data, batch_size=args.eval_batch_size,
                          max_new_tokens=args.max_new_tokens, draw=args.draw,
                          image_size=None if training else args.image_size, out=None if training else args.out)
    job = Job(model=args.model, tokenizer=args.tokenizer, data=args.data, image_root=args.image_root,
              kernels=args.kernels, device=args.device, dtype=args.dtype, system=args.system, style=args.style,
              seed=args.seed, progress=not args.quiet, eval=evaluation,
              scenes=Scenes(canvas=args.canvas, snap=args.snap, sizes=tuple(args.sizes), max_things=args.max_things))
    if not training:
        return job
    train = args.train
    betas = None
    if args.beta1 is not None or args.beta2 is not None:
        betas = (args.beta1 if args.beta1 is not None else 0.9, args.beta2 if args.beta2 is not None else 0.98)
    job.recipe = dict(lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps, steps=args.steps,
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, eps=args.eps, betas=betas,
                      vit_lr_decay=args.vit_lr_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      image_size=args.image_size, style=args.style, mix=args.mix,
                      train_vit=None if train is None else "vit" in train,
                      train_adapter=None if train is None else "adapter" in train,
                      train_llm=None if train is None else "llm" in train)
    for name in ("stages", "out", "resume", "strategy", "grad_checkpointing", "max_len", "bad_records",
                 "pack_tokens", "bucket_pool", "workers", "save_every", "keep"):
        setattr(job, name, getattr(args, name))
    return job


def _train(job: Job) -> int:
    from . import distributed, pipeline
    from ..evaluation.command import evaluate_run

    t0 = time.perf_counter()
    d = None
    try:
        d = distributed.setup(job.strategy, job.device)
        result = pipeline.run(job, d)
        if d.main:
            print(f"training done in {result['train_seconds']:.0f} s; final model: {result['final_model']}")
            for stage, s in result.get("loss_summary", {}).items():
                print(f"  stage {stage}: {s['line']}")
            if job.eval.samples > 0 or job.eval.data:
                evaluate_run(job, result["final_model"], os.path.join(job.out, "eval"),
                             demo_note=job.data == "synthetic")
            print(f"total {time.perf_counter() - t0:.0f} s; metrics {os.path.join(job.out, 'metrics.jsonl')}, "
                  f"loss curve {os.path.join(job.out, 'loss.png')}")
        return 0
    finally:
        if d is not None:
            distributed.teardown(d)


def main_train(argv: list[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(rank != 0)
    _threads(args.threads)
    return run_command("qwenvl train", _train, _job(args, training=True))


def _eval(job: Job) -> int:
    from ..evaluation.command import evaluate_run

    out = job.eval.out or os.path.join(job.model if os.path.isdir(job.model) else ".", "eval")
    evaluate_run(job, job.model, out)
    return 0


def main_eval(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    _setup_logging(False)
    _threads(args.threads)
    return run_command("qwenvl eval", _eval, _job(args, training=False))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_train())
