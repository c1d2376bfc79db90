"""A lean PyTorch Qwen-VL that loads the released checkpoints and computes what the released code computes.

    from qwenvl import QwenVL, QwenVLTokenizer
    model = QwenVL.from_pretrained("Qwen-VL-Chat", kernels="auto")
    tokenizer = QwenVLTokenizer.from_pretrained("Qwen-VL-Chat")
    response, history = model.chat(tokenizer, "Picture 1: <img>dog.jpg</img>\\nWhat is this?", history=None)

`patch_official_model` accelerates a model built by the official remote code instead (transformers needed).
"""
from .config import QwenVLConfig, TextConfig, VisionConfig
from .model import QwenVL, QwenVLOutput
from .tokenizer import QwenVLTokenizer

# Loaded on first use: generation and the official patch pull in more than most imports need.
_LAZY = {
    "chat": ("generation", "chat"),
    "chat_stream": ("generation", "chat_stream"),
    "generate": ("generation", "generate"),
    "patch_official_model": ("official", "patch_official_model"),
    "unpatch_official_model": ("official", "unpatch_official_model"),
    "parse_grounding": ("processing", "parse_grounding"),
}

__all__ = ["QwenVL", "QwenVLConfig", "QwenVLOutput", "QwenVLTokenizer", "TextConfig", "VisionConfig", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'qwenvl' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
