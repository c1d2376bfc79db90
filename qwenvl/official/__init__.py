"""`patch_official_model`: the model built by the official Qwen-VL remote code, accelerated in place.

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen-VL-Chat", trust_remote_code=True)
    patch_official_model(model, kernels="auto")   # returns the same model

Only that instance changes: its modules' forwards are replaced on the instances (never on the classes, so another
official model in the same process runs as before); parameters, buffers and state_dict keys stay as they are. The
whole model is checked first (structure, quantization, transformers version) and nothing changes when a check
fails. `patch_official_model(model, kernels=None)` or `unpatch_official_model(model)` restores the released forwards.
"""
from __future__ import annotations

import math
import types

import torch
from torch import nn

from qwenvl_kernels import get_backend

from .forwards import FORWARDS, PATCH_ATTR, Patch, Shared, is_ours
from .structure import UnsupportedOfficialModel, check_transformers, plan

__all__ = ["patch_official_model", "unpatch_official_model", "is_patched", "UnsupportedOfficialModel"]

_ROOT_ATTR = "_qwenvl_official"


def patch_official_model(model: nn.Module, kernels: str | None = "auto", *, training_logits: bool = False,
                         allow_unknown_transformers: bool = False) -> nn.Module:
    """Run the official QWenLMHeadModel `model` on qwenvl_kernels, in place; returns `model`.

    kernels: "auto" (Triton on CUDA, the torch reference elsewhere), "triton", "torch", or None to unpatch.
    training_logits: in training with `labels` the LM head and the loss run fused and `outputs.logits` is None
        (the [tokens, 151936] logits are never formed); True computes the logits as well.
    allow_unknown_transformers: patch a model built by a transformers version outside 4.32 <= version < 6.

    Patched: the decoder attention (rotary with its dynamic NTK table, log-n, causal and left-padding masks, the
    tuple `layer_past`/`present` cache), RMSNorm (fused with the residual add inside each block), the SwiGLU MLP,
    the ViT attention and LayerNorms, the resampler's cross-attention, the LM head with its loss. Calls the kernels
    do not serve (output_attentions, head_mask, attention dropout in training, masks that are not padding) run the
    released forward of that module, with a warning.
    Raises UnsupportedOfficialModel (and changes nothing) for an unknown structure, a quantized model or an
    unknown transformers version.
    """
    if kernels is None:
        return unpatch_official_model(model)
    backend = get_backend(kernels)  # an unknown name or an unavailable backend fails here, before any change
    targets = plan(model)
    version = check_transformers(model, allow_unknown_transformers)
    unpatch_official_model(model)  # a re-patch (e.g. another backend) starts from the released forwards
    shared = Shared(backend=backend, training_logits=training_logits)
    patched = []
    for path, module, kind in targets:
        fn = FORWARDS.get(kind)
        if fn is not None:
            _install(module, fn, shared)
            patched.append(path)
    compat = _repair_for_transformers5(model) if version is not None and int(version.split(".")[0]) >= 5 else []
    model.__dict__[_ROOT_ATTR] = {"kernels": backend.name, "modules": patched, "compat": compat}
    return model


def unpatch_official_model(model: nn.Module) -> nn.Module:
    """Restore the released forwards of a model patched by `patch_official_model` (a no-op otherwise)."""
    for module in model.modules():
        patch = module.__dict__.pop(PATCH_ATTR, None)
        if patch is None:
            continue
        if patch.had_instance_attr:
            module.__dict__[patch.slot] = patch.original
        else:
            module.__dict__.pop(patch.slot, None)
    state = model.__dict__.pop(_ROOT_ATTR, None)
    if state and "get_head_mask" in state["compat"]:
        model.transformer.__dict__.pop("get_head_mask", None)
    return model


def is_patched(model: nn.Module) -> str | None:
    """The kernels name a patched model runs on, or None."""
    state = model.__dict__.get(_ROOT_ATTR)
    return state["kernels"] if state else None


def _install(module: nn.Module, fn, shared: Shared) -> None:
    # under an accelerate hook (device_map), the hook's forward stays and calls ours through `_old_forward`
    slot = "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"
    had = slot in module.__dict__
    original = getattr(module, slot)
    assert not is_ours(original)
    module.__dict__[PATCH_ATTR] = Patch(shared=shared, original=original, slot=slot, had_instance_attr=had)
    module.__dict__[slot] = types.MethodType(fn, module)


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    """transformers 4's PreTrainedModel.get_head_mask, which the released QWenModel.forward calls."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    return head_mask.to(dtype=self.dtype)


def _repair_for_transformers5(model) -> list[str]:
    """What the released code needs to run on transformers 5, on this instance only.

    transformers 5 dropped PreTrainedModel.get_head_mask, and builds models on the meta device, where the plain
    (non-buffer) tensors of the released code never get values: the rotary inverse frequencies and the log-n table.
    """
    repaired = []
    decoder = model.transformer
    if not hasattr(decoder, "get_head_mask"):
        decoder.__dict__["get_head_mask"] = types.MethodType(_get_head_mask, decoder)
        repaired.append("get_head_mask")
    device = decoder.wte.weight.device
    rotary = decoder.rotary_emb
    if rotary.inv_freq.is_meta:
        rotary.inv_freq = 1.0 / (rotary.base ** (torch.arange(0, rotary.dim, 2, device=device).float() / rotary.dim))
        rotary._seq_len_cached, rotary._rotary_pos_emb_cache = 0, None
        repaired.append("rotary_emb.inv_freq")
    for block in decoder.h:
        attn = block.attn
        if attn.logn_tensor.is_meta:
            n = attn.logn_tensor.shape[1]
            logn = [math.log(i, attn.seq_length) if i > attn.seq_length else 1 for i in range(1, n + 1)]
            attn.logn_tensor = torch.tensor(logn, device=device)[None, :, None, None]
            repaired.append("logn_tensor")
    return repaired
