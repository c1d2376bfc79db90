"""An independent oracle: the released Qwen-VL forward pass, step by step as its code performs it, over a state dict.

Written from the facts in QWENVL_FACTS.md in the released code's own order of operations (sequence-first ViT,
per-head interleaved in_proj split, q divided by sqrt(head_dim) before bmm, the adapter through
`F.multi_head_attention_forward` with the queries repeated per image, rotary through a cached `cat(freqs, freqs)`
table, log-n through a table of `math.log(i, seq_length)`, the causal mask through `finfo.min`, the KV cache by
concatenation). It shares no code with `qwenvl`, so agreement pins our model to the released computation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _abs_pos(abs_pos, tgt_size):
    src = int(math.sqrt(abs_pos.size(0)))
    tgt = int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    return F.interpolate(
        abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt), mode="bicubic",
        align_corners=False,
    ).permute(0, 2, 3, 1).flatten(0, 2).to(dtype=abs_pos.dtype)


def visual(sd, cfg, images):
    v = cfg.vision
    p = "transformer.visual."
    x = F.conv2d(images, sd[p + "conv1.weight"], stride=v.patch_size)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = x + _abs_pos(sd[p + "positional_embedding"], x.size(1))
    x = _ln(x, sd, p + "ln_pre")
    x = x.permute(1, 0, 2)  # LND
    hd = v.width // v.heads
    for i in range(v.layers):
        b = f"{p}transformer.resblocks.{i}."
        y = _ln(x, sd, b + "ln_1")
        sq, bsz, _ = y.shape
        mixed = F.linear(y, sd[b + "attn.in_proj.weight"], sd[b + "attn.in_proj.bias"])
        mixed = mixed.view(sq, bsz, v.heads, 3 * hd)
        q, k, vv = mixed.split(hd, dim=-1)
        q = q.reshape(sq, bsz * v.heads, hd).transpose(0, 1)
        k = k.reshape(sq, bsz * v.heads, hd).transpose(0, 1)
        vv = vv.reshape(sq, bsz * v.heads, hd).transpose(0, 1)
        probs = torch.bmm(q / math.sqrt(hd), k.transpose(-2, -1)).softmax(dim=-1)
        ctx = torch.bmm(probs, vv).view(bsz, v.heads, sq, hd).permute(2, 0, 1, 3).reshape(sq, bsz, v.width)
        x = x + F.linear(ctx, sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"])
        y = _ln(x, sd, b + "ln_2")
        y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])),
                     sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        x = x + y
    x = x.permute(1, 0, 2)  # NLD
    # the adapter, as nn.MultiheadAttention is called by the released Resampler
    a = p + "attn_pool."
    pos_embed = _abs_pos(sd[a + "pos_embed"], x.size(1))
    kv = F.linear(x, sd[a + "kv_proj.weight"]) if a + "kv_proj.weight" in sd else x
    kv = _ln(kv, sd, a + "ln_kv").permute(1, 0, 2)
    N = kv.shape[1]
    q = _ln(sd[a + "query"], sd, a + "ln_q")
    E = q.shape[-1]
    out, _ = F.multi_head_attention_forward(
        q.unsqueeze(1).repeat(1, N, 1) + sd[a + "pos_embed"].unsqueeze(1), kv + pos_embed.unsqueeze(1), kv,
        E, E // v.adapter_head_dim, sd[a + "attn.in_proj_weight"], sd[a + "attn.in_proj_bias"], None, None, False,
        0.0, sd[a + "attn.out_proj.weight"], sd[a + "attn.out_proj.bias"], training=False, need_weights=True,
    )
    x = out.permute(1, 0, 2)
    x = _ln(x, sd, p + "ln_post")
    return x @ sd[p + "proj"]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


class OfficialDecoder:
    """The released QWenModel + lm_head in eval mode, with its concatenating KV cache and its cached NTK alpha."""

    def __init__(self, sd, cfg):
        self.sd, self.cfg = sd, cfg
        t = cfg.text
        self.ntk_alpha_cached = 1.0
        self.logn = torch.tensor([math.log(i, t.seq_length) if i > t.seq_length else 1 for i in range(1, 32768)])

    def rotary(self, seqlen, ntk_alpha):
        dim = self.cfg.text.rotary_dim
        base = self.cfg.text.rotary_emb_base * ntk_alpha ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        seq = torch.arange(max(2 * seqlen, 16))
        freqs = torch.outer(seq.type_as(inv_freq), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb[None, :seqlen, None, :]

    def forward(self, input_ids, images=None, attention_mask=None, past=None):
        sd, cfg, t = self.sd, self.cfg, self.cfg.text
        v = cfg.vision
        B, T = input_ids.shape
        x = F.embedding(input_ids, sd["transformer.wte.weight"])
        if past is None and (input_ids == v.image_start_id).any():
            bos = torch.where(input_ids == v.image_start_id)
            eos = torch.where(input_ids == v.image_start_id + 1)
            feats = visual(sd, cfg, images)
            x = x.clone()
            for idx, (i, a, b) in enumerate(zip(bos[0].tolist(), bos[1].tolist(), eos[1].tolist())):
                x[i][a + 1: b] = feats[idx]
        past_len = past[0][0].shape[1] if past is not None else 0
        kv_len = T + past_len
        if t.use_dynamic_ntk and kv_len == T:
            ctx = math.log(kv_len / t.seq_length, 2) + 1
            ntk_alpha = max(2 ** math.ceil(ctx) - 1, 1)
            self.ntk_alpha_cached = ntk_alpha
        else:
            ntk_alpha = self.ntk_alpha_cached
        emb = self.rotary(kv_len, ntk_alpha)[:, -T:]
        mask_add = None
        if attention_mask is not None:
            mask_add = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        H, D = t.num_attention_heads, t.kv_channels
        presents = []
        for i in range(t.num_hidden_layers):
            b = f"transformer.h.{i}."
            y = _rms(x, sd[b + "ln_1.weight"], t.layer_norm_epsilon)
            mixed = F.linear(y, sd[b + "attn.c_attn.weight"], sd[b + "attn.c_attn.bias"])
            q, k, vv = mixed.split(t.hidden_size, dim=2)
            q, k, vv = (z.view(B, T, H, D) for z in (q, k, vv))

            def rope(z):
                zf = z.float()
                return (zf * emb.cos() + _rotate_half(zf) * emb.sin()).type_as(z)

            q, k = rope(q), rope(k)
            if past is not None:
                k = torch.cat((past[i][0], k), dim=1)
                vv = torch.cat((past[i][1], vv), dim=1)
            presents.append((k, vv))
            if t.use_logn_attn:
                start, end = k.size(1) - q.size(1), k.size(1)
                q = q * self.logn[None, start:end, None, None].type_as(q).expand_as(q)
            qh, kh, vh = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), vv.permute(0, 2, 1, 3)
            w = torch.matmul(qh, kh.transpose(-1, -2)) / torch.full([], D ** 0.5, dtype=qh.dtype)
            ql, kl = qh.size(-2), kh.size(-2)
            causal = torch.tril(torch.ones(kl, kl, dtype=torch.bool))[kl - ql: kl, :kl]
            w = torch.where(causal, w, torch.finfo(w.dtype).min)
            if mask_add is not None:
                w = w + mask_add
            w = w.softmax(dim=-1).type(vh.dtype)
            o = torch.matmul(w, vh).permute(0, 2, 1, 3).reshape(B, T, t.hidden_size)
            x = x + F.linear(o, sd[b + "attn.c_proj.weight"])
            y = _rms(x, sd[b + "ln_2.weight"], t.layer_norm_epsilon)
            y = F.linear(y, sd[b + "mlp.w1.weight"]) * F.silu(F.linear(y, sd[b + "mlp.w2.weight"]))
            x = x + F.linear(y, sd[b + "mlp.c_proj.weight"])
        x = _rms(x, sd["transformer.ln_f.weight"], t.layer_norm_epsilon)
        return F.linear(x, sd["lm_head.weight"]), presents

    def greedy(self, input_ids, images, n):
        logits, past = self.forward(input_ids, images)
        ids = input_ids
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            logits, past = self.forward(nxt, past=past)
        return ids
