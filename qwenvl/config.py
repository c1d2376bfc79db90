"""Configuration of Qwen-VL: the vision tower, the adapter, the Qwen decoder, and the released presets.

The dataclasses read and write the keys of the official `config.json` (its top level describes the LLM, its
`visual` section the ViT and adapter). Keys we do not know raise an error instead of being dropped silently.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace

# Keys the official config.json carries that describe nothing we compute (loading code, HF bookkeeping).
_IGNORED_TEXT_KEYS = {
    "architectures", "auto_map", "model_type", "tokenizer_type", "transformers_version", "torch_dtype",
    "onnx_safe", "use_flash_attn", "use_cache", "initializer_range", "max_position_embeddings",
    "attn_dropout_prob", "emb_dropout_prob", "scale_attn_weights", "bf16", "fp16", "fp32", "softmax_in_fp32",
    "use_cache_quantization", "use_cache_kernel", "_name_or_path", "do_sample", "chat_format", "max_window_size",
    "bos_token_id", "eos_token_id", "pad_token_id", "generation_config",
}


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
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")
        if self.output_dim % self.adapter_head_dim:
            raise ValueError(f"output_dim {self.output_dim} is not divisible by adapter_head_dim {self.adapter_head_dim}")
        if math.isqrt(self.n_queries) ** 2 != self.n_queries:
            raise ValueError(f"n_queries must be a perfect square (a 2D grid of queries), got {self.n_queries}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

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
        if self.num_attention_heads * self.kv_channels != self.hidden_size:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) x kv_channels ({self.kv_channels}) must equal "
                f"hidden_size ({self.hidden_size})"
            )
        if self.intermediate_size % 2:
            raise ValueError(f"intermediate_size must be even (w1 and w2 are half of it), got {self.intermediate_size}")

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
        d = dict(d)
        visual = dict(d.pop("visual", {}))
        text_names = {f.name for f in fields(TextConfig)}
        vision_names = {f.name for f in fields(VisionConfig)}
        unknown = [k for k in d if k not in text_names and k not in _IGNORED_TEXT_KEYS]
        unknown += [f"visual.{k}" for k in visual if k not in vision_names]
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown}: this is not a Qwen-VL config.json, or it comes from a newer model "
                f"this library does not implement"
            )
        if d.get("fp32"):
            dtype = "float32"
        elif d.get("fp16"):
            dtype = "float16"
        elif d.get("bf16") or "torch_dtype" not in d:
            dtype = "bfloat16"
        else:
            dtype = d["torch_dtype"]
        text = TextConfig(**{k: v for k, v in d.items() if k in text_names})
        vision_kw = {k: v for k, v in visual.items() if k in vision_names}
        vision_kw.setdefault("output_dim", text.hidden_size)
        return cls(text=text, vision=VisionConfig(**vision_kw), dtype=dtype)

    def to_dict(self) -> dict:
        d = asdict(self.text)
        d.update(
            architectures=["QWenLMHeadModel"], model_type="qwen", tokenizer_type="QWenTokenizer",
            bf16=self.dtype == "bfloat16", fp16=self.dtype == "float16", fp32=self.dtype == "float32",
            torch_dtype=self.dtype, scale_attn_weights=True, use_cache=True,
        )
        visual = asdict(self.vision)
        defaults = VisionConfig()
        # the released config.json has no n_queries / adapter_head_dim / pos_grid / eps: write them only when changed
        for k in ("n_queries", "adapter_head_dim", "pos_grid", "layer_norm_eps"):
            if visual[k] == getattr(defaults, k):
                del visual[k]
        d["visual"] = visual
        return d

    @classmethod
    def from_json(cls, path: str) -> "QwenVLConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}: a checkpoint folder holds config.json beside its weights")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

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
