"""A checkpoint folder's generation_config.json: the decoding defaults its authors chose, read and checked.

The released Qwen-VL-Chat ships `{"chat_format": "chatml", "do_sample": true, "top_p": 0.3, "top_k": 0,
"max_new_tokens": 512, "max_window_size": 6144, ...}`; the base Qwen-VL uses the raw format. `qwenvl generate` and
`qwenvl chat` take these as their defaults; a flag given on the command line wins. Keys we do not use (token ids,
transformers_version) are ignored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from .jsonfile import read_json_object
from .prompts import DEFAULT_SYSTEM

FILE = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """What a folder without the file gets: greedy decoding of at most 128 tokens in the raw format."""
    chat_format: str = "raw"
    system: str = DEFAULT_SYSTEM
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 128
    max_window_size: int = 6144

    def sampling(self) -> dict:
        """The keyword arguments of `generate` / `chat` that these defaults set."""
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens)


_KINDS = {"chat_format": str, "system": str, "do_sample": bool, "temperature": float, "top_p": float, "top_k": int,
          "repetition_penalty": float, "max_new_tokens": int, "max_window_size": int}


def _checked(path: str, key: str, value):
    kind = _KINDS[key]
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{path}: {key} must be a {kind.__name__}, got {value!r}; fix the file or delete the key")
    if key == "chat_format" and value not in ("raw", "chatml"):
        raise ValueError(f"{path}: chat_format must be 'raw' or 'chatml', got {value!r}")
    if key in ("max_new_tokens", "max_window_size") and value < 1:
        raise ValueError(f"{path}: {key} must be >= 1, got {value}")
    return value


def read_generation_defaults(folder: str) -> GenerationDefaults:
    """The folder's decoding defaults; the built-in ones where the file or a key is missing. ValueError naming the
    file and the key when a value has the wrong type (the sampling ranges are checked with the flags, later)."""
    path = os.path.join(folder, FILE)
    if not os.path.isfile(path):
        return GenerationDefaults()
    content = read_json_object(path)
    found = {f.name: _checked(path, f.name, content[f.name]) for f in fields(GenerationDefaults) if f.name in content}
    return GenerationDefaults(**found)
