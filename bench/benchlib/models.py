"""Model parts for the model-level cases: the configurations (reduced depth at real width on CUDA, a shrunk "tiny"
preset on the CPU), building on the device, random weights, a vision-language batch, switching backends."""
from __future__ import annotations

import gc
from typing import Callable

import torch

from .env import DEVICE, DTYPE, ON_CUDA, OURS, first_line, require_triton


class Lazy:
    """Build something expensive once, on first use inside a test (so a failure is recorded against that case);
    a failed build is remembered and re-raised, not retried by every later case."""

    def __init__(self, build: Callable):
        self._build = build
        self._value = None
        self._error: BaseException | None = None

    def __call__(self):
        if self._error is not None:
            raise RuntimeError(f"setup failed earlier: {first_line(self._error)}")
        if self._value is None:
            try:
                self._value = self._build()
            except Exception as e:
                self._error = e
                raise
        return self._value

    def release(self):
        self._value = None
        gc.collect()
        if ON_CUDA:
            torch.cuda.empty_cache()


def model_config():
    """The reduced-depth, real-width model of the targets on CUDA (ViT 8 of 48 layers, decoder 4 of 32); the "tiny"
    preset on the CPU."""
    from qwenvl.config import QwenVLConfig

    if ON_CUDA:
        return QwenVLConfig.from_name("qwen-vl").replace(text=dict(num_hidden_layers=4), vision=dict(layers=8))
    return cpu_config()


def cpu_config():
    """The "tiny" preset shrunk further for the Triton interpreter: 4x4 patches and 16 queries (every code path of
    the real model kept: interpolated position tables, kv_proj, multi-head adapter, NTK/log-n)."""
    from qwenvl.config import QwenVLConfig

    return QwenVLConfig.from_name("tiny").replace(vision=dict(image_size=56, n_queries=16))


def vision_config():
    """The whole vision tower's configuration (all 48 layers on CUDA)."""
    from qwenvl.config import QwenVLConfig

    return (QwenVLConfig.from_name("qwen-vl") if ON_CUDA else cpu_config()).vision


def build_on_device(factory: Callable[[], torch.nn.Module], dtype=DTYPE) -> torch.nn.Module:
    """Build a module straight on the device (no host copy of billions of parameters), then cast: fp32 initializers
    (trunc_normal_, the sin-cos tables) run in fp32 and the result is stored in the bench dtype."""
    with torch.device(DEVICE):
        m = factory()
    return m.to(device=DEVICE, dtype=dtype)


def init_params_(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Random weights for a part built on its own (QwenVL initializes itself; its towers alone start empty): norms'
    weights one, biases zero, matrices N(0, std). Fixed tables (requires_grad False) are left as built."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            leaf_name = name.rsplit(".", 1)[-1]
            if p.dim() == 1 and leaf_name == "weight":
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std)
    return module


def set_kernels(module: torch.nn.Module, name: str) -> None:
    """Point `module` and every submodule that calls kernels at the backend `name`: the model's own switch
    (`QwenVL.set_kernels`), which walks any module tree, so it serves single layers and towers too."""
    from qwenvl.model import QwenVL

    if name == OURS:
        require_triton()
    QwenVL.set_kernels(module, name)


def decoder_rope(cfg, T: int):
    """The rotary inputs of one forward over T tokens from position 0 (no NTK scaling, no log-n)."""
    from qwenvl.text import RotaryEmbedding, token_positions

    rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rotary_emb_base)
    return rotary.inputs(token_positions(T, device=DEVICE), [1.0], T)


def vl_batch(cfg, batch: int, n_text: int, labels: bool = True, seed: int = 0):
    """`batch` rows of one image span (<img>, n_queries pads, </img>) then `n_text` random text ids; labels ignore
    the span; pixel values `[batch, 3, S, S]`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = cfg.vision
    n = v.n_queries
    top = min(cfg.text.vocab_size, v.image_start_id)
    ids = torch.randint(0, top, (batch, n + 2 + n_text), generator=g)
    ids[:, 0] = v.image_start_id
    ids[:, 1:1 + n] = v.image_pad_id
    ids[:, 1 + n] = v.image_end_id
    lab = ids.clone()
    lab[:, :n + 2] = -100
    pixels = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
    return ids.to(DEVICE), (lab.to(DEVICE) if labels else None), pixels.to(DEVICE, DTYPE)


def make_optimizer(params):
    params = [p for p in params if p.requires_grad]
    if ON_CUDA:
        try:
            return torch.optim.AdamW(params, lr=1e-5, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=1e-5, foreach=ON_CUDA)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
