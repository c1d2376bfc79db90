"""Configuration of Qwen-VL: the vision tower, the adapter, the Qwen decoder, and the released presets.

The dataclasses read and write the keys of the official `config.json` (its top level describes the LLM, its
`visual` section the ViT and adapter). Every field is type- and range-checked when a config is made, so a bad value
fails here with its name, not deep inside the model. Reading a config.json, a key we do not know and a key the
released file has but this one lacks are both errors: nothing is filled in from the 9.6B defaults.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

import torch

from .jsonfile import read_json_object

# The released code's log-n table has 32767 entries (positions 1..32767): it cannot run past that.
MAX_CONTEXT = 32767

# The compute/storage dtypes a checkpoint may name (config.json's torch_dtype, --dtype), with their short aliases.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a name ("bfloat16", "bf16", ...), a supported torch dtype, or None (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; choose one of {sorted(DTYPES)}")
        return dtype
    name = _DTYPE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES) + sorted(_DTYPE_ALIASES)}")
    return DTYPES[name]


def resolve_device(device) -> torch.device:
    """A torch device from None (the CPU), a name ("cpu", "cuda", "cuda:1") or a torch.device; a GPU that is not
    there is refused here, before anything is built."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but no CUDA GPU is visible: use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return dev


def dtype_name(dtype: torch.dtype) -> str:
    """The config.json name of a supported torch dtype."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not supported; choose one of {sorted(DTYPES)}")


# Keys the official config.json carries that describe nothing we compute (loading code, HF bookkeeping).
_IGNORED_TEXT_KEYS = {
    "architectures", "auto_map", "model_type", "tokenizer_type", "transformers_version", "torch_dtype",
    "onnx_safe", "use_flash_attn", "use_cache", "initializer_range", "max_position_embeddings",
    "attn_dropout_prob", "emb_dropout_prob", "scale_attn_weights", "bf16", "fp16", "fp32", "softmax_in_fp32",
    "use_cache_quantization", "use_cache_kernel", "_name_or_path", "do_sample", "chat_format", "max_window_size",
    "bos_token_id", "eos_token_id", "pad_token_id", "generation_config",
}
# Fields the released config.json does not carry (hard-coded in the released code): optional, default = released.
_OPTIONAL_VISION_KEYS = {"n_queries", "adapter_head_dim", "pos_grid", "layer_norm_eps"}

# Integer fields must be >= 1, except these (their lowest value); float fields must be > 0.
_INT_MINIMUM = {"image_start_id": 0}


def _check_fields(obj, section: str) -> None:
    """Type and range of every field: int (not bool), float (int accepted, finite), bool."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        name = f"{section}{f.name}"
        if f.type == "bool" and not isinstance(v, bool):
            raise ValueError(f"{name} must be true or false, got {v!r} ({type(v).__name__})")
        if f.type == "int":
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
            if v < _INT_MINIMUM.get(f.name, 1):
                raise ValueError(f"{name} must be >= {_INT_MINIMUM.get(f.name, 1)}, got {v}")
        if f.type == "float":
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r} ({type(v).__name__})")
            if v <= 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")


@dataclass
class VisionConfig:
    """ViT-bigG/14 and the position-aware adapter (the `visual` section of config.json)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096          # the LLM width: the adapter works at this width
    image_start_id: int = 151857    # <img>; </img> is +1 and <imgpad> is +2
    n_queries: int = 256            # hard-coded 256 in the released code; a perfect square (the sin-cos grid)
    adapter_head_dim: int = 128     # released code: adapter heads = output_dim // 128
    pos_grid: int = 16              # the learned ViT position table is pos_grid x pos_grid (16x16 released)
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _check_fields(self, "visual.")
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")
        if self.output_dim % self.adapter_head_dim:
            raise ValueError(f"output_dim {self.output_dim} is not divisible by adapter_head_dim {self.adapter_head_dim}")
        if math.isqrt(self.n_queries) ** 2 != self.n_queries:
            raise ValueError(f"n_queries must be a perfect square (a 2D grid of queries), got {self.n_queries}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.output_dim % 4:
            raise ValueError(f"output_dim must be a multiple of 4 (the 2D sin-cos table), got {self.output_dim}")
        if self.mlp_width < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} gives an MLP of width int({self.width} * ratio) = 0")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)  # the released code truncates: int(1664 * 4.9231) = 8192

    @property
    def adapter_heads(self) -> int:
        return self.output_dim // self.adapter_head_dim

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2


@dataclass
class TextConfig:
    """The Qwen decoder (the top level of config.json)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016   # w1 and w2 are each intermediate_size // 2 wide
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 2048           # the trained context: dynamic NTK and log-n start past it
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True             # c_attn keeps its bias regardless, as in the released code
    tie_word_embeddings: bool = False

    def __post_init__(self):
        _check_fields(self, "")
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) x kv_channels ({self.kv_channels}) must equal "
                f"hidden_size ({self.hidden_size})"
            )
        if self.intermediate_size % 2:
            raise ValueError(f"intermediate_size must be even (w1 and w2 are half of it), got {self.intermediate_size}")
        if self.rotary_pct > 1:
            raise ValueError(f"rotary_pct is the rotated share of each head, in (0, 1]; got {self.rotary_pct}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"rotary_pct {self.rotary_pct} gives {self.rotary_dim} rotary channels of {self.kv_channels}: "
                f"it must be an even number >= 2"
            )
        if self.seq_length < 2 and (self.use_logn_attn or self.use_dynamic_ntk):
            raise ValueError(f"seq_length must be >= 2 with dynamic NTK or log-n scaling, got {self.seq_length}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)


@dataclass
class QwenVLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    dtype: str = "bfloat16"          # the dtype the checkpoint is stored and computed in (bf16/fp16/fp32 flags)

    def __post_init__(self):
        if not isinstance(self.text, TextConfig) or not isinstance(self.vision, VisionConfig):
            raise TypeError("QwenVLConfig takes a TextConfig and a VisionConfig (or use from_dict / from_name)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.vision.output_dim != self.text.hidden_size:
            raise ValueError(
                f"visual output_dim ({self.vision.output_dim}) must equal the LLM hidden_size ({self.text.hidden_size})"
            )
        if self.vision.image_pad_id >= self.text.vocab_size:
            raise ValueError(f"image_start_id {self.vision.image_start_id} + 2 is outside the vocabulary {self.text.vocab_size}")

    @classmethod
    def from_name(cls, name: str) -> "QwenVLConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or pass a checkpoint folder")
        return PRESETS[name]()

    # --- official config.json ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "QwenVLConfig":
        """The config of an official config.json's content: every released key present, no unknown one."""
        if not isinstance(d, dict):
            raise ValueError(f"a config.json holds one JSON object, got {type(d).__name__}")
        d = dict(d)
        visual = d.pop("visual", None)
        if not isinstance(visual, dict):
            raise ValueError("the 'visual' section (the vision tower and adapter) is missing or not an object")
        text_names = [f.name for f in fields(TextConfig)]
        vision_names = [f.name for f in fields(VisionConfig)]
        unknown = [k for k in d if k not in text_names and k not in _IGNORED_TEXT_KEYS]
        unknown += [f"visual.{k}" for k in visual if k not in vision_names]
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown}: this is not a Qwen-VL config.json, or it comes from a newer model "
                f"this library does not implement"
            )
        missing = [k for k in text_names if k not in d]
        missing += [f"visual.{k}" for k in vision_names if k not in visual and k not in _OPTIONAL_VISION_KEYS]
        if missing:
            raise ValueError(
                f"missing config key(s) {missing}: a Qwen-VL config.json names every size of the model; nothing is "
                f"filled in from the released 9.6B model's values"
            )
        text = TextConfig(**{k: d[k] for k in text_names})
        vision = VisionConfig(**{k: v for k, v in visual.items()})
        return cls(text=text, vision=vision, dtype=_dtype_of(d))

    def to_dict(self) -> dict:
        d = asdict(self.text)
        d.update(
            architectures=["QWenLMHeadModel"], model_type="qwen", tokenizer_type="QWenTokenizer",
            bf16=self.dtype == "bfloat16", fp16=self.dtype == "float16", fp32=self.dtype == "float32",
            torch_dtype=self.dtype, scale_attn_weights=True, use_cache=True,
        )
        visual = asdict(self.vision)
        defaults = {f.name: f.default for f in fields(VisionConfig) if f.default is not MISSING}
        # the released config.json has no n_queries / adapter_head_dim / pos_grid / eps: write them only when changed
        for k in _OPTIONAL_VISION_KEYS:
            if visual[k] == defaults[k]:
                del visual[k]
        d["visual"] = visual
        return d

    @classmethod
    def from_json(cls, path) -> "QwenVLConfig":
        """The config of a checkpoint folder (or of its config.json); every problem names the file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}: a checkpoint folder holds config.json beside its weights")
        content = read_json_object(path)
        try:
            return cls.from_dict(content)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def save_json(self, path: str) -> None:
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, text: dict | None = None, vision: dict | None = None, **kw) -> "QwenVLConfig":
        return replace(
            self,
            text=replace(self.text, **(text or {})),
            vision=replace(self.vision, **(vision or {})),
            **kw,
        )


def _dtype_of(d: dict) -> str:
    """The dtype of a config.json: its fp32/fp16/bf16 flags (what the released code reads), else torch_dtype."""
    for flag in ("fp32", "fp16", "bf16"):
        if flag in d and not isinstance(d[flag], bool):
            raise ValueError(f"{flag} must be true or false, got {d[flag]!r}")
    flags = [name for flag, name in (("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16")) if d.get(flag)]
    if len(flags) > 1:
        raise ValueError(f"more than one of the flags fp32, fp16, bf16 is true ({flags}): set one")
    if flags:
        return flags[0]
    if "torch_dtype" not in d:
        return "bfloat16"  # the released default when no flag is set
    name = d["torch_dtype"]
    if name not in DTYPES:
        raise ValueError(f"torch_dtype {name!r} is not supported; choose one of {sorted(DTYPES)}")
    return name


def _qwen_vl() -> QwenVLConfig:
    return QwenVLConfig()


def _tiny() -> QwenVLConfig:
    # seconds on a CPU, every code path of the real model kept: NTK/log-n (short seq_length), interpolated position
    # tables (grid 4 or 8 vs the 16x16 table), kv_proj (width != output_dim), multi-head adapter, image spans.
    return QwenVLConfig(
        text=TextConfig(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
            intermediate_size=256, seq_length=512,
        ),
        vision=VisionConfig(
            image_size=112, patch_size=14, width=48, layers=2, heads=3, mlp_ratio=4.0, output_dim=64,
            image_start_id=300, n_queries=64, adapter_head_dim=16,
        ),
        dtype="float32",
    )


def _demo() -> QwenVLConfig:
    # the built-in training demo (`qwenvl train` with no arguments): learns to ground on the synthetic set within
    # minutes on a 2-core CPU. 56-pixel images (4x4 patches; 2x2 at stage 1's half resolution) and 16 adapter
    # queries keep an example near 100 tokens; a vocabulary just above the byte-level tokenizer's 303 ids.
    return QwenVLConfig(
        text=TextConfig(
            vocab_size=320, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32,
            intermediate_size=512, seq_length=512,
        ),
        vision=VisionConfig(
            image_size=56, patch_size=14, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=128,
            image_start_id=300, n_queries=16, adapter_head_dim=32,
        ),
        dtype="float32",
    )


PRESETS = {"qwen-vl": _qwen_vl, "qwen-vl-chat": _qwen_vl, "tiny": _tiny, "demo": _demo}
