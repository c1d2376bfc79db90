"""What `patch_official_model` can serve, checked over the whole model before anything changes.

The official remote code is recognized by its class names, its attribute names and the signatures of the forwards
the patch replaces or relies on (the released Qwen-VL / Qwen-VL-Chat revisions share them); a model that differs,
a quantized one, or one built by a transformers version outside the known range is refused with a message that
names the module, the class and what was found.
"""
from __future__ import annotations

import inspect
import sys

import torch
from torch import nn

# the released code pins transformers 4.32.0; transformers 5 runs it once the instance is repaired (see compat.py)
KNOWN_TRANSFORMERS = ((4, 32), (6, 0))

QWEN_ATTENTION_ARGS = ("hidden_states", "rotary_pos_emb", "registered_causal_mask", "layer_past", "attention_mask",
                       "head_mask", "encoder_hidden_states", "encoder_attention_mask", "output_attentions",
                       "use_cache")
QWEN_BLOCK_ARGS = ("hidden_states", "rotary_pos_emb", "registered_causal_mask", "layer_past", "attention_mask",
                   "head_mask", "encoder_hidden_states", "encoder_attention_mask", "use_cache", "output_attentions")
LM_HEAD_ARGS = ("input_ids", "past_key_values", "attention_mask", "token_type_ids", "position_ids", "head_mask",
                "inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "labels", "use_cache",
                "output_attentions", "output_hidden_states", "return_dict")
QWEN_MODEL_ARGS = tuple(a for a in LM_HEAD_ARGS if a != "labels")

# class name -> (the forward's parameters, attributes the patched forward reads)
OFFICIAL = {
    "QWenLMHeadModel": (LM_HEAD_ARGS, ("transformer", "lm_head", "config")),
    "QWenModel": (QWEN_MODEL_ARGS, ("wte", "h", "ln_f", "rotary_emb", "visual", "config")),
    "QWenBlock": (QWEN_BLOCK_ARGS, ("ln_1", "attn", "ln_2", "mlp")),
    "QWenAttention": (QWEN_ATTENTION_ARGS, ("c_attn", "c_proj", "num_heads", "head_dim", "split_size", "hidden_size",
                                           "seq_length", "use_logn_attn", "logn_tensor", "attn_dropout")),
    "QWenMLP": (("hidden_states",), ("w1", "w2", "c_proj")),
    "RMSNorm": (("x",), ("weight", "eps")),
    "VisionTransformer": (("x",), ("conv1", "positional_embedding", "ln_pre", "transformer", "attn_pool", "ln_post",
                                   "proj", "encode")),
    "VisualAttention": (("query", "key", "value", "attn_mask"),
                        ("in_proj", "out_proj", "num_attention_heads_per_partition",
                         "hidden_size_per_attention_head", "hidden_size_per_partition")),
    "Resampler": (("x", "attn_mask"), ("pos_embed", "query", "kv_proj", "attn", "ln_q", "ln_kv")),
}
# every one of these must be found: the patch is all or nothing
REQUIRED = ("QWenLMHeadModel", "QWenModel", "QWenBlock", "QWenAttention", "QWenMLP", "RMSNorm", "VisionTransformer",
            "VisualAttention", "Resampler")

# where quantized layers come from (module paths), and their usual class names
_QUANTIZED_HINTS = ("bitsandbytes", "gptq", "awq", "quanto", "hqq", "eetq", "aqlm", "torchao", "quantiz")
_QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt", "QuantLinear", "WQLinear", "QLinear", "FP8Linear")
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


class UnsupportedOfficialModel(ValueError):
    """The model is not one `patch_official_model` can serve; nothing was changed."""


def official_name(module: nn.Module) -> str | None:
    """The official class a module is (or derives from, e.g. transformers' auto classes add GenerationMixin)."""
    for cls in type(module).__mro__:
        if cls.__name__ in OFFICIAL:
            return cls.__name__
    return None


def official_class(module: nn.Module, name: str) -> type:
    return next(cls for cls in type(module).__mro__ if cls.__name__ == name)


def official_module(module: nn.Module, name: str):
    """The Python module that defines the official class (its helpers, e.g. visual.py's get_abs_pos, live there)."""
    return sys.modules.get(official_class(module, name).__module__)


def _structure_error(path, module, detail):
    return UnsupportedOfficialModel(
        f"patch_official_model: {path or 'the model'} ({type(module).__name__}) does not have the structure of the "
        f"released Qwen-VL remote code: {detail}. It patches a QWenLMHeadModel built by the official remote code "
        f"(AutoModelForCausalLM.from_pretrained('Qwen/Qwen-VL-Chat' or a copy, trust_remote_code=True)); for "
        f"anything else use qwenvl.QwenVL, which loads the same checkpoints."
    )


def _quantized_error(what):
    return UnsupportedOfficialModel(
        f"patch_official_model: the model is quantized ({what}); the kernels read the weights as fp32, fp16 or bf16 "
        f"tensors. Load the checkpoint unquantized (without load_in_8bit / load_in_4bit / a GPTQ or AWQ "
        f"quantization_config) to patch it."
    )


def check_transformers(model: nn.Module, allow_unknown: bool) -> str | None:
    """The transformers version behind a transformers-built model, refused outside KNOWN_TRANSFORMERS."""
    if not any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
               for cls in type(model).__mro__):
        return None  # a plain-module build of the same structure: nothing of transformers is involved
    import transformers

    version = transformers.__version__
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        parts = None
    (lo, hi) = KNOWN_TRANSFORMERS
    if not allow_unknown and (parts is None or not lo <= parts < hi):
        raise UnsupportedOfficialModel(
            f"patch_official_model: transformers {version} is not a version it knows (it knows "
            f"{lo[0]}.{lo[1]} <= version < {hi[0]}.{hi[1]}; the released Qwen-VL code pins 4.32.0). Install a known "
            f"version, or pass allow_unknown_transformers=True to patch anyway."
        )
    return version


def check_quantization(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if qc is not None or getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        method = getattr(qc, "quant_method", None) or (qc.get("quant_method") if isinstance(qc, dict) else None)
        raise _quantized_error(f"quantization_config {method or qc!r}")
    for path, module in model.named_modules():
        cls = type(module)
        if any(hint in cls.__module__.lower() for hint in _QUANTIZED_HINTS) or cls.__name__ in _QUANTIZED_CLASSES:
            raise _quantized_error(f"{path} is a {cls.__module__}.{cls.__name__}")
        for name, p in module.named_parameters(recurse=False):
            if p.dtype not in _FLOAT:
                raise _quantized_error(f"{path}.{name} holds {p.dtype} ({type(p).__name__})")


def _check_forward_slot(path, module):
    """The instance's forward is the class's, or accelerate's hook around it, or ours (a re-patch)."""
    from .forwards import is_ours

    own = module.__dict__.get("forward")
    if own is None or is_ours(own):
        return
    if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
        inner = module.__dict__.get("_old_forward", module._old_forward)
        if is_ours(inner) or getattr(inner, "__func__", None) is getattr(type(module), "forward", None):
            return
    raise _structure_error(path, module, f"its forward was replaced on the instance by {own!r}; the patch needs the "
                                         f"released forward (patch before wrapping or compiling the model)")


def _check_module(path, module, name):
    args, attrs = OFFICIAL[name]
    params = tuple(inspect.signature(type(module).forward).parameters)[1:]  # the forward that runs
    if params != args:
        raise _structure_error(path, module, f"{name}.forward takes {params}, the released one {args}")
    missing = [a for a in attrs if not hasattr(module, a)]
    if missing:
        raise _structure_error(path, module, f"no attribute {', '.join(missing)}")
    _check_forward_slot(path, module)
    if name == "QWenAttention":
        if module.num_heads * module.head_dim != module.hidden_size or module.split_size != module.hidden_size:
            raise _structure_error(path, module, f"heads {module.num_heads} x head_dim {module.head_dim} != hidden "
                                                 f"{module.hidden_size}")
        if not getattr(module, "scale_attn_weights", True):
            raise _structure_error(path, module, "scale_attn_weights is False (the released code scales by "
                                                 "1/sqrt(head_dim))")
    elif name == "Resampler":
        mha = module.attn
        if not isinstance(mha, nn.MultiheadAttention) or mha.in_proj_weight is None or mha.in_proj_bias is None \
                or mha.batch_first or mha.bias_k is not None or mha.add_zero_attn:
            raise _structure_error(path, module, "attn is not the released nn.MultiheadAttention(embed_dim, heads)")
        if not hasattr(official_module(module, name), "get_abs_pos"):
            raise _structure_error(path, module, "its module defines no get_abs_pos")
    elif name == "QWenLMHeadModel":
        head = module.lm_head
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise _structure_error(path, module, f"lm_head is {head!r}, not a Linear without bias")
        if not hasattr(official_module(module, name), "CausalLMOutputWithPast"):
            raise _structure_error(path, module, "its module defines no CausalLMOutputWithPast")


def plan(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path, module, kind) for every module the patch replaces a forward of, after checking all of them.

    kind is an official class name, or "LayerNorm" for the vision tower's nn.LayerNorm instances.
    """
    if official_name(model) != "QWenLMHeadModel":
        raise _structure_error("", model, "the model is not a QWenLMHeadModel")
    check_quantization(model)
    found, targets = set(), []
    for path, module in model.named_modules():
        name = official_name(module)
        if name is not None:
            _check_module(path, module, name)
            found.add(name)
            targets.append((path, module, name))
        elif isinstance(module, nn.LayerNorm) and path.startswith("transformer.visual."):
            if type(module) is not nn.LayerNorm or not module.elementwise_affine or len(module.normalized_shape) != 1:
                raise _structure_error(path, module, "a vision LayerNorm that is not a plain affine nn.LayerNorm")
            _check_forward_slot(path, module)
            targets.append((path, module, "LayerNorm"))
    missing = [n for n in REQUIRED if n not in found]
    if missing:
        raise _structure_error("", model, f"no {', '.join(missing)} inside")
    return targets
