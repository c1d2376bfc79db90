"""Training Qwen-VL: the paper's three-stage recipe, data (fine-tuning files or the built-in synthetic set), the
trainer (accumulation, DDP/FSDP2, atomic checkpoints, exact resume) and the evaluation (`qwenvl train|eval`)."""
from .cli import main_eval, main_train

__all__ = ["main_train", "main_eval"]
