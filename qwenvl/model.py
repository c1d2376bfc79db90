"""Qwen-VL: the ViT's image features written into the token stream of the Qwen decoder.

`QwenVL(config, kernels="auto")` owns `transformer` (wte, h, ln_f and visual, as in the released checkpoint) and
`lm_head`. Each `<img>` ... `</img>` span of n_queries ids (256 released) receives one image's adapter output.
`QwenVL.forward` checks its inputs, writes the images into the embeddings, lays out positions and the cache, and
hands the decoder stack (`QWenTransformer.forward`) one embedded sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from qwenvl_kernels import get_backend

from . import checkpoint, conversation
from .cache import KVCache
from .config import MAX_CONTEXT, QwenVLConfig, resolve_device, resolve_dtype
from .generation import generate
from .inputs import (check_cu_seqlens, check_image_count, check_image_features, check_input_ids, check_labels,
                     check_pixel_values, image_spans, image_spans_static, next_token_targets, padding_starts)
from .text import Packing, QWenBlock, RMSNorm, RotaryEmbedding, RotaryInputs, logn_scale, ntk_alpha, token_positions
from .vision import VisionTransformer


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

    def forward(self, h: torch.Tensor, rope: RotaryInputs, cache: KVCache | None = None, seq_start=None,
                packing: Packing | None = None) -> torch.Tensor:
        """The decoder blocks and the final norm over embedded tokens `h [B, T, hidden]`; writes the cache."""
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.h):
            if recompute:
                h = torch.utils.checkpoint.checkpoint(block, h, rope, i, None, seq_start, packing,
                                                      use_reentrant=False)
            else:
                h = block(h, rope, i, cache, seq_start, packing)
        return self.ln_f(h)


class QwenVL(nn.Module):
    def __init__(self, config: QwenVLConfig, kernels="auto"):
        super().__init__()
        if not isinstance(config, QwenVLConfig):
            raise TypeError(f"QwenVL takes a QwenVLConfig (e.g. QwenVLConfig.from_name('tiny')), got "
                            f"{type(config).__name__}; to load a checkpoint folder use QwenVL.from_pretrained")
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
        """Build the model of checkpoint folder `path` and load its weights (never downloaded).

        Everything that can be checked without reading tensor data is checked first: the config, the dtype, the
        device, the backend, and every weight file's header (names, shapes, dtypes, sizes) against the model.
        """
        weights = checkpoint.open_checkpoint(path)
        dtype = resolve_dtype(dtype) or resolve_dtype(weights.config.dtype)
        device = resolve_device(device)
        with torch.device("meta"):
            model = cls(weights.config, kernels=kernels)
        weights.check_against(model)
        model = model.to_empty(device=device).to(dtype)
        weights.load_into(model)
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes: int = 4 << 30) -> None:
        checkpoint.save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

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
        check_pixel_values(pixel_values, self.config.vision.patch_size)
        return self.transformer.visual(pixel_values.to(self.device))

    def _insert_images(self, h, input_ids, pixel_values, image_features):
        """Write each image's features over the inner ids of its span; counts are checked before the ViT runs.

        Under torch.compile the spans are found with the number of images given as their count (a shape), so the
        splice traces into the graph without a data-dependent shape."""
        if image_features is not None and pixel_values is not None:
            raise ValueError("give pixel_values or image_features (from encode_images), not both")
        if image_features is not None:
            check_image_features(image_features, self.config.vision.n_queries, self.config.text.hidden_size)
        elif pixel_values is not None:
            check_pixel_values(pixel_values, self.config.vision.patch_size)
        given = image_features if image_features is not None else pixel_values
        n_given = 0 if given is None else given.shape[0]
        if torch.compiler.is_compiling():
            spans = image_spans_static(input_ids, self.config.vision, n_given)
        else:
            spans = image_spans(input_ids, self.config.vision)
            check_image_count(n_given, spans, "image(s)" if image_features is None else "image feature(s)")
        if spans is None:
            return h
        if image_features is None:
            image_features = self.encode_images(pixel_values)
        rows, pos = spans
        return h.index_put((rows[:, None].expand_as(pos), pos), image_features.to(h.dtype))

    # --- forward --------------------------------------------------------------------------------------------------
    def _rotary(self, positions, B: int, past: int, T: int, attention_mask, cache) -> RotaryInputs:
        """Rotary inputs of the new tokens. Inference only: dynamic NTK from each row's real prompt length (fixed at
        prefill; a padded row behaves as if alone) and log-n scaling past the trained length."""
        cfg = self.config.text
        inference = not self.training
        if cfg.use_dynamic_ntk and inference:
            if past == 0:
                # a prompt no longer than the trained length has alpha 1 whatever its padding: read the mask's
                # values (a host sync, a graph break under torch.compile) only when they can matter
                padded = attention_mask is not None and T > cfg.seq_length
                lengths = attention_mask.sum(1).tolist() if padded else [T] * B
                alphas = [ntk_alpha(n, cfg.seq_length) for n in lengths]
            else:
                alphas = cache.ntk_alphas
        else:
            alphas = [1.0] * B
        logn = None
        if cfg.use_logn_attn and inference and past + T > cfg.seq_length:
            logn = logn_scale(positions, cfg.seq_length)[:, :, None, None]
        if cache is not None and past == 0:
            cache.ntk_alphas = alphas
        return self.transformer.rotary_emb.inputs(positions, alphas, past + T, logn)

    def _check(self, input_ids, labels, cache, cu_seqlens, use_cache, num_logits_to_keep) -> int:
        """Every input check that needs no heavy step; returns the number of cached tokens."""
        check_input_ids(input_ids, self.config.text.vocab_size)
        B, T = input_ids.shape
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"past_key_values must be the KVCache a previous call returned, got {type(cache).__name__}")
        if cache is not None and cache.batch != B:
            raise ValueError(f"past_key_values hold {cache.batch} row(s) but input_ids has {B}")
        past = cache.length if cache is not None else 0
        if past + T > MAX_CONTEXT:
            raise ValueError(f"{past + T} tokens exceed the longest context the model supports ({MAX_CONTEXT})")
        if labels is not None:
            check_labels(labels, input_ids, self.config.text.vocab_size)
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, input_ids)
            if use_cache or cache is not None:
                raise ValueError("packed sequences (cu_seqlens) are for training: no KV cache")
        if not isinstance(num_logits_to_keep, int) or isinstance(num_logits_to_keep, bool) or num_logits_to_keep < 0:
            raise ValueError(f"num_logits_to_keep must be an int >= 0 (0: all positions), got {num_logits_to_keep!r}")
        return past

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, past_key_values=None,
                use_cache=False, image_features=None, cu_seqlens=None, num_logits_to_keep=0):
        """Logits (and loss, and the KV cache) for `input_ids [B, T]`.

        pixel_values `[num_images, 3, S, S]` in the order the `<img>` spans appear, row by row (or image_features
        from `encode_images`); attention_mask `[B, past + T]` 0/1 padding mask; labels `[B, T]` (-100 ignored,
        shifted inside as in the released code); past_key_values a `KVCache`; cu_seqlens int32 boundaries of
        sequences packed into one row (training). num_logits_to_keep > 0 computes logits for the last positions only.
        """
        cache = past_key_values
        past = self._check(input_ids, labels, cache, cu_seqlens, use_cache, num_logits_to_keep)
        B, T = input_ids.shape
        dev = input_ids.device
        if past > 0:
            seq_start = cache.seq_start
        else:
            seq_start = padding_starts(attention_mask, T, use_cache) if attention_mask is not None else None
            if cu_seqlens is not None and seq_start is not None:
                raise ValueError("packed sequences (cu_seqlens) take no attention_mask with padding")

        h = self.transformer.wte(input_ids)
        if past == 0 or pixel_values is not None or image_features is not None:
            # images come with a prompt: the whole one, or the part of a chat turn after its cached prefix
            h = self._insert_images(h, input_ids, pixel_values, image_features)
        positions = token_positions(T, past, seq_start, cu_seqlens, dev)
        if use_cache and cache is None:
            cache = KVCache(self.config.text.num_hidden_layers, B, T, self.config.text.num_attention_heads,
                            self.config.text.kv_channels, h.dtype, dev, seq_start=seq_start)
        rope = self._rotary(positions, B, past, T, attention_mask, cache)
        if cache is not None:
            if past == 0 and seq_start is not None:
                cache.seq_start = seq_start
            cache.reserve(T)
        packing = None
        if cu_seqlens is not None:
            packing = Packing(cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))

        h = self.transformer(h, rope, cache, seq_start, packing)
        if cache is not None:
            cache.length += T

        loss = None
        if labels is not None:
            targets = next_token_targets(labels.to(dev), cu_seqlens)
            loss = self.kernels.linear_cross_entropy(
                h[:, :-1].reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1)
            )
        logits = None
        if labels is None or not self.training:
            logits = self.lm_head(h[:, -num_logits_to_keep:] if num_logits_to_keep else h)
        return QwenVLOutput(logits=logits, loss=loss, past_key_values=cache if use_cache else None)

    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, **kwargs):
        """Prompt + new ids `[B, T + new]`; see `qwenvl.generation.generate` for the sampling options."""
        return generate(self, input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens, **kwargs)

    # --- chat (the released Qwen-VL-Chat methods; earlier turns' work is kept, see qwenvl.conversation) ---------
    def chat(self, tokenizer, query, history=None, system=conversation.DEFAULT_SYSTEM, append_history=True,
             stream=conversation.NOT_GIVEN, stop_words_ids=None, generation_config=None, **kwargs):
        """One ChatML turn: (response, history + [(query, response)]); see `qwenvl.conversation.chat`."""
        return conversation.chat(self, tokenizer, query, history, system, append_history=append_history,
                                 stream=stream, stop_words_ids=stop_words_ids, generation_config=generation_config,
                                 **kwargs)

    def chat_stream(self, tokenizer, query, history=None, system=conversation.DEFAULT_SYSTEM, stop_words_ids=None,
                    logits_processor=None, generation_config=None, **kwargs):
        """The response text as it grows (each yield extends the last); see `qwenvl.conversation.chat_stream`."""
        return conversation.chat_stream(self, tokenizer, query, history, system, stop_words_ids=stop_words_ids,
                                        logits_processor=logits_processor, generation_config=generation_config,
                                        **kwargs)

    def clear_chat_cache(self) -> None:
        """Free the image features and keys/values kept from earlier chat turns."""
        conversation.clear_chat_cache(self)
