"""Records -> token ids and labels: ChatML (supervised fine-tuning) or plain text (pre-training), with loss masks.

Two record kinds are accepted:
- the official fine-tuning format: {"id", "conversations": [{"from": "user", "value": "Picture 1: <img>p</img>\\n..."},
  {"from": "assistant", "value": "..."}, ...]} (turns alternate, user first, assistant last);
- image-caption pairs (stage 1): {"id", "image": path, "caption": text}.

Labels are -100 everywhere except the tokens the model must produce: in ChatML each assistant reply and its
`<|im_end|>` (so generation learns to stop); in plain text each reply and, at the very end, `<|endoftext|>`.
The official fine-tuning script also supervises the `<|im_start|>`/`<|im_end|>`/newline tokens of every turn; we
train on the replies only. Each turn is encoded on its own with only the image and grounding tokens special in its
content, exactly as `qwenvl.prompts.chat_ids` builds the prompt at inference, so a prompt is the same ids in training
and in use, and a record whose text holds `<|im_end|>` cannot forge a turn.
"""
from __future__ import annotations

from ..inputs import IGNORE_INDEX
from ..prompts import DEFAULT_SYSTEM, turn_ids
from ..tokenizer import IMAGE_SPECIALS

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
STYLES = ("chatml", "plain")


class MalformedRecord(ValueError):
    """A record that cannot be trained on as it is; carries the record's id so that it can be found and fixed."""

    def __init__(self, record_id, reason: str):
        super().__init__(f"record {record_id!r}: {reason}")
        self.record_id = record_id
        self.reason = reason


def record_id(record, index=None):
    if isinstance(record, dict) and "id" in record:
        return record["id"]
    return f"#{index}" if index is not None else "?"


def turns(record, index=None) -> list[tuple[str, str]]:
    """(role, text) pairs of a record, checked: alternating user/assistant, user first, assistant last."""
    rid = record_id(record, index)
    if not isinstance(record, dict):
        raise MalformedRecord(rid, f"a record must be a JSON object, got {type(record).__name__}")
    if "caption" in record or "image" in record:
        image, cap = record.get("image"), record.get("caption")
        if not isinstance(image, str) or not image or not isinstance(cap, str) or not cap.strip():
            raise MalformedRecord(rid, "an image-caption pair needs a non-empty string 'image' and 'caption'")
        if "<img>" in image or "</img>" in image:
            raise MalformedRecord(rid, "'image' must be a bare path, not an <img> tag")
        return [("user", f"Picture 1: <img>{image}</img>\n"), ("assistant", cap)]
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise MalformedRecord(rid, "'conversations' must be a non-empty list of {from, value} turns")
    out = []
    for n, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise MalformedRecord(rid, f"turn {n} must be an object with 'from' and a string 'value', got {turn!r:.80}")
        role = ROLES.get(turn["from"])
        if role is None:
            raise MalformedRecord(rid, f"turn {n} has unknown role {turn['from']!r}; expected 'user' or 'assistant'")
        expected = "user" if n % 2 == 0 else "assistant"
        if role != expected:
            raise MalformedRecord(rid, f"turn {n} is from {role!r} but turns must alternate user, assistant, ...")
        out.append((role, turn["value"]))
    if out[-1][0] != "assistant":
        raise MalformedRecord(rid, "the last turn must be the assistant's (there is nothing to learn otherwise)")
    for role, text in out:
        if role == "assistant" and not text.strip():
            raise MalformedRecord(rid, "an assistant turn is empty")
        if role == "assistant" and "<img>" in text:
            raise MalformedRecord(rid, "an assistant turn holds an <img> tag; images belong in user turns")
    return out


def _segments(pairs, tokenizer, style: str, system: str) -> list[tuple[list[int], bool]]:
    """(ids, trained) pieces of a conversation; the replies (with the token that ends them) are trained."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    segments = []
    if style == "chatml":
        start, end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode("\n")
        segments.append((start + turn_ids(tokenizer, "system", system) + end, False))
        for k in range(0, len(pairs), 2):
            segments.append((nl + start + turn_ids(tokenizer, "user", pairs[k][1]) + end + nl + start
                             + tokenizer.encode("assistant") + nl, False))
            segments.append((tokenizer.encode(pairs[k + 1][1], allowed_special=IMAGE_SPECIALS) + end, True))
    else:
        for k in range(0, len(pairs), 2):
            segments.append((tokenizer.encode(pairs[k][1], allowed_special=IMAGE_SPECIALS), False))
            segments.append((tokenizer.encode(pairs[k + 1][1], allowed_special=IMAGE_SPECIALS), True))
        segments.append(([tokenizer.eod_id], True))
    return segments


def _encoded(record, tokenizer, style, system, index):
    rid = record_id(record, index)
    pairs = turns(record, index)
    try:
        return rid, pairs, _segments(pairs, tokenizer, style, system)
    except ValueError as e:  # e.g. an unclosed <img>, a path too long for the image span, text that is not UTF-8
        if str(e).startswith("style must"):
            raise
        raise MalformedRecord(rid, str(e)) from None


def encode(record, tokenizer, style: str = "chatml", system: str = DEFAULT_SYSTEM, max_len: int | None = None,
           index=None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a record; raises MalformedRecord (with the record's id) for anything untrainable."""
    rid, _, segments = _encoded(record, tokenizer, style, system, index)
    ids: list[int] = []
    labels: list[int] = []
    for piece, train in segments:
        ids += piece
        labels += piece if train else [IGNORE_INDEX] * len(piece)
    if labels and labels[0] != IGNORE_INDEX:
        raise MalformedRecord(rid, "the first token is a target: a record must start with a user turn")
    if not any(lab != IGNORE_INDEX for lab in labels):
        raise MalformedRecord(rid, "no target tokens")
    if max_len is not None and len(ids) > max_len:
        # truncating would cut an image span or the answer: refuse instead of training on a mangled example
        raise MalformedRecord(rid, f"{len(ids)} tokens exceed the maximum sequence length {max_len}")
    return ids, labels


def prompt(record, tokenizer, style: str = "chatml", system: str = DEFAULT_SYSTEM, index=None) -> tuple[list, str]:
    """(prompt ids, reference answer) for evaluation: every turn but the last reply, which is the reference. The ids
    are those of the record's training example up to that reply."""
    _, pairs, segments = _encoded(record, tokenizer, style, system, index)
    last = len(segments) - (2 if style == "plain" else 1)  # plain: the last reply and <|endoftext|>
    return [t for piece, _ in segments[:last] for t in piece], pairs[-1][1]
