"""The Qwen-VL tokenizer: tiktoken BPE over `qwen.tiktoken` with the official special tokens and image spans.

Two kinds share one implementation:
- `QwenVLTokenizer.from_pretrained(folder)`: the released vocabulary (151643 BPE ranks, 151860 ids with the
  special tokens), or any `qwen.tiktoken` of the same format;
- `QwenVLTokenizer.byte_level(...)`: 256 single-byte ranks, for tiny models that must not need a download.

Special tokens always come in the released order right after the ranks: `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>`, the `<|extra_N|>` block, then `<ref>`, `</ref>`, `<box>`, `</box>`, `<quad>`, `</quad>`, `<img>`,
`</img>`, `<imgpad>`. The number of extras is what moves `<img>`: 205 for the released file (`<img>` = 151857),
as many as needed to put `<img>` on the requested id for the byte-level kind.

An image is written in text as `<img>path</img>` and encoded as a fixed-size span: `<img>`, the path's UTF-8
bytes as ids equal to the byte values, `<imgpad>` up to `n_image_tokens` inner ids, `</img>`. The model writes
its visual features over the inner ids, so the path survives in the ids only so that the images can be found.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import unicodedata
from typing import Iterable, Sequence

import tiktoken
import torch

from .jsonfile import read_json_object

# The pre-tokenization pattern of Qwen's tokenizer. Unlike GPT-4's cl100k pattern, digits are split one by one
# (\p{N} without a repeat) and contractions are matched case-insensitively.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"

_HEAD_SPECIALS = (ENDOFTEXT, IM_START, IM_END)
_TAIL_SPECIALS = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
# the only special tokens a chat turn's content may hold (the released IMAGE_ST): never the ChatML control tokens
IMAGE_SPECIALS = frozenset(_TAIL_SPECIALS)
RELEASED_N_EXTRA = 205          # <|extra_0|>..<|extra_204|> in the released tokenizer
DEFAULT_N_IMAGE_TOKENS = 256    # the released adapter's 256 queries

VOCAB_FILE = "qwen.tiktoken"
CONFIG_FILE = "tokenizer_config.json"
KINDS = ("tiktoken", "byte_level")

# Non-greedy and across newlines: the official tokenizer pairs each <img> with the first </img> after it,
# whatever lies between.
_IMG_SPAN = re.compile(re.escape(IMG_START) + "(.*?)" + re.escape(IMG_END), re.DOTALL)


def _special_tokens(first_id: int, n_extra: int) -> dict[str, int]:
    names = list(_HEAD_SPECIALS) + [f"<|extra_{i}|>" for i in range(n_extra)] + list(_TAIL_SPECIALS)
    return {name: first_id + i for i, name in enumerate(names)}


def _read_ranks(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(
                    f"{path}, line {lineno}: expected 'base64token rank', got {line[:80]!r}; "
                    f"is this a qwen.tiktoken file?"
                )
            try:
                token = base64.b64decode(parts[0], validate=True)
                rank = int(parts[1])
            except (binascii.Error, ValueError) as e:
                raise ValueError(
                    f"{path}, line {lineno}: cannot read {line[:80]!r} as 'base64token rank' ({e})"
                ) from None
            if token in ranks:
                raise ValueError(
                    f"{path}, line {lineno}: token {token!r} appears twice (first with rank {ranks[token]})"
                )
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path} holds no ranks: a qwen.tiktoken file has one 'base64token rank' line per token")
    # Special ids start at len(ranks), so ranks must be exactly 0..n-1 or specials would collide with them.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks must be 0..{len(ranks) - 1}, each once; this file has gaps or repeats")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        # Byte-level BPE can encode any text only when every single byte is a token.
        more = "..." if len(missing) > 10 else ""
        raise ValueError(f"{path}: single-byte tokens missing for byte values {missing[:10]}{more}")
    return ranks


def _to_id_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(
                f"expected a 1-D sequence of token ids, got a tensor of shape {tuple(ids.shape)}; pass one row"
            )
        return ids.tolist()
    if hasattr(ids, "tolist"):  # numpy arrays
        ids = ids.tolist()
    out = list(ids)
    for i in out:
        if isinstance(i, (list, tuple)):
            raise ValueError("expected a flat sequence of token ids, got a nested one; pass one row at a time")
    return [int(i) for i in out]


class QwenVLTokenizer:
    """Text <-> token ids for Qwen-VL, with the official special tokens and fixed-size image spans."""

    def __init__(self, ranks: dict[bytes, int], *, n_extra: int = RELEASED_N_EXTRA,
                 n_image_tokens: int = DEFAULT_N_IMAGE_TOKENS, kind: str = "tiktoken", name: str = "qwen"):
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
        if not isinstance(n_extra, int) or n_extra < 0:
            raise ValueError(f"n_extra must be a non-negative int, got {n_extra!r}")
        if not isinstance(n_image_tokens, int) or isinstance(n_image_tokens, bool) or n_image_tokens < 1:
            raise ValueError(
                f"n_image_tokens must be a positive int (256 for the released model), got {n_image_tokens!r}"
            )
        self.kind = kind
        self.n_image_tokens = n_image_tokens
        self.n_extra = n_extra
        self._ranks = ranks
        self.special_tokens: dict[str, int] = _special_tokens(len(ranks), n_extra)
        self._enc = tiktoken.Encoding(
            f"{name}-{len(ranks)}-{n_extra}", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = len(ranks) + len(self.special_tokens)
        st = self.special_tokens
        self.eod_id = st[ENDOFTEXT]
        self.im_start_id = st[IM_START]
        self.im_end_id = st[IM_END]
        self.ref_start_id, self.ref_end_id = st[REF_START], st[REF_END]
        self.box_start_id, self.box_end_id = st[BOX_START], st[BOX_END]
        self.quad_start_id, self.quad_end_id = st[QUAD_START], st[QUAD_END]
        self.img_start_id, self.img_end_id, self.img_pad_id = st[IMG_START], st[IMG_END], st[IMG_PAD]
        self._special_bytes = {i: s.encode("ascii") for s, i in st.items()}

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, n_image_tokens: int | None = None) -> "QwenVLTokenizer":
        """Load from a folder holding `qwen.tiktoken` (e.g. the official checkpoint folder) or from the file itself.

        A `tokenizer_config.json` written by `save_pretrained` beside it restores the kind, `n_image_tokens` and
        the special ids; the official one (which has none of our keys) is fine and gives the released layout.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            folder, vocab = path, os.path.join(path, VOCAB_FILE)
        else:
            folder, vocab = os.path.dirname(path) or ".", path
        if not os.path.isfile(vocab):
            raise FileNotFoundError(
                f"no tokenizer vocabulary at {vocab}: pass the checkpoint folder that holds {VOCAB_FILE} "
                f"(or the file itself); for a tiny model without a vocabulary use QwenVLTokenizer.byte_level()"
            )
        ranks = _read_ranks(vocab)
        cfg = {}
        cfg_path = os.path.join(folder, CONFIG_FILE)
        if os.path.isfile(cfg_path):
            cfg = read_json_object(cfg_path)
        kind = cfg.get("kind", "tiktoken")
        n_img = n_image_tokens if n_image_tokens is not None else cfg.get("n_image_tokens", DEFAULT_N_IMAGE_TOKENS)
        if "image_start_id" in cfg:
            start = cfg["image_start_id"]
            lowest = len(ranks) + len(_HEAD_SPECIALS) + _TAIL_SPECIALS.index(IMG_START)
            if not isinstance(start, int) or isinstance(start, bool) or start < lowest:
                raise ValueError(
                    f"{cfg_path}: image_start_id {start!r} does not fit after the {len(ranks)} ranks of {vocab} "
                    f"(it must be an int >= {lowest})"
                )
            n_extra = start - lowest
        else:
            n_extra = RELEASED_N_EXTRA
        return cls(ranks, n_extra=n_extra, n_image_tokens=n_img, kind=kind)

    @classmethod
    def byte_level(cls, image_start_id: int = 300, n_image_tokens: int = DEFAULT_N_IMAGE_TOKENS) -> "QwenVLTokenizer":
        """A tokenizer with no file: ids 0..255 are the bytes, then the special tokens, `<img>` on image_start_id."""
        lowest = 256 + len(_HEAD_SPECIALS) + _TAIL_SPECIALS.index(IMG_START)
        if not isinstance(image_start_id, int) or image_start_id < lowest:
            raise ValueError(
                f"image_start_id must be an int >= {lowest} (256 bytes, 3 chat tokens and <ref>..</quad> come first), "
                f"got {image_start_id!r}"
            )
        ranks = {bytes([b]): b for b in range(256)}
        return cls(ranks, n_extra=image_start_id - lowest, n_image_tokens=n_image_tokens, kind="byte_level",
                   name="qwen-bytes")

    def save_pretrained(self, folder) -> None:
        """Write `qwen.tiktoken` and `tokenizer_config.json` so that `from_pretrained(folder)` gives the same ids."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, VOCAB_FILE), "wb") as f:
            for token, rank in sorted(self._ranks.items(), key=lambda kv: kv[1]):
                f.write(base64.b64encode(token) + b" " + str(rank).encode("ascii") + b"\n")
        cfg_path = os.path.join(folder, CONFIG_FILE)
        cfg = {}
        if os.path.isfile(cfg_path):
            # an official tokenizer_config.json may already be there (auto_map, model_max_length): keep its keys
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                cfg = {}
            cfg = cfg if isinstance(cfg, dict) else {}
        cfg.update(kind=self.kind, n_image_tokens=self.n_image_tokens, image_start_id=self.img_start_id)
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"QwenVLTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, img_start_id={self.img_start_id}, "
                f"n_image_tokens={self.n_image_tokens})")

    # --- encoding ----------------------------------------------------------------------------------------------
    def _encode_image(self, path: str) -> list[int]:
        data = path.encode("utf-8")
        if len(data) > self.n_image_tokens:
            raise ValueError(
                f"The content in {IMG_START}..{IMG_END} is too long: {len(data)} UTF-8 bytes, this model's image span "
                f"holds {self.n_image_tokens} (the released Qwen-VL 256, the tiny preset 64, the demo preset 16). "
                f"Move or rename the image to a shorter path (or a relative one)."
            )
        return [self.img_start_id, *data, *[self.img_pad_id] * (self.n_image_tokens - len(data)), self.img_end_id]

    def encode(self, text: str, allowed_special="all") -> list[int]:
        """Token ids of text (NFC-normalized first); no BOS/EOS.

        allowed_special: "all" (every special token written in the text is one) or a collection of special-token
        strings (the others are encoded as plain text, as the released tokenizer does): chat turns pass
        IMAGE_SPECIALS, so a user's `<|im_end|>` stays text. `<img>path</img>` becomes an image span when `<img>` is
        allowed.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; for several texts use batch_encode")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"the text holds {text[e.start]!r} at position {e.start}, which is not a character: bytes that were "
                f"not valid UTF-8 (read with errors='surrogateescape'); decode the input as UTF-8 or fix its bytes"
            ) from None
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"allowed_special names unknown special tokens {sorted(unknown)}")
        text = unicodedata.normalize("NFC", text)
        if IMG_START not in allowed:
            return self._encode_text(text, allowed)
        ids: list[int] = []
        pos = 0
        for m in _IMG_SPAN.finditer(text):
            ids += self._encode_text(text[pos:m.start()], allowed)
            ids += self._encode_image(m.group(1))
            pos = m.end()
        rest = text[pos:]
        if IMG_START in rest:
            # without its </img> the span has no end, and the model would not know where the image stops
            where = rest[rest.index(IMG_START):][:80]
            raise ValueError(f"unclosed image tag: {IMG_START} without {IMG_END} in {where!r}")
        return ids + self._encode_text(rest, allowed)

    def _encode_text(self, text: str, allowed: set) -> list[int]:
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=()) if text else []

    def batch_encode(self, texts: Sequence[str], padding_side: str = "left", pad_id: int | None = None):
        """Encode and pad to one length: (input_ids LongTensor [B, T], attention_mask LongTensor [B, T]).

        Left padding (the default) puts every prompt's last token in the last column, which generation needs.
        """
        if isinstance(texts, str):
            raise TypeError("batch_encode expects a list of texts, got a single str; wrap it in a list or use encode")
        return self.pad_rows([self.encode(t) for t in texts], padding_side, pad_id)

    def pad_rows(self, rows: Sequence[Sequence[int]], padding_side: str = "left", pad_id: int | None = None):
        """Rows of ids padded to one length: (input_ids LongTensor [B, T], attention_mask LongTensor [B, T])."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad = self.eod_id if pad_id is None else int(pad_id)
        rows = [list(r) for r in rows]
        if not rows:
            raise ValueError("no rows to pad (got an empty list)")
        if not all(rows):
            raise ValueError(f"row {[len(r) for r in rows].index(0)} is empty: every prompt needs at least one token")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids, mask

    # --- decoding ----------------------------------------------------------------------------------------------
    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1}). A negative id "
                    f"is usually an ignore_index label; an id past the vocabulary comes from a model whose embedding "
                    f"is padded beyond the tokenizer: mask logits >= tokenizer.vocab_size when sampling"
                )

    def _image_path_bytes(self, inner: list[int]) -> bytes:
        # the path runs up to the first <imgpad>; a path that fills the whole span has none
        out = bytearray()
        for i in inner:
            if i == self.img_pad_id or i > 255:
                break
            out.append(i)
        return bytes(out)

    def decode(self, ids, skip_special_tokens: bool = False, show_images: bool = True, errors: str = "replace") -> str:
        """Text of token ids. An image span becomes `<img>path</img>` (or nothing with show_images=False).

        skip_special_tokens drops every special token, as the official tokenizer does: an image span then leaves
        only its path. Invalid UTF-8 (e.g. a stream cut inside a character) becomes U+FFFD with errors="replace";
        to stream text without broken characters, feed `decode_bytes` to an incremental UTF-8 decoder.
        """
        return self.decode_bytes(ids, skip_special_tokens, show_images).decode("utf-8", errors=errors)

    def decode_bytes(self, ids, skip_special_tokens: bool = False, show_images: bool = True) -> bytes:
        """The UTF-8 bytes `decode` decodes; the bytes of a prefix of ids are a prefix of these."""
        ids = _to_id_list(ids)
        self._check_ids(ids)
        out = bytearray()
        run: list[int] = []

        def flush():
            if run:
                out.extend(self._enc.decode_bytes(run))
                run.clear()

        i = 0
        while i < len(ids):
            t = ids[i]
            if t == self.img_start_id:
                try:
                    end = ids.index(self.img_end_id, i + 1)
                except ValueError:
                    end = None  # a span cut short (e.g. generation stopped inside it): decode what is there
                inner = ids[i + 1:end] if end is not None else ids[i + 1:]
                if show_images:
                    flush()
                    if not skip_special_tokens:
                        out.extend(IMG_START.encode())
                    out.extend(self._image_path_bytes(inner))
                    if end is not None and not skip_special_tokens:
                        out.extend(IMG_END.encode())
                i = len(ids) if end is None else end + 1
                continue
            if t in self._special_bytes:
                if not skip_special_tokens:
                    run.append(t)
            else:
                run.append(t)
            i += 1
        flush()
        return bytes(out)

    def convert_ids_to_tokens(self, ids) -> list:
        """Each id's token: bytes for BPE tokens (they need not be valid UTF-8 alone), str for special tokens."""
        ids = _to_id_list(ids)
        self._check_ids(ids)
        return [self._special_bytes[i].decode("ascii") if i in self._special_bytes
                else self._enc.decode_single_token_bytes(i) for i in ids]

    def image_paths(self, ids) -> list[str]:
        """Paths of the image spans in ids, in order; a 2-D tensor or a list of rows is read row by row."""
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return [p for row in ids for p in self.image_paths(row)]
        if isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], (list, tuple, torch.Tensor)):
            return [p for row in ids for p in self.image_paths(row)]
        ids = _to_id_list(ids)
        paths = []
        i = 0
        while True:
            try:
                start = ids.index(self.img_start_id, i)
            except ValueError:
                return paths
            inner = ids[start + 1:start + 1 + self.n_image_tokens]
            end = start + 1 + self.n_image_tokens
            if len(inner) < self.n_image_tokens or end >= len(ids) or ids[end] != self.img_end_id:
                raise ValueError(
                    f"the image span at position {start} is not {self.n_image_tokens} inner ids closed by </img> "
                    f"(id {self.img_end_id}): the ids were cut (truncation?) or made with another n_image_tokens "
                    f"than this tokenizer's {self.n_image_tokens}"
                )
            paths.append(self._image_path_bytes(inner).decode("utf-8", errors="replace"))
            i = end + 1

    # --- prompts -----------------------------------------------------------------------------------------------
    @staticmethod
    def from_list_format(items: Iterable[dict]) -> str:
        """The official prompt text of a list of {"image": path} / {"text": str} / {"box": .., "ref": ..} items
        (see `qwenvl.prompts.from_list_format`)."""
        from .prompts import from_list_format

        return from_list_format(items)
