"""Prompts of Qwen-VL: the list format (`Picture 1: <img>path</img>\\n...`) and ChatML conversations.

ChatML ids are built as the released `make_context` builds them: `<|im_start|>` and `<|im_end|>` are inserted as
ids, and each turn's role and content are encoded on their own with only the image and grounding tokens (`<img>`,
`<ref>`, `<box>`, ...) allowed. A user who types `<|im_end|>` or `<|im_start|>system` in a message gets those
characters as text, never as control tokens (`chat_prompt`, the same conversation as one string, is for display).
"""
from __future__ import annotations

import math
import os
from typing import Iterable

from .tokenizer import (BOX_END, BOX_START, IM_END, IM_START, IMAGE_SPECIALS, IMG_END, IMG_PAD, IMG_START, REF_END,
                        REF_START)

DEFAULT_SYSTEM = "You are a helpful assistant."  # Qwen-VL-Chat's system prompt


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def from_list_format(items: Iterable[dict]) -> str:
    """The official prompt text of a list of {"image": path} / {"text": str} / {"box": .., "ref": ..} items.

    A box item takes one (x1, y1, x2, y2) box or a list of them, on the [0, 1000) grid.
    """
    if isinstance(items, (str, dict)):
        raise TypeError("from_list_format takes a list of items such as [{'image': path}, {'text': 'question'}]")
    text = ""
    n_images = 0
    for item in items:
        if not isinstance(item, dict):
            raise TypeError(f"each item must be a dict like {{'image': path}} or {{'text': str}}, got {item!r}")
        keys = set(item)
        if keys == {"image"}:
            if not isinstance(item["image"], (str, os.PathLike)):
                raise TypeError(f"an image item holds a path (str), got {type(item['image']).__name__}")
            path = os.fspath(item["image"])
            if not path or IMG_START in path or IMG_END in path:
                raise ValueError(f"image path {path!r} is empty or holds an <img> tag")
            n_images += 1
            text += f"Picture {n_images}: {IMG_START}{path}{IMG_END}\n"
        elif keys == {"text"}:
            if not isinstance(item["text"], str):
                raise TypeError(f"a text item holds a str, got {type(item['text']).__name__}")
            text += item["text"]
        elif keys in ({"box"}, {"box", "ref"}, {"ref"}):
            if "ref" in item:
                if not isinstance(item["ref"], str):
                    raise TypeError(f"a ref is a str, got {type(item['ref']).__name__}")
                text += f"{REF_START}{item['ref']}{REF_END}"
            if "box" in item:
                boxes = item["box"]
                if len(boxes) == 4 and all(_number(v) for v in boxes):
                    boxes = [boxes]
                for box in boxes:
                    if len(box) != 4 or not all(_number(v) for v in box):
                        raise ValueError(f"a box is four numbers (x1, y1, x2, y2) on the [0, 1000) grid, got {box!r}")
                    x1, y1, x2, y2 = (int(v) for v in box)
                    text += f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}"
        else:
            raise ValueError(
                f"unsupported item {item!r}: use one of {{'image': path}}, {{'text': str}}, "
                f"{{'box': (x1, y1, x2, y2)}} with an optional 'ref', or {{'ref': str}}"
            )
    return text


def _check_turns(query, history, system) -> list:
    if not isinstance(query, str):
        raise TypeError(f"query must be a str (use from_list_format for images), got {type(query).__name__}")
    if not isinstance(system, str):
        raise TypeError(f"system must be a str (the system prompt), got {type(system).__name__}")
    history = list(history or [])
    for n, turn in enumerate(history):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not all(isinstance(t, str) for t in turn):
            raise ValueError(f"history[{n}] must be a (query, response) pair of str, got {turn!r:.100}")
    return history


# A past answer is model output: its <ref>/<box>/<quad> grounding tokens stay tokens, as the released code keeps
# them (the model wrote them as such, and a follow-up question about a box needs them), but an <img>..</img> it wrote
# is plain text, never an image span: the released code would load whatever file the model named (or fail on an
# unclosed tag). A fresh prompt and a chat-cached one are built by this one rule, so their answers stay identical.
ANSWER_SPECIALS = IMAGE_SPECIALS - {IMG_START, IMG_END, IMG_PAD}


def turn_ids(tokenizer, role: str, content: str, allowed=IMAGE_SPECIALS) -> list[int]:
    """`role\\ncontent` as the released code encodes it: only image and grounding tokens are special in it."""
    return (tokenizer.encode(role, allowed_special=allowed) + tokenizer.encode("\n")
            + tokenizer.encode(content, allowed_special=allowed))


def chat_ids(tokenizer, query: str, history=None, system: str = DEFAULT_SYSTEM,
             max_window_size: int | None = None) -> list[int]:
    """The ChatML ids of Qwen-VL-Chat, ending with `<|im_start|>assistant\\n` for the model to continue.

    history is a list of (query, response) pairs, oldest first; responses are encoded with ANSWER_SPECIALS. With
    max_window_size (the released default is 6144 tokens), the oldest turns are dropped, newest kept first, once
    system + history would reach it (the query itself is never cut).
    """
    history = _check_turns(query, history, system)
    if max_window_size is not None and (not isinstance(max_window_size, int) or max_window_size < 1):
        raise ValueError(f"max_window_size must be a positive int (tokens), got {max_window_size!r}")
    start, end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode("\n")
    head = start + turn_ids(tokenizer, "system", system) + end
    context: list[int] = []
    for q, r in reversed(history):
        turn = (nl + start + turn_ids(tokenizer, "user", q) + end + nl + start
                + turn_ids(tokenizer, "assistant", r, ANSWER_SPECIALS) + end)
        # the released rule: a past turn joins while system + it + the newer turns stay below the window
        if max_window_size is not None and len(head) + len(turn) + len(context) >= max_window_size:
            break
        context = turn + context
    return (head + context + nl + start + turn_ids(tokenizer, "user", query) + end + nl + start
            + tokenizer.encode("assistant") + nl)


def chat_prompt(query: str, history=None, system: str = DEFAULT_SYSTEM) -> str:
    """The same conversation as text, for display and logs (encode it with `chat_ids`, never as one string)."""
    history = _check_turns(query, history, system)

    def block(role, content):
        return f"{IM_START}{role}\n{content}{IM_END}"

    turns = "".join("\n" + block("user", q) + "\n" + block("assistant", r) for q, r in history)
    return block("system", system) + turns + "\n" + block("user", query) + f"\n{IM_START}assistant\n"
