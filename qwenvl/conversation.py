"""Multi-turn chat as Qwen-VL-Chat offers it (`model.chat`, `model.chat_stream`), without redoing earlier turns.

The released API is stateless: each turn sends the whole conversation again (history in, history out), so done
naively a turn runs every image of the conversation through the vision tower again and prefills every past token.
The model keeps a `ChatCache` that avoids both, and reuses only what a fresh computation would compute again:
- image features in an LRU keyed by (resolved path, sha256 of the file's bytes, image size, dtype, device): an
  image is encoded once however many turns show it, and a file edited on disk is encoded again;
- the KV cache of the previous turn with the ids (and, per image span, the image's key) whose keys and values it
  holds: a turn keeps the longest common prefix of those and its own prompt and prefills only the rest. A history
  that was edited or branched, or cut by the window, reuses what is still the same and nothing else.
Everything is dropped when the model changed since (its parameters' storage or version counters, its mode or its
kernels), and the prefix is not reused when the prompt's rotary base differs from the cached keys' (dynamic NTK).
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping

import torch

from .cache import KVCache
from .generation import TextStream, check_sampling, generate_steps
from .generation_config import GenerationDefaults
from .processing import load_image
from .prompts import DEFAULT_SYSTEM, chat_ids
from .text import ntk_alpha

NOT_GIVEN = object()  # `chat(stream=...)`: the released signature has it only to refuse it
MAX_CACHED_IMAGES = 16
# Qwen-VL-Chat's generation_config.json: nucleus sampling (top_p 0.3), 512 new tokens, a 6144-token history window
CHAT_DEFAULTS = GenerationDefaults(chat_format="chatml", do_sample=True, top_p=0.3, max_new_tokens=512)
_CONFIG_KEYS = (*CHAT_DEFAULTS.sampling(), "max_window_size")


def _model_state(model) -> tuple:
    """What cached keys, values and image features depend on besides the inputs. A parameter's data pointer changes
    when it is replaced (`.to()`, loading into new storage) and its version counter on every in-place write (an
    optimizer step, `load_state_dict`), so any change of weights, dtype or device shows here."""
    weights = tuple((p.data_ptr(), p._version) for p in model.parameters())
    return weights, model.training, id(model.kernels)


class ChatCache:
    """What a model keeps between chat turns: the last turn's KV cache with the ids it holds, and image features.

    `ids` are the tokens whose keys and values `kv` holds (positions 0..len(ids)-1); `images` maps the start of each
    image span among them to the key of the image written there. `last_turn` reports the latest turn's work.
    """

    def __init__(self, max_images: int = MAX_CACHED_IMAGES):
        self.max_images = max_images
        self.kv: KVCache | None = None
        self.ids: list[int] = []
        self.images: dict[int, tuple] = {}
        self.features: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.model_state: tuple | None = None
        self.last_turn: dict = {}

    def check(self, model) -> None:
        """Forget everything computed by a model that has changed since."""
        state = _model_state(model)
        if state != self.model_state:
            self.kv, self.ids, self.images = None, [], {}
            self.features.clear()
            self.model_state = state

    def reusable(self, ids: list[int], spans: dict[int, tuple], span_len: int, alpha: float) -> int:
        """How many leading tokens of the prompt `ids` keep their cached keys and values.

        The common prefix of the cached ids and `ids`, cut back to the start of an image span that is not whole in
        it or that shows another image (same path, other bytes); at least the last prompt token is left to prefill
        (its logits start the answer). Nothing is kept when the prompt's dynamic-NTK factor differs from the cached
        keys': the released model rotates all keys with the factor of the prefill length, so a prompt that crosses
        into another factor must be prefilled whole to match a fresh run."""
        if self.kv is None or not self.ids or self.kv.ntk_alphas[0] != alpha:
            return 0
        limit = min(len(self.ids), len(ids) - 1)
        n = 0
        while n < limit and self.ids[n] == ids[n]:
            n += 1
        for start, key in sorted(spans.items()):
            if start < n and (start + span_len > n or self.images.get(start) != key):
                return start
        return n

    def image_features(self, model, keyed_paths: list[tuple[tuple, str]]) -> list[torch.Tensor]:
        """Features `[n_queries, hidden]` of each (key, path), from the LRU or encoded now. Each image is encoded
        alone, so its features do not depend on which other images share its turn."""
        out = []
        encoded = 0
        for key, path in keyed_paths:
            feats = self.features.get(key)
            if feats is None:
                pixels = load_image(path, model.config.vision.image_size)[None]
                with torch.no_grad():
                    feats = model.encode_images(pixels.to(model.device, model.dtype))[0]
                encoded += 1
                self.features[key] = feats
            self.features.move_to_end(key)
            out.append(feats)
        while len(self.features) > self.max_images:
            self.features.popitem(last=False)
        self.last_turn["images_encoded"] = encoded
        return out


def chat_cache(model) -> ChatCache:
    """The model's chat cache, made on first use."""
    cache = getattr(model, "_chat_cache", None)
    if cache is None:
        cache = ChatCache()
        model._chat_cache = cache
    return cache


def clear_chat_cache(model) -> None:
    """Free the keys, values and image features kept from earlier chat turns."""
    model._chat_cache = None


def _image_keys(model, tokenizer, ids: list[int], image_root) -> dict[int, tuple[tuple, str]]:
    """{span start: (image key, path to read)} of the prompt's image spans. Relative paths are read under
    image_root when it is given, else under the working directory, as `images_for` reads them."""
    starts = [i for i, t in enumerate(ids) if t == tokenizer.img_start_id]
    out = {}
    dtype, device = str(model.dtype), str(model.device)
    size = model.config.vision.image_size
    for start, path in zip(starts, tokenizer.image_paths(ids)):
        if image_root is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(image_root), path)
        if not os.path.isfile(path):
            load_image(path, size)  # raises the reader's message: no such file, a folder, a URL
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        out[start] = ((os.path.realpath(path), digest, size, dtype, device), path)
    return out


def _options(model, generation_config, kwargs: dict) -> dict:
    """Decoding options: Qwen-VL-Chat's defaults, then generation_config's (the argument, else the model's
    `generation_config` attribute when it has one: any object or dict with these names), then the keywords."""
    config = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    options = {**CHAT_DEFAULTS.sampling(), "max_window_size": CHAT_DEFAULTS.max_window_size}
    if config is not None:
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        fmt = get("chat_format", "chatml")
        if fmt != "chatml":
            raise ValueError(f"chat needs the ChatML format, but generation_config's chat_format is {fmt!r} (a base "
                             f"model): use generate with a raw prompt instead")
        options.update({k: get(k) for k in _CONFIG_KEYS if get(k) is not None})
    options.update(kwargs)
    for key in ("max_window_size", "max_new_tokens"):  # both size buffers before generate checks the rest
        value = options[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    check_sampling(options["do_sample"], options["temperature"], options["top_p"], options["top_k"],
                   options["repetition_penalty"])
    return options


def _stop_words(stop_words_ids, vocab: int) -> list[list[int]]:
    """The released `stop_words_ids`: token sequences that end the answer once it ends with one (kept in it)."""
    if stop_words_ids is None:
        return []
    words = [list(w) if isinstance(w, (list, tuple)) else None for w in stop_words_ids]
    if not all(w and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in w)
               for w in words):
        raise ValueError(f"stop_words_ids must be a list of token-id lists, e.g. [tokenizer.encode('Observation:')], "
                         f"each id in 0..{vocab - 1}; got {stop_words_ids!r:.200}")
    return words


def _turn(model, tokenizer, query, history, system, options: dict, stop_words, image_root):
    """Yield the ids of one answer (without its end token), reusing what the model's ChatCache holds; the cache
    holds this turn's prompt and answer afterwards, also when the caller stops early."""
    options = dict(options)
    window = options.pop("max_window_size")
    ids = chat_ids(tokenizer, query, history=history, system=system, max_window_size=window)
    cache = chat_cache(model)
    cache.check(model)
    cache.last_turn = {}
    spans = _image_keys(model, tokenizer, ids, image_root)
    text = model.config.text
    alpha = ntk_alpha(len(ids), text.seq_length) if text.use_dynamic_ntk and not model.training else 1.0
    span_len = tokenizer.n_image_tokens + 2
    keep = cache.reusable(ids, {s: key for s, (key, _) in spans.items()}, span_len, alpha)
    # images in the kept prefix are already in the cache's keys and values: only the rest go to the model
    features = cache.image_features(model, [kp for s, kp in sorted(spans.items()) if s >= keep])
    if cache.kv is None:
        cache.kv = KVCache(text.num_hidden_layers, 1, len(ids) + options["max_new_tokens"],
                           text.num_attention_heads, text.kv_channels, model.dtype, model.device)
    kv = cache.kv
    kv.length = keep
    cache.ids, cache.images = ids[:keep], {s: key for s, (key, _) in spans.items() if s < keep}
    cache.last_turn.update(prompt_tokens=len(ids), reused_tokens=keep, prefilled_tokens=len(ids) - keep)
    ends = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]  # the released ChatML stops
    options.setdefault("vocab_size", tokenizer.vocab_size)
    steps = generate_steps(model, torch.tensor([ids], dtype=torch.long), eos_token_id=ends,
                           image_features=torch.stack(features) if features else None, past_key_values=kv, **options)
    produced: list[int] = []   # every id the steps gave, end token included: the model is fed them in this order
    try:
        for nxt in steps:
            t = int(nxt[0])
            produced.append(t)
            if t in ends:
                break
            yield t
            if any(produced[-len(w):] == w for w in stop_words):
                break
    finally:
        steps.close()
        # the cache now holds the keys and values of the first kv.length ids of prompt + answer
        fed = ids + produced
        if keep <= kv.length <= len(fed):
            cache.ids = fed[:kv.length]
            cache.images = {s: key for s, (key, _) in spans.items() if s + span_len <= kv.length}
        else:
            cache.kv, cache.ids, cache.images = None, [], {}


def chat_stream(model, tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, stop_words_ids=None,
                logits_processor=None, generation_config=None, image_root=None, **kwargs):
    """Qwen-VL-Chat's `chat_stream`: yields the response text so far each time it grows by whole characters (each
    yield extends the previous one; the last, stripped of surrounding whitespace as `chat` returns it, equals
    `chat`'s response). Options as `chat`'s."""
    if logits_processor is not None:
        raise ValueError("logits_processor (transformers' LogitsProcessorList) is not supported here: use do_sample, "
                         "temperature, top_p, top_k, repetition_penalty and stop_words_ids")
    options = _options(model, generation_config, kwargs)
    words = _stop_words(stop_words_ids, model.config.text.vocab_size)
    text = TextStream(tokenizer)
    for t in _turn(model, tokenizer, query, history, system, options, words, image_root):
        if text.push([t]):
            yield text.text
    if text.close():
        yield text.text


def chat(model, tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM, append_history: bool = True,
         stream=NOT_GIVEN, stop_words_ids=None, generation_config=None, image_root=None, **kwargs):
    """One ChatML turn of Qwen-VL-Chat: returns (response, history + [(query, response)]).

    As the released `chat`: history is a list of (query, response) pairs (None: a new conversation; it is not
    modified), the oldest turns are left out once the prompt would reach max_window_size tokens (6144), and
    stop_words_ids ends the answer after any of those token sequences. Options (keywords, else generation_config's,
    else Qwen-VL-Chat's): do_sample (True), top_p (0.3), top_k, temperature, repetition_penalty, max_new_tokens
    (512), max_window_size (6144), generator; image_root reads relative image paths under a folder.
    Earlier turns' images and keys/values are reused from the model's chat cache (`model.clear_chat_cache()`).
    """
    if stream is not NOT_GIVEN:
        raise TypeError("chat takes no stream argument (the released code refuses it too): use chat_stream")
    options = _options(model, generation_config, kwargs)
    words = _stop_words(stop_words_ids, model.config.text.vocab_size)
    answer = list(_turn(model, tokenizer, query, history, system, options, words, image_root))
    response = tokenizer.decode(answer).strip()  # the released decode_tokens strips the answer
    history = list(history or [])
    return response, (history + [(query, response)] if append_history else history)
