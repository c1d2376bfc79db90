"""Checks of what `QwenVL.forward` is given, done before any heavy step, and the layout they establish.

Each check raises ValueError (TypeError for a wrong kind of object) with what was wrong and what to pass instead.
The loss's two conventions also live here, written once: labels equal to IGNORE_INDEX are not trained on, and the
label at position t is predicted by the token at t - 1 (`next_token_targets`).

Under torch.compile a check that reads tensor values cannot branch on the host without breaking the graph (and
syncing): there it becomes an assertion traced into the graph (`_assert_in_graph`), raised as a RuntimeError with the
same kind of message when the graph runs (a device-side assert on CUDA). Eager mode keeps the detailed messages.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _assert_in_graph(ok: torch.Tensor, message: str) -> None:
    """A value check inside torch.compile: traced as an op (no graph break, no host sync), raised when it runs."""
    torch._assert_async(ok, message)


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The target of each position but the last, `[B, T - 1]`: labels shifted left by one, as the released code
    trains; with packed sequences, the last token of one sequence never predicts the first of the next."""
    targets = labels[:, 1:]
    if cu_seqlens is not None:
        targets = targets.clone()
        T = labels.shape[1]
        bounds = cu_seqlens[1:-1].to(labels.device, torch.long) - 1
        targets[0, bounds[(bounds >= 0) & (bounds < T - 1)]] = IGNORE_INDEX
    return targets


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def check_input_ids(input_ids, vocab_size: int) -> None:
    """`[batch, seq]` integer ids, at least one token, every id inside the embedding table."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64,
                                                                                                   torch.int32):
        raise ValueError(
            f"input_ids must be an integer [batch, seq] tensor, got {_describe(input_ids)}; tokenize with "
            f"QwenVLTokenizer.encode / batch_encode"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids of shape {tuple(input_ids.shape)} hold no token: an empty prompt cannot be run; give at least "
            f"one token (e.g. the tokenizer's <|endoftext|> id)"
        )
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if torch.compiler.is_compiling():
        _assert_in_graph(~outside.any(), f"input_ids hold a token id outside the vocabulary 0..{vocab_size - 1}")
        return
    if bool(outside.any()):
        where = outside.nonzero()[0].tolist()
        bad = int(input_ids[tuple(where)])
        raise ValueError(
            f"token id {bad} at position {where} is outside the model's vocabulary 0..{vocab_size - 1}: ids come "
            f"from the tokenizer of this checkpoint (a negative id is usually an ignore_index label, not an input)"
        )


def check_labels(labels, input_ids: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {_describe(labels)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids ({IGNORE_INDEX} = not trained on), got {labels.dtype}")
    valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab_size))
    if torch.compiler.is_compiling():
        _assert_in_graph(valid.all(), f"labels must be token ids 0..{vocab_size - 1} or {IGNORE_INDEX} (ignored)")
        return
    if not bool(valid.all()):
        bad = int(labels[~valid][0])
        raise ValueError(f"label {bad} is neither a token id 0..{vocab_size - 1} nor the ignore index {IGNORE_INDEX}")


def check_cu_seqlens(cu_seqlens, input_ids: torch.Tensor) -> None:
    """Packed sequences: one row `[1, total]`, boundaries 0 = c0 < c1 < ... = total."""
    B, T = input_ids.shape
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of sequence boundaries, got {_describe(cu_seqlens)}")
    if B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) take one row [1, total], got {B} rows")
    cu = cu_seqlens.tolist()
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != T or any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to the row length {T}, got {cu[:8]}"
                         f"{' ...' if len(cu) > 8 else ''}")


def padding_starts(attention_mask, T_total: int, use_cache: bool):
    """Index of each row's first real token from a 0/1 padding mask, or None when no row is left-padded.

    Under torch.compile the checks run inside the graph and the starts are always returned (0, which masks nothing,
    for a row without left padding), so the graph's structure never depends on the mask's values."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a 0/1 [batch, {T_total}] tensor, got {_describe(attention_mask)}")
    if attention_mask.dim() != 2 or attention_mask.shape[1] != T_total:
        raise ValueError(f"attention_mask must be [batch, {T_total}] (past + new tokens), got "
                         f"{tuple(attention_mask.shape)}")
    m = attention_mask.to(torch.int32)
    ones = m.sum(1)
    first = torch.argmax(m, dim=1)
    idx = torch.arange(T_total, device=m.device)[None]
    expected = ((idx >= first[:, None]) & (idx < (first + ones)[:, None])).to(torch.int32)
    binary = ((attention_mask == 0) | (attention_mask == 1)).all()
    messages = [
        (binary, f"attention_mask must be a 0/1 [batch, {T_total}] tensor, got other values"),
        ((expected == m).all(), "attention_mask must be padding only: zeros on the left (batched generation) and/or "
                                "on the right (training batches), ones in between"),
        ((ones > 0).all(), "attention_mask has a row with no real token"),
    ]
    if use_cache:
        messages.append(((first + ones == T_total).all(),
                         "generation with a KV cache needs left padding: pad on the left, not the right"))
    if torch.compiler.is_compiling():
        for ok, message in messages:
            _assert_in_graph(ok, message)
        return first.to(torch.int32)
    for ok, message in messages:
        if not bool(ok):
            raise ValueError(message)
    return first.to(torch.int32) if bool((first > 0).any()) else None


def _malformed_span(vision) -> str:
    return (f"malformed image span: each <img> (id {vision.image_start_id}) must be followed by exactly "
            f"{vision.n_queries} ids and then </img> (id {vision.image_end_id}); build prompts with the tokenizer, "
            f"which pads each span")


def _span_positions(input_ids, starts, vision):
    """Rows and `[N, n_queries]` inner positions of the spans opened at `starts [N, 2]`, and whether each closes."""
    n, T = vision.n_queries, input_ids.shape[1]
    rows, cols = starts[:, 0], starts[:, 1]
    end_at = cols + n + 1
    closed = (end_at < T) & (input_ids[rows, end_at.clamp(min=0, max=T - 1)] == vision.image_end_id)
    return rows, cols[:, None] + 1 + torch.arange(n, device=input_ids.device), closed


def image_spans(input_ids: torch.Tensor, vision):
    """(rows, [N, n_queries] positions) of the image spans, or None; checks that every span is well formed."""
    starts = (input_ids == vision.image_start_id).nonzero()
    n_ends = int((input_ids == vision.image_end_id).sum())
    if starts.shape[0] == 0 and n_ends == 0:
        return None
    rows, pos, closed = _span_positions(input_ids, starts, vision)
    if not bool(closed.all()) or n_ends != starts.shape[0]:
        raise ValueError(_malformed_span(vision))
    return rows, pos


def image_spans_static(input_ids: torch.Tensor, vision, n_images: int):
    """`image_spans` under torch.compile: the number of spans is the number of images given (a shape, not a value
    read from the ids, so nothing in the graph has a data-dependent shape) and the checks are assertions in it."""
    is_start, is_end = input_ids == vision.image_start_id, input_ids == vision.image_end_id
    _assert_in_graph((is_start.sum() == n_images) & (is_end.sum() == n_images),
                     f"input_ids must hold one <img> ... </img> span per image given ({n_images})")
    if n_images == 0:
        return None
    rows, pos, closed = _span_positions(input_ids, torch.nonzero_static(is_start, size=n_images), vision)
    _assert_in_graph(closed.all(), _malformed_span(vision))
    return rows, pos


def check_pixel_values(pixel_values, patch_size: int) -> None:
    """`[num_images, 3, S, S]` floating-point pixels, S a multiple of the patch size."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be a [num_images, 3, H, W] tensor, got {_describe(pixel_values)}")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be floating point (normalized pixels), got {pixel_values.dtype}: "
            f"use qwenvl.processing.load_image to turn images into model inputs"
        )
    H, W = pixel_values.shape[-2:]
    if H != W or H % patch_size or H == 0:
        raise ValueError(
            f"pixel_values must be square with a side divisible by the patch size {patch_size}, got {H}x{W}"
        )


def check_image_count(n_given: int, spans, what: str = "image(s)") -> None:
    """The images given against the `<img>` spans of input_ids (compared before the ViT runs)."""
    n_spans = 0 if spans is None else spans[0].numel()
    if n_given != n_spans:
        if n_spans == 0:
            raise ValueError(f"{n_given} {what} given but input_ids hold no <img> span to receive them")
        if n_given == 0:
            raise ValueError(f"input_ids hold {n_spans} image span(s) but no pixel_values were given")
        raise ValueError(f"{n_given} {what} given for {n_spans} <img> span(s) in input_ids")


def check_image_features(features, n_queries: int, hidden: int) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or tuple(features.shape[1:]) != (n_queries,
                                                                                                       hidden):
        raise ValueError(
            f"image_features must be [num_images, {n_queries}, {hidden}] (from QwenVL.encode_images), got "
            f"{_describe(features)}"
        )
