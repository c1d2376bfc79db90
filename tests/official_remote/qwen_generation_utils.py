"""Stand-in for the released qwen_generation_utils.py: the ChatML context with its history window, the stop words,
the answer's decoding, and the stop-word logits processor."""
from typing import List, Tuple

import torch

try:
    from transformers import LogitsProcessor
except ImportError:  # no generate without transformers
    LogitsProcessor = object

HistoryType = List[Tuple[str, str]]


def make_context(tokenizer, query, history=None, system="", max_window_size=6144, chat_format="chatml"):
    """(raw_text, context_tokens) of a ChatML prompt; older turns are dropped past max_window_size tokens."""
    history = history or []
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise NotImplementedError(f"Unknown chat format {chat_format!r}")
    im_start, im_end = "<|im_start|>", "<|im_end|>"
    start, end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode("\n")

    def turn(role, content):
        tokens = tokenizer.encode(role, allowed_special=set(tokenizer.IMAGE_ST)) + nl + tokenizer.encode(
            content, allowed_special=set(tokenizer.IMAGE_ST))
        return f"{role}\n{content}", start + tokens + end

    system_text, system_tokens = turn("system", system)
    raw_text, context_tokens = "", []
    for turn_query, turn_response in reversed(history):
        query_text, query_tokens = turn("user", turn_query)
        response_text, response_tokens = turn("assistant", turn_response)
        previous = nl + query_tokens + nl + response_tokens
        if len(system_tokens) + len(previous) + len(context_tokens) >= max_window_size:
            break
        context_tokens = previous + context_tokens
        raw_text = f"\n{im_start}{query_text}{im_end}\n{im_start}{response_text}{im_end}" + raw_text
    context_tokens = system_tokens + context_tokens + nl + turn("user", query)[1] + nl + start + tokenizer.encode(
        "assistant") + nl
    raw_text = f"{im_start}{system_text}{im_end}" + raw_text + f"\n{im_start}user\n{query}{im_end}\n{im_start}assistant\n"
    return raw_text, context_tokens


def get_stop_words_ids(chat_format, tokenizer):
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    raise NotImplementedError(f"Unknown chat format {chat_format!r}")


def decode_tokens(tokens, tokenizer, raw_text_len, context_length, chat_format, verbose=False,
                  return_end_reason=False, errors="replace"):
    """The answer: the tokens after the context up to the first end token, decoded and stripped."""
    if torch.is_tensor(tokens):
        tokens = tokens.cpu().tolist()
    ends = [tokenizer.im_start_id, tokenizer.im_end_id] if chat_format == "chatml" else []
    ends.append(tokenizer.eod_id)
    stop = len(tokens)
    for i in range(context_length, len(tokens)):
        if tokens[i] in ends:
            stop = i
            break
    return tokenizer.decode(tokens[context_length:stop], errors=errors).strip()


class StopWordsLogitsProcessor(LogitsProcessor):
    """Forces the end-of-text token once a row ends with one of the stop-word sequences."""

    def __init__(self, stop_words_ids, eos_token_id):
        self.stop_words_ids = [list(s) for s in stop_words_ids if s != [eos_token_id]]
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids.tolist()):
            if any(len(s) <= len(ids) and ids[len(ids) - len(s):] == s for s in self.stop_words_ids):
                scores[row, self.eos_token_id] = float(2 ** 15)
        return scores
