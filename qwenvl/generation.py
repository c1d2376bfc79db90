"""Generation: one prefill (images encoded once), then decoding with the KV cache; greedy or sampled; ChatML chat.

Batches are left-padded; each row's positions count from its first real token, so a row of a batch gets the same
tokens as the same prompt alone (the released code counts from the padded start and does not). Every argument is
checked before the prefill. Streamed text is released in whole characters: the bytes of a character split across
tokens (Chinese, accents) are held back until it is complete.
"""
from __future__ import annotations

import codecs
import math
import numbers
from typing import Callable, Iterable

import torch

from .cache import KVCache
from .compiled import check_compile, static_decoder
from .config import MAX_CONTEXT
from .inputs import check_input_ids
from .prompts import DEFAULT_SYSTEM


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_sampling(do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0) -> None:
    """The sampling options, checked (ValueError naming the option and its allowed range)."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if not _real(temperature) or (do_sample and temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
    if not _real(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no nucleus filtering), got {top_p!r}")
    if not _int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k filtering), got {top_k!r}")
    if not _real(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1: none), got {repetition_penalty!r}")


def sample_next(logits: torch.Tensor, do_sample=False, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """Next ids `[B]` from fp32 logits `[B, V]`: argmax, or sampling after temperature, top-k and top-p filtering."""
    check_sampling(do_sample, temperature, top_p, top_k)
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _apply_repetition_penalty(logits, seen, penalty):
    """Divide positive (multiply negative) logits of the ids already in the row by `penalty` (CTRL-style)."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def _stop_ids(eos_token_id, vocab: int) -> list[int]:
    if eos_token_id is None:
        return []
    stops = [eos_token_id] if _int(eos_token_id) else list(eos_token_id) if isinstance(eos_token_id, (list, tuple,
                                                                                                       set)) else None
    if stops is None or not all(_int(t) and 0 <= t < vocab for t in stops):
        raise ValueError(f"eos_token_id must be a token id or a list of them, each in 0..{vocab - 1}; "
                         f"got {eos_token_id!r}")
    return [int(t) for t in stops]


def _check_generation(model, input_ids, max_new_tokens, pad_token_id, vocab_size, generator) -> None:
    if not _int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    V = model.config.text.vocab_size
    check_input_ids(input_ids, V)
    T = input_ids.shape[1]
    if T + max_new_tokens > MAX_CONTEXT:
        raise ValueError(
            f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the longest context the model "
            f"supports ({MAX_CONTEXT}); shorten the prompt or ask for fewer tokens"
        )
    if pad_token_id is not None and (not _int(pad_token_id) or not 0 <= pad_token_id < V):
        raise ValueError(f"pad_token_id must be a token id in 0..{V - 1}, got {pad_token_id!r}")
    if vocab_size is not None and (not _int(vocab_size) or not 0 < vocab_size <= V):
        raise ValueError(f"vocab_size (the tokenizer's) must be an int in 1..{V}, got {vocab_size!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def generate_steps(model, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, do_sample=False,
                   temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, eos_token_id=None,
                   pad_token_id=None, generator=None, image_features=None, vocab_size=None, past_key_values=None,
                   compile=False):
    """Yield each step's new ids `[B]`: one prefill, then one cached forward per token (see `generate`).

    past_key_values: a KVCache already holding the keys and values of `input_ids[:, :length]` (a chat's earlier
    turns); only the rest is prefilled (with the images of its spans) and the cache grows in place.
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    check_sampling(do_sample, temperature, top_p, top_k, repetition_penalty)
    _check_generation(model, input_ids, max_new_tokens, pad_token_id, vocab_size, generator)
    if past_key_values is not None and (not isinstance(past_key_values, KVCache)
                                        or past_key_values.batch != input_ids.shape[0]
                                        or not 0 <= past_key_values.length < input_ids.shape[1]
                                        or (past_key_values.length and attention_mask is not None)):
        raise ValueError("past_key_values must be a KVCache of the same batch holding fewer tokens than input_ids "
                         "(and no attention_mask when it holds some)")
    backend = check_compile(compile, model.device)
    stops = _stop_ids(eos_token_id, model.config.text.vocab_size)
    return _steps(model, input_ids, pixel_values, attention_mask, max_new_tokens, do_sample, temperature, top_p, top_k,
                  repetition_penalty, stops, pad_token_id, generator, image_features, vocab_size, past_key_values,
                  backend)


def _steps(model, input_ids, pixel_values, attention_mask, max_new_tokens, do_sample, temperature, top_p, top_k,
           repetition_penalty, stops, pad_token_id, generator, image_features, vocab_size, cache=None, backend=None):
    B, T = input_ids.shape
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
    cfg = model.config.text
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    decoder = callers = None
    if backend is not None:  # the prefill fills the static cache that the compiled steps decode over
        decoder, callers = static_decoder(model, B, T + max_new_tokens, backend), cache
        cache = decoder.start(callers)
    elif cache is None:
        cache = KVCache(cfg.num_hidden_layers, B, T + max_new_tokens, cfg.num_attention_heads, cfg.kv_channels,
                        model.dtype, device)
    past = cache.length
    try:
        with torch.no_grad():
            out = model(input_ids[:, past:], pixel_values=pixel_values, attention_mask=attention_mask,
                        past_key_values=cache, use_cache=True, image_features=image_features, num_logits_to_keep=1)
        logits = out.logits[:, -1]
        if decoder is not None:
            decoder.prefilled(model)
        seen = input_ids
        if attention_mask is not None:  # padding never counts as a repeated token
            seen = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stop_tensor = torch.tensor(stops, device=device, dtype=input_ids.dtype) if stops else None
        for step in range(max_new_tokens):
            logits = _apply_repetition_penalty(logits.float(), seen, repetition_penalty)
            if vocab_size is not None and vocab_size < logits.shape[-1]:
                # the embedding table is padded past the tokenizer (151936 vs 151860): those ids are not text
                logits[:, vocab_size:] = float("-inf")
            nxt = sample_next(logits, do_sample, temperature, top_p, top_k, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            yield nxt
            if stop_tensor is not None:
                done = done | torch.isin(nxt, stop_tensor)
                if bool(done.all()):
                    return
            if step == max_new_tokens - 1:
                return
            seen = torch.cat([seen, nxt[:, None]], dim=1)
            with torch.no_grad():
                if decoder is not None:
                    logits = decoder.step(model, nxt)
                else:
                    logits = model(nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    finally:
        if callers is not None:  # the caller's cache ends holding what eager decoding would have left in it
            callers.load(cache)


def generate(model, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64,
             streamer: Callable[[torch.Tensor], None] | None = None, **kwargs):
    """Generate up to `max_new_tokens` after `input_ids [B, T]` (left-padded, with `attention_mask`).

    Options: do_sample, temperature, top_p, top_k, repetition_penalty, eos_token_id (int or list: a row stops
    there), pad_token_id (fills a stopped row; default the first stop id), generator, image_features, vocab_size
    (the tokenizer's: ids past it, padding of the embedding table, are never produced), compile (True or a
    torch.compile backend name: the decode step runs compiled over a static-shape KV cache, see `qwenvl.compiled`;
    the same tokens as eager decoding).
    Returns `[B, T + n]` ids. `streamer`, when given, is called with each step's new ids `[B]`.
    """
    if streamer is not None and not callable(streamer):
        raise TypeError(f"streamer must be callable (it receives each step's new ids), got {type(streamer).__name__}")
    steps = generate_steps(model, input_ids, pixel_values, attention_mask, max_new_tokens, **kwargs)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    new = []
    for nxt in steps:
        new.append(nxt)
        if streamer is not None:
            streamer(nxt)
    return torch.cat([input_ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)


def until_stop(ids: list[int], stops) -> list[int]:
    """The generated ids before the first stop id (the stop and the padding after it dropped)."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


class TextStream:
    """The text of a growing sequence of generated ids, released in whole characters.

    `push(ids)` returns the new text: bytes of a character that is not complete yet are held back until it is (an
    invalid byte sequence becomes U+FFFD once it can no longer be completed); `close()` flushes what is left.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._sent = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, ids) -> str:
        self.ids += [int(t) for t in ids]
        data = self.tokenizer.decode_bytes(self.ids)  # the bytes of a prefix are a prefix of these
        new = self._utf8.decode(data[self._sent:])
        self._sent = len(data)
        self.text += new
        return new

    def close(self) -> str:
        new = self._utf8.decode(b"", final=True)
        self.text += new
        return new


def chat_stream(model, tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, **kwargs) -> Iterable[str]:
    """Qwen-VL-Chat in ChatML, streamed: yields the response text so far each time it grows by whole characters
    (each yield extends the previous one; the last equals `chat`'s response). See `qwenvl.conversation`."""
    from .conversation import chat_stream as stream_turn

    return stream_turn(model, tokenizer, query, history, system, **kwargs)


def chat(model, tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, **kwargs) -> tuple[str, list]:
    """One ChatML turn of Qwen-VL-Chat: returns (response, history + [(query, response)]); earlier turns' images
    and keys/values are reused from the model's chat cache. See `qwenvl.conversation.chat` for the options."""
    from .conversation import chat as chat_turn

    return chat_turn(model, tokenizer, query, history, system, **kwargs)
