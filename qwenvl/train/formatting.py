"""Records -> token ids and labels: ChatML (supervised fine-tuning) or plain text (pre-training), with loss masks.

Two record kinds are accepted:
- the official fine-tuning format: {"id", "conversations": [{"from": "user", "value": "Picture 1: <img>p</img>\\n..."},
  {"from": "assistant", "value": "..."}, ...]} (turns alternate, user first, assistant last);
- image-caption pairs (stage 1): {"id", "image": path, "caption": text}.

Labels are -100 everywhere except the tokens the model must produce: in ChatML each assistant reply and its
`<|im_end|>` (so generation learns to stop); in plain text each reply and, at the very end, `<|endoftext|>`.
The official fine-tuning script also supervises the `<|im_start|>`/`<|im_end|>`/newline tokens of every turn; we
train on the replies only. Segments are encoded one by one (as that script does), and the ChatML layout is the one
`QwenVLTokenizer.chat_prompt` writes at inference, so a prompt is tokenized the same way in training and in use.
"""
from __future__ import annotations

IGNORE = -100
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
STYLES = ("chatml", "plain")
DEFAULT_SYSTEM = "You are a helpful assistant."


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


def encode(record, tokenizer, style: str = "chatml", system: str = DEFAULT_SYSTEM, max_len: int | None = None,
           index=None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a record; raises MalformedRecord (with the record's id) for anything untrainable."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rid = record_id(record, index)
    pairs = turns(record, index)
    segments: list[tuple[str, bool]] = []
    if style == "chatml":
        segments.append((f"<|im_start|>system\n{system}<|im_end|>", False))
        for k in range(0, len(pairs), 2):
            segments.append((f"\n<|im_start|>user\n{pairs[k][1]}<|im_end|>\n<|im_start|>assistant\n", False))
            segments.append((pairs[k + 1][1] + "<|im_end|>", True))
    else:
        for k in range(0, len(pairs), 2):
            segments.append((pairs[k][1], False))
            segments.append((pairs[k + 1][1], True))
        segments.append(("<|endoftext|>", True))
    ids: list[int] = []
    labels: list[int] = []
    for text, train in segments:
        try:
            piece = tokenizer.encode(text)
        except ValueError as e:  # e.g. an unclosed <img> or a path too long for the image span
            raise MalformedRecord(rid, str(e)) from None
        ids += piece
        labels += piece if train else [IGNORE] * len(piece)
    if labels and labels[0] != IGNORE:
        raise MalformedRecord(rid, "the first token is a target: a record must start with a user turn")
    if not any(lab != IGNORE for lab in labels):
        raise MalformedRecord(rid, "no target tokens")
    if max_len is not None and len(ids) > max_len:
        # truncating would cut an image span or the answer: refuse instead of training on a mangled example
        raise MalformedRecord(rid, f"{len(ids)} tokens exceed the maximum sequence length {max_len}")
    return ids, labels


def prompt(record, tokenizer, style: str = "chatml", system: str = DEFAULT_SYSTEM, index=None) -> tuple[str, str]:
    """(prompt text, reference answer) for evaluation: every turn but the last reply, which is the reference."""
    pairs = turns(record, index)
    reference = pairs[-1][1]
    if style == "chatml":
        history = [(pairs[k][1], pairs[k + 1][1]) for k in range(0, len(pairs) - 2, 2)]
        return tokenizer.chat_prompt(pairs[-2][1], history=history, system=system), reference
    if style == "plain":
        text = "".join(p[1] for p in pairs[:-1])
        return text, reference
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
