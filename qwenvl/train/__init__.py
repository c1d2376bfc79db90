"""Training Qwen-VL: the paper's three-stage recipe, data (fine-tuning files or the built-in synthetic set) and the
trainer (accumulation, DDP/FSDP2, atomic pickle-free checkpoints, exact resume); `qwenvl train|eval` parse into a
`Job` (`job.py`). The evaluation lives in `qwenvl.evaluation`."""
from .cli import main_eval, main_train

__all__ = ["main_train", "main_eval"]
