"""The forwards that replace, per instance, those of the official Qwen-VL modules: same signatures, same return
conventions (the tuple `layer_past` / `present` cache included), the arithmetic on the `qwenvl_kernels` backend.

Each patched module keeps a `Patch` under `PATCH_ATTR` in its `__dict__`: the backend, the forward it replaced
(called for what the kernels do not compute: attention weights, head masks, attention dropout, masks that are not
padding) and a memo shared by the whole model (one mask parse and one rotary table per model call, not per layer).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .structure import official_module

log = logging.getLogger("qwenvl.official")
PATCH_ATTR = "_qwenvl_official_patch"


@dataclass
class Shared:
    """Per-model state: the last attention mask parsed and the last rotary table converted, and warnings given."""
    backend: object
    training_logits: bool = False
    mask_memo: tuple | None = None
    rotary_memo: tuple | None = None
    warned: set = field(default_factory=set)

    def warn_once(self, reason: str) -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            log.warning("patch_official_model: %s; that call runs the official code", reason)


@dataclass
class Patch:
    shared: Shared
    original: object  # the bound forward that was replaced
    slot: str  # "forward", or "_old_forward" under an accelerate hook
    had_instance_attr: bool


def patch_of(module) -> Patch:
    return module.__dict__[PATCH_ATTR]


# ----------------------------------------------------------------------------------------------------- the decoder

def rms_norm_forward(self, x):
    return patch_of(self).shared.backend.rms_norm(x, self.weight, self.eps)


def mlp_forward(self, hidden_states):
    kernels = patch_of(self).shared.backend
    return self.c_proj(kernels.swiglu(self.w1(hidden_states), self.w2(hidden_states)))


def block_forward(self, hidden_states, rotary_pos_emb=None, registered_causal_mask=None, layer_past=None,
                  attention_mask=None, head_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                  use_cache=False, output_attentions=False):
    kernels = patch_of(self).shared.backend
    attn_outputs = self.attn(self.ln_1(hidden_states), rotary_pos_emb, registered_causal_mask=registered_causal_mask,
                             layer_past=layer_past, attention_mask=attention_mask, head_mask=head_mask,
                             use_cache=use_cache, output_attentions=output_attentions)
    # the residual add fused into ln_2: h = attn + x, then rms_norm(h), in one pass
    normed, h = kernels.rms_norm(attn_outputs[0], self.ln_2.weight, self.ln_2.eps, residual=hidden_states)
    hidden_states = h + self.mlp(normed)
    outputs = attn_outputs[1:]
    return (hidden_states,) + (outputs if use_cache else outputs[1:])


def _rotary_tables(shared: Shared, rotary_pos_emb):
    """The official `[1, L, 1, R]` cos/sin (of cat(freqs, freqs)) as the kernels' fp32 `[L, R/2]` tables."""
    cos, sin = rotary_pos_emb[0], rotary_pos_emb[1]
    memo = shared.rotary_memo
    if memo is None or memo[0] is not cos or memo[1] is not sin:
        half = cos.shape[-1] // 2
        tables = (cos[0, :, 0, :half].float().contiguous(), sin[0, :, 0, :half].float().contiguous())
        shared.rotary_memo = memo = (cos, sin, tables)
    return memo[2]


def _key_window(shared: Shared, attention_mask, batch, q_len, k_len, past):
    """The official additive mask as left padding: ("ok", seq_start or None) or ("fallback", reason).

    Both released revisions pass a mask whose last query row is 0 for a visible key and <= finfo.min/2 for a masked
    one ([b, 1, 1, s] in the first, [b, 1, t, s] with the causal part in the later). Each row's visible keys must be
    one block [s, e): s becomes seq_start; a block ending early (right padding) is exact only in a prefill, where
    only the padded queries themselves could see the masked keys.
    """
    if attention_mask is None:
        return "ok", None
    memo = shared.mask_memo
    key = (attention_mask, attention_mask._version, batch, q_len, k_len, past)
    if memo is not None and memo[0] is attention_mask and memo[1:6] == key[1:]:
        return memo[6]
    result = _parse_mask(attention_mask, batch, q_len, k_len, past)
    shared.mask_memo = key + (result,)
    return result


def _parse_mask(mask, batch, q_len, k_len, past):
    if mask.dim() != 4 or mask.shape[0] != batch or mask.shape[1] != 1 or mask.shape[-1] != k_len \
            or mask.shape[-2] not in (1, q_len) or not mask.is_floating_point():
        return "fallback", f"an attention mask of shape {tuple(mask.shape)} for {q_len} queries and {k_len} keys"
    row = mask[:, 0, -1, :]
    visible = row == 0
    hidden = row <= torch.finfo(row.dtype).min / 2
    flags = torch.stack([visible, visible | hidden]).cpu()  # the one host sync of a model call
    visible, decided = flags[0], flags[1]
    if not bool(decided.all()):
        return "fallback", "an attention mask with values other than 0 and finfo.min"
    starts, padded = [], False
    for r in range(batch):
        idx = visible[r].nonzero().flatten().tolist()
        start, end = (idx[0], idx[-1] + 1) if idx else (k_len, k_len)
        if end - start != len(idx) or (end < k_len and past > 0):
            return "fallback", "an attention mask that masks keys between visible ones (not left padding)"
        starts.append(start)
        padded |= start > 0
    if not padded:
        return "ok", None
    return "ok", torch.tensor(starts, dtype=torch.int32, device=mask.device)


def attention_forward(self, hidden_states, rotary_pos_emb=None, registered_causal_mask=None, layer_past=None,
                      attention_mask=None, head_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                      output_attentions=False, use_cache=False):
    patch = patch_of(self)
    shared, kernels = patch.shared, patch.shared.backend
    reason = None
    if output_attentions:
        reason = "output_attentions=True (the kernels never form the attention weights)"
    elif head_mask is not None:
        reason = "a head_mask"
    elif self.training and self.attn_dropout.p > 0:
        reason = f"attention dropout p={self.attn_dropout.p} in training"
    elif rotary_pos_emb is None:
        reason = "no rotary_pos_emb"
    B, T = hidden_states.shape[:2]
    past = 0 if layer_past is None else layer_past[0].shape[1]
    S = past + T
    if reason is None:
        verdict, seq_start = _key_window(shared, attention_mask, B, T, S, past)
        if verdict == "fallback":
            reason = seq_start
    if reason is not None:
        shared.warn_once(reason)
        return patch.original(hidden_states, rotary_pos_emb, registered_causal_mask, layer_past, attention_mask,
                              head_mask, encoder_hidden_states, encoder_attention_mask, output_attentions, use_cache)

    query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
    query = query.view(B, T, self.num_heads, self.head_dim)
    key = key.view(B, T, self.num_heads, self.head_dim)
    value = value.view(B, T, self.num_heads, self.head_dim)
    cos, sin = _rotary_tables(shared, rotary_pos_emb)
    L = cos.shape[0]  # the released code rotates the last T rows of its table: positions L-T .. L-1
    positions = torch.arange(L - T, L, device=query.device)
    query, key = kernels.apply_rotary(query, key, cos, sin, positions)
    if layer_past is not None:
        key = torch.cat((layer_past[0], key), dim=1)
        value = torch.cat((layer_past[1], value), dim=1)
    present = (key, value) if use_cache else None
    if self.use_logn_attn and not self.training and S > self.seq_length:  # below seq_length the factor is 1
        if self.logn_tensor.device != query.device or self.logn_tensor.dtype != query.dtype:
            self.logn_tensor = self.logn_tensor.to(query.device).type_as(query)  # as the released code caches it
        query = query * self.logn_tensor[:, S - T:S, :, :].expand_as(query)
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if past > 0 and T <= 16 and not grads:
        lengths = torch.full((B,), S, dtype=torch.int32, device=query.device)
        out = kernels.decode_attention(query, key, value, lengths, seq_start)
    else:
        out = kernels.attention(query, key, value, causal=True, seq_start=seq_start)
    return self.c_proj(out.reshape(B, T, self.hidden_size)), present


def lm_head_forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                    position_ids=None, head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, labels=None, use_cache=None, output_attentions=None,
                    output_hidden_states=None, return_dict=None):
    passed = dict(locals())  # every argument but labels goes on to QWenModel, as the released forward passes them
    del passed["self"], passed["labels"]
    shared = patch_of(self).shared
    return_dict = passed["return_dict"] = return_dict if return_dict is not None else self.config.use_return_dict
    transformer_outputs = self.transformer(passed.pop("input_ids"), **passed)
    hidden = transformer_outputs[0]
    loss = lm_logits = None
    if labels is not None:
        # the released loss: logits[..., :-1] against labels[..., 1:], mean over labels != -100; fused with the head
        labels = labels.to(hidden.device)
        loss = shared.backend.linear_cross_entropy(hidden[..., :-1, :].reshape(-1, hidden.shape[-1]),
                                                   self.lm_head.weight, labels[..., 1:].reshape(-1))
    if labels is None or shared.training_logits or not (self.training and torch.is_grad_enabled()):
        lm_logits = self.lm_head(hidden)  # training with labels skips the [tokens, vocab] logits
    if not return_dict:
        output = (lm_logits,) + tuple(transformer_outputs[1:])
        return ((loss,) + output) if loss is not None else output
    output_class = official_module(self, "QWenLMHeadModel").CausalLMOutputWithPast
    return output_class(loss=loss, logits=lm_logits, past_key_values=transformer_outputs.past_key_values,
                        hidden_states=transformer_outputs.hidden_states, attentions=transformer_outputs.attentions)


# ------------------------------------------------------------------------------------------------ the vision tower

def layer_norm_forward(self, input):
    return patch_of(self).shared.backend.layer_norm(input, self.weight, self.bias, self.eps)


def visual_attention_forward(self, query, key, value, attn_mask=None):
    patch = patch_of(self)
    if attn_mask is not None or key is not query or value is not query:
        patch.shared.warn_once("a ViT attention mask or cross-attention inputs")
        return patch.original(query, key, value, attn_mask)
    sq, b, _ = query.shape
    heads, hd = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
    # sequence-first [s, b, heads, q|k|v]: the batch-first views the kernel reads are strided, not copied
    qkv = self.in_proj(query).view(sq, b, heads, 3, hd).transpose(0, 1)
    out = patch.shared.backend.attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :], causal=False)
    return self.out_proj(out.transpose(0, 1).reshape(sq, b, self.hidden_size_per_partition))


def resampler_forward(self, x, attn_mask=None):
    patch = patch_of(self)
    mha = self.attn
    if attn_mask is not None or (self.training and mha.dropout > 0):
        patch.shared.warn_once("a resampler attention mask or attention dropout")
        return patch.original(x, attn_mask)
    pos_k = official_module(self, "Resampler").get_abs_pos(self.pos_embed, x.size(1))
    kv = self.ln_kv(self.kv_proj(x))
    return patch.shared.backend.resampler_attention(
        self.ln_q(self.query), self.pos_embed, kv, pos_k, mha.in_proj_weight, mha.in_proj_bias,
        mha.out_proj.weight, mha.out_proj.bias, mha.num_heads)


FORWARDS = {
    "QWenLMHeadModel": lm_head_forward,
    "QWenBlock": block_forward,
    "QWenAttention": attention_forward,
    "QWenMLP": mlp_forward,
    "RMSNorm": rms_norm_forward,
    "VisualAttention": visual_attention_forward,
    "Resampler": resampler_forward,
    "LayerNorm": layer_norm_forward,
}


def is_ours(fn) -> bool:
    return getattr(fn, "__func__", None) in FORWARDS.values()
