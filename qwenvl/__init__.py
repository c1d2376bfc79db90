"""A lean PyTorch Qwen-VL that loads the released checkpoints and computes what the released code computes."""
from .config import QwenVLConfig, TextConfig, VisionConfig
from .model import QwenVL, QwenVLOutput

__all__ = ["QwenVL", "QwenVLConfig", "QwenVLOutput", "TextConfig", "VisionConfig"]
