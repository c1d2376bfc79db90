"""Qwen-VL: the ViT's image features written into the token stream of the Qwen decoder.

`QwenVL(config, kernels="auto")` owns `transformer` (wte, h, ln_f and visual, as in the released checkpoint) and
`lm_head`. Each `<img>` ... `</img>` span of n_queries ids (256 released) receives one image's adapter output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from qwenvl_kernels import get_backend

from .config import QwenVLConfig
from .text import KVCache, QWenBlock, RMSNorm, RotaryEmbedding, logn_scale, ntk_alpha
from .vision import VisionTransformer

# The released code's log-n table has 32767 entries (positions 1..32767): it cannot run past that.
MAX_CONTEXT = 32767


@dataclass
class QwenVLOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None


class QWenTransformer(nn.Module):
    """`transformer`: the decoder stack and the vision tower, named as in the released checkpoint."""

    def __init__(self, config: QwenVLConfig, kernels):
        super().__init__()
        t = config.text
        self.wte = nn.Embedding(t.vocab_size, t.hidden_size)
        self.h = nn.ModuleList(QWenBlock(t, kernels) for _ in range(t.num_hidden_layers))
        self.ln_f = RMSNorm(t.hidden_size, t.layer_norm_epsilon, kernels)
        self.visual = VisionTransformer(config.vision, kernels)
        self.rotary_emb = RotaryEmbedding(t.rotary_dim, t.rotary_emb_base)
        self.grad_checkpointing = False


class QwenVL(nn.Module):
    def __init__(self, config: QwenVLConfig, kernels="auto"):
        super().__init__()
        self.config = config
        self.kernels = get_backend(kernels)
        self.transformer = QWenTransformer(config, self.kernels)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    # --- construction ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Random initialization for training from scratch, following the released code's scheme."""
        n_layers = self.config.text.num_hidden_layers
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                # residual output projections are scaled down with depth (GPT-2 style), as in the released code
                s = std / math.sqrt(2 * n_layers) if name.endswith("c_proj") and ".h." in f".{name}" else std
                nn.init.normal_(m.weight, std=s)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        v = self.transformer.visual
        nn.init.normal_(v.positional_embedding, std=v.cfg.width**-0.5)
        nn.init.normal_(v.proj, std=v.cfg.output_dim**-0.5)
        nn.init.trunc_normal_(v.attn_pool.query, std=std)
        nn.init.xavier_uniform_(v.attn_pool.attn.in_proj_weight)  # as nn.MultiheadAttention, the released module
        nn.init.zeros_(v.attn_pool.attn.in_proj_bias)
        for m in self.modules():
            if hasattr(m, "weight") and type(m).__name__ in ("RMSNorm", "LayerNorm"):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def set_kernels(self, kernels) -> None:
        """Switch every module to another backend ("torch", "triton", "auto")."""
        self.kernels = get_backend(kernels)
        for m in self.modules():
            if hasattr(m, "kernels") and m is not self:
                m.kernels = self.kernels

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.grad_checkpointing = enabled
        self.transformer.visual.transformer.grad_checkpointing = enabled

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, kernels="auto") -> "QwenVL":
        from .checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, kernels=kernels)

    def save_pretrained(self, path, max_shard_bytes: int = 4 << 30) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    def parameter_counts(self) -> dict:
        """Parameters of the ViT (with ln_post and proj), the adapter, the LLM, and in total."""
        visual = self.transformer.visual
        adapter = sum(p.numel() for p in visual.attn_pool.parameters())
        vit = sum(p.numel() for p in visual.parameters()) - adapter
        total = sum(p.numel() for p in self.parameters())
        return {"vit": vit, "adapter": adapter, "llm": total - vit - adapter, "total": total}

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # --- images ---------------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[num_images, 3, H, W]` normalized pixels -> `[num_images, n_queries, hidden]` features for the spans."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a [num_images, 3, H, W] tensor, got {shape}")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be floating point (normalized pixels), got {pixel_values.dtype}: "
                f"use qwenvl.processing.load_image to turn images into model inputs"
            )
        p = self.config.vision.patch_size
        H, W = pixel_values.shape[-2:]
        if H != W or H % p:
            raise ValueError(f"pixel_values must be square with a side divisible by the patch size {p}, got {H}x{W}")
        return self.transformer.visual(pixel_values.to(self.device))

    def _image_positions(self, input_ids):
        """(row, [N, n_queries] positions) of the image spans, or None; checks that every span is well formed."""
        v = self.config.vision
        n = v.n_queries
        starts = (input_ids == v.image_start_id).nonzero()
        n_ends = int((input_ids == v.image_end_id).sum())
        if starts.shape[0] == 0 and n_ends == 0:
            return None
        T = input_ids.shape[1]
        rows, cols = starts[:, 0], starts[:, 1]
        end_at = cols + n + 1
        ok = (end_at < T) & (input_ids[rows, end_at.clamp(max=T - 1)] == v.image_end_id)
        if not bool(ok.all()) or n_ends != starts.shape[0]:
            raise ValueError(
                f"malformed image span: each <img> (id {v.image_start_id}) must be followed by exactly {n} ids and "
                f"then </img> (id {v.image_end_id}); build prompts with the tokenizer, which pads each span"
            )
        return rows, cols[:, None] + 1 + torch.arange(n, device=input_ids.device)

    # --- forward --------------------------------------------------------------------------------------------------
    def _padding(self, attention_mask, T_total, use_cache):
        """Index of each row's first real token from a 0/1 mask, or None when no row is left-padded."""
        m = attention_mask.to(torch.int32)
        if m.dim() != 2 or m.shape[1] != T_total:
            raise ValueError(f"attention_mask must be [batch, {T_total}] (past + new tokens), got {tuple(m.shape)}")
        ones = m.sum(1)
        first = torch.argmax(m, dim=1)
        idx = torch.arange(T_total, device=m.device)[None]
        expected = ((idx >= first[:, None]) & (idx < (first + ones)[:, None])).to(torch.int32)
        if not torch.equal(expected, m):
            raise ValueError(
                "attention_mask must be padding only: zeros on the left (batched generation) and/or on the right "
                "(training batches), ones in between"
            )
        if (ones == 0).any():
            raise ValueError("attention_mask has a row with no real token")
        if use_cache and bool((first + ones < T_total).any()):
            raise ValueError("generation with a KV cache needs left padding: pad on the left, not the right")
        return first.to(torch.int32) if bool((first > 0).any()) else None

    def _rotary_tables(self, length, alphas, positions):
        """cos/sin tables for `length` positions and the positions to read them at. Rows with different NTK factors
        read from one stacked table (each alpha's block offset), so the rotary kernel stays one launch."""
        rotary = self.transformer.rotary_emb
        unique = sorted(set(alphas))
        if len(unique) == 1:
            cos, sin = rotary.tables(length, unique[0], positions.device)
            return cos, sin, positions
        blocks = [rotary.tables(length, a, positions.device) for a in unique]
        cos = torch.cat([c[:length] for c, _ in blocks])
        sin = torch.cat([s[:length] for _, s in blocks])
        offset = torch.tensor([unique.index(a) * length for a in alphas], device=positions.device)
        return cos, sin, positions.expand(len(alphas), -1) + offset[:, None]

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, past_key_values=None,
                use_cache=False, image_features=None, cu_seqlens=None, num_logits_to_keep=0):
        """Logits (and loss, and the KV cache) for `input_ids [B, T]`.

        pixel_values `[num_images, 3, S, S]` in the order the `<img>` spans appear, row by row (or image_features
        from `encode_images`); attention_mask `[B, past + T]` 0/1 padding mask; labels `[B, T]` (-100 ignored,
        shifted inside as in the released code); past_key_values a `KVCache`; cu_seqlens int32 boundaries of
        sequences packed into one row (training). num_logits_to_keep > 0 computes logits for the last positions only.
        """
        cfg = self.config.text
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer [batch, seq] tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        cache = past_key_values
        past = cache.length if cache is not None else 0
        if past + T > MAX_CONTEXT:
            raise ValueError(f"{past + T} tokens exceed the longest context the model supports ({MAX_CONTEXT})")
        dev = input_ids.device

        if past > 0:
            seq_start = cache.seq_start
        else:
            seq_start = self._padding(attention_mask, T, use_cache) if attention_mask is not None else None
        if cu_seqlens is not None and (B != 1 or seq_start is not None):
            raise ValueError("packed sequences (cu_seqlens) take one row [1, total] and no attention_mask")

        h = self.transformer.wte(input_ids)
        spans = self._image_positions(input_ids) if past == 0 else None
        if spans is not None:
            if image_features is None:
                if pixel_values is None:
                    raise ValueError(f"input_ids hold {spans[0].numel()} image span(s) but no pixel_values were given")
                image_features = self.encode_images(pixel_values)
            if image_features.shape[0] != spans[0].numel():
                raise ValueError(
                    f"{image_features.shape[0]} image(s) given for {spans[0].numel()} <img> span(s) in input_ids"
                )
            rows, pos = spans
            h = h.index_put((rows[:, None].expand_as(pos), pos), image_features.to(h.dtype))
        elif pixel_values is not None and past == 0:
            raise ValueError("pixel_values were given but input_ids hold no <img> span to receive them")

        # positions: absolute index, counted from each row's first real token, restarting per packed sequence
        positions = torch.arange(past, past + T, device=dev)[None]
        if seq_start is not None:
            positions = (positions - seq_start.to(dev, torch.long)[:, None]).clamp(min=0)
        if cu_seqlens is not None:
            cu = cu_seqlens.to(dev, torch.long)
            seg = torch.searchsorted(cu[1:], torch.arange(T, device=dev), right=True)
            positions = (torch.arange(T, device=dev) - cu[seg])[None]
        inference = not self.training
        if cfg.use_dynamic_ntk and inference:
            if past == 0:  # alpha from each row's real prompt length, so a padded row behaves as if alone
                lengths = [T] * B if attention_mask is None else attention_mask.sum(1).tolist()
                alphas = [ntk_alpha(n, cfg.seq_length) for n in lengths]
            else:
                alphas = cache.ntk_alphas
        else:
            alphas = [1.0] * B
        cos, sin, positions_in_table = self._rotary_tables(past + T, alphas, positions)
        logn = None
        if cfg.use_logn_attn and inference and past + T > cfg.seq_length:
            logn = logn_scale(positions, cfg.seq_length)[:, :, None, None]
        positions = positions_in_table
        rope = (cos, sin, positions if positions.shape[0] > 1 else positions[0], logn)

        if use_cache and cache is None:
            cache = KVCache(cfg.num_hidden_layers, B, T, cfg.num_attention_heads, cfg.kv_channels, h.dtype, dev,
                            seq_start=seq_start)
        if cache is not None:
            if past == 0:
                cache.ntk_alphas = alphas
                if seq_start is not None:
                    cache.seq_start = seq_start
            cache.reserve(T)
        max_seqlen = None
        if cu_seqlens is not None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

        ckpt = self.transformer.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if ckpt:
                h = torch.utils.checkpoint.checkpoint(block, h, rope, i, None, seq_start, cu_seqlens, max_seqlen,
                                                      use_reentrant=False)
            else:
                h = block(h, rope, i, cache, seq_start, cu_seqlens, max_seqlen)
        if cache is not None:
            cache.length += T
        h = self.transformer.ln_f(h)

        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            targets = labels[:, 1:]
            if cu_seqlens is not None:  # the last token of one packed sequence does not predict the next sequence
                targets = targets.clone()
                bounds = cu_seqlens[1:-1].to(dev, torch.long) - 1
                targets[0, bounds[(bounds >= 0) & (bounds < T - 1)]] = -100
            loss = self.kernels.linear_cross_entropy(
                h[:, :-1].reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1)
            )
        logits = None
        if labels is None or not self.training:
            logits = self.lm_head(h[:, -num_logits_to_keep:] if num_logits_to_keep else h)
        return QwenVLOutput(logits=logits, loss=loss, past_key_values=cache if use_cache else None)

    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, **kwargs):
        """Prompt + new ids `[B, T + new]`; see `qwenvl.generation.generate` for the sampling options."""
        from .generation import generate

        return generate(self, input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens, **kwargs)
