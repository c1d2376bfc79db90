"""What a `qwenvl train` or `qwenvl eval` run is asked to do, as one dataclass (built from the command line by
`qwenvl.train.cli`, or directly by a program); the library never sees argparse."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

DEFAULT_OUT = os.path.join("runs", "qwenvl-demo")


@dataclass
class Scenes:
    """How the built-in synthetic pictures are drawn (the evaluation must draw them as training did)."""

    canvas: int = 100                 # pictures are drawn at this size, then resized to the model's
    snap: int = 5                     # corners and sides on multiples of this many canvas pixels
    sizes: tuple = (0.35, 0.5)        # shape sides as fractions of the canvas, (min, max)
    max_things: int = 2               # shapes per picture, at most

    def to_dict(self) -> dict:
        return {"canvas": self.canvas, "snap": self.snap, "sizes": tuple(self.sizes), "max_things": self.max_things}


@dataclass
class EvalSpec:
    """The evaluation at the end of training, or the whole of `qwenvl eval`."""

    samples: int = 1000               # held-out synthetic examples (0: no evaluation after training)
    data: str | None = None           # evaluate on this fine-tuning-format file instead
    batch_size: int = 50
    max_new_tokens: int = 0           # 0: 1.5x the longest reference of each task kind
    draw: int = 6                     # PNGs of predicted boxes to write
    image_size: int | None = None     # default: the model's
    out: str | None = None            # report folder (default: <model>/eval, or <run>/eval after training)


@dataclass
class Job:
    # --- the model, the data, where it runs
    model: str = "demo"               # a preset (demo, tiny, qwen-vl) or a checkpoint folder
    tokenizer: str | None = None      # folder with qwen.tiktoken when the model folder has none
    data: str = "synthetic"           # "synthetic" or a JSON/JSONL file in the fine-tuning format
    image_root: str | None = None     # folder of relative image paths (default: the data file's)
    kernels: str = "auto"
    device: str | None = None
    dtype: str = "float32"            # compute dtype (autocast in training); master weights stay float32
    system: str | None = None         # ChatML system prompt (None: the official one, or "" for the synthetic demo)
    style: str | None = None          # "plain" or "chatml" (None: the stage's; chatml in eval)
    seed: int = 0
    scenes: Scenes = field(default_factory=Scenes)
    progress: bool = True
    eval: EvalSpec = field(default_factory=EvalSpec)
    # --- training
    stages: list = field(default_factory=lambda: [1, 2, 3])
    out: str = DEFAULT_OUT
    resume: bool = False
    strategy: str = "ddp"
    grad_checkpointing: bool = False
    recipe: dict = field(default_factory=dict)   # StageRecipe overrides (absent or None: the stage's default)
    max_len: int = 2048
    bad_records: str = "error"
    pack_tokens: int = 0
    bucket_pool: int = 8
    workers: int = 1
    save_every: int = 500
    keep: int = 2

    def to_dict(self) -> dict:
        return asdict(self)
