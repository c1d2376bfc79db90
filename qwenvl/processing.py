"""Inputs around the model: images to pixel tensors, and boxes on Qwen-VL's [0, 1000) grid.

Preprocessing is the released model's: PIL bicubic resize straight to image_size x image_size (the aspect ratio is
not kept and nothing is cropped, so the whole picture is seen), scale to [0, 1], normalize with CLIP's statistics.
Boxes appear in text as `<box>(x1,y1),(x2,y2)</box>` with integer corners on a 1000 x 1000 grid of the image,
whatever its size, optionally preceded by `<ref>what</ref>`.
"""
from __future__ import annotations

import math
import os
import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GRID = 1000  # box corners are integers in [0, GRID)



# --- images ------------------------------------------------------------------------------------------------------
def _check_size(image_size) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (448 for the released model), got {image_size!r}")
    return image_size


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """RGB of any Pillow mode. 16-bit and 32-bit grey images (a 16-bit PNG opens as "I;16") are scaled to 8 bits
    first: Pillow's own conversion clips them, which turns nearly every 16-bit picture white."""
    if img.mode not in _HIGH_DEPTH:
        return img.convert("RGB")
    a = np.asarray(img).astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        full = 65535.0
    elif lo >= 0 and hi <= 1.0 and img.mode == "F":
        full = 1.0
    elif lo >= 0 and hi <= 255:
        full = 255.0
    elif lo >= 0 and hi <= 65535 and img.mode == "I":
        full = 65535.0
    else:
        raise ValueError(
            f"{name}: a {img.mode!r} image with values {lo:g}..{hi:g}; only 8- and 16-bit ranges are understood: "
            f"convert it to an 8-bit RGB or greyscale file"
        )
    grey = np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def open_rgb(image) -> Image.Image:
    """A path or PIL.Image as a decoded RGB image; a missing, unreadable or URL path is refused with its name."""
    if isinstance(image, Image.Image):
        return _to_rgb(image, "the image")
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected an image path (str or Path) or a PIL.Image, got {type(image).__name__}")
    path = os.fspath(image)
    if path.startswith(("http://", "https://")):
        raise ValueError(
            f"{path!r} is a URL: images are never fetched over the network here; download it yourself and pass the "
            f"local file"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected an image file, got the folder {path}")
    try:
        with Image.open(path) as img:
            # PIL decodes lazily: force the decode here so a truncated file fails with its name attached
            img.load()
            return _to_rgb(img, path)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"cannot read {path} as an image ({type(e).__name__}: {e}); is the file corrupt or truncated?"
        ) from None


def load_image(image, image_size: int) -> torch.Tensor:
    """An image path or PIL.Image as the model's input: FloatTensor [3, S, S], CLIP-normalized."""
    size = _check_size(image_size)
    img = open_rgb(image).resize((size, size), Image.BICUBIC)
    # the order of the float32 operations follows ToTensor then Normalize, so values match the official pipeline
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub(mean).div(std).contiguous()


def load_images(images: Sequence, image_size: int) -> torch.Tensor:
    """Several images as one batch: FloatTensor [N, 3, S, S] ([0, 3, S, S] for none)."""
    size = _check_size(image_size)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        raise TypeError("load_images expects a list of images; for one image use load_image or wrap it in a list")
    tensors = [load_image(im, size) for im in images]
    if not tensors:
        return torch.empty(0, 3, size, size)
    return torch.stack(tensors)


def images_for(ids_batch, tokenizer, image_size: int, root=None) -> torch.Tensor:
    """pixel_values for token-id rows: every image span's image, row by row, in the order the spans appear.

    Relative paths are read under root when it is given (absolute ones as they are).
    """
    if isinstance(ids_batch, torch.Tensor):
        if ids_batch.dim() == 1:
            ids_batch = ids_batch.unsqueeze(0)
        if ids_batch.dim() != 2:
            raise ValueError(f"ids_batch must be [B, T] token ids, got shape {tuple(ids_batch.shape)}")
        rows = list(ids_batch)
    else:
        rows = list(ids_batch)
        if rows and not isinstance(rows[0], (list, tuple, torch.Tensor, np.ndarray)):
            rows = [rows]  # one flat row of ids
    paths = [p for row in rows for p in tokenizer.image_paths(row)]
    if root is not None:
        root = os.fspath(root)
        paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in paths]
    return load_images(paths, image_size)


# --- boxes -------------------------------------------------------------------------------------------------------
def _four(box, what="box") -> tuple:
    try:
        vals = tuple(box)
    except TypeError:
        raise TypeError(f"a {what} is (x1, y1, x2, y2), got {box!r}") from None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)
    if len(vals) != 4 or not numbers:
        raise ValueError(f"a {what} is four finite numbers (x1, y1, x2, y2), got {box!r}")
    if vals[2] < vals[0] or vals[3] < vals[1]:
        raise ValueError(f"{what} {box!r} has x2 < x1 or y2 < y1: corners must be (left, top), (right, bottom)")
    return vals


def _check_wh(width, height):
    if not (isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0):
        raise ValueError(
            f"width and height must be positive numbers (the image size in pixels), got {width!r}, {height!r}"
        )


def normalize_box(box_px, width, height) -> tuple[int, int, int, int]:
    """Pixel corners -> integer corners on the [0, 1000) grid (truncated, clamped to 0..999)."""
    _check_wh(width, height)
    x1, y1, x2, y2 = _four(box_px, "pixel box")

    def g(v, size):
        return min(max(int(v / size * GRID), 0), GRID - 1)

    return g(x1, width), g(y1, height), g(x2, width), g(y2, height)


def denormalize_box(box, width, height) -> tuple[float, float, float, float]:
    """Grid corners -> pixel corners (floats) for an image of width x height."""
    _check_wh(width, height)
    x1, y1, x2, y2 = _four(box)
    return x1 / GRID * width, y1 / GRID * height, x2 / GRID * width, y2 / GRID * height


def format_box(box) -> str:
    """`<box>(x1,y1),(x2,y2)</box>` of a box already on the [0, 1000) grid."""
    vals = _four(box)
    if any(v < 0 or v >= GRID for v in vals):
        raise ValueError(f"box {box!r} is not on the [0, {GRID}) grid; convert pixel boxes with normalize_box first")
    x1, y1, x2, y2 = (int(v) for v in vals)
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def format_ref(ref: str) -> str:
    """`<ref>ref</ref>`: names the object the following box(es) belong to."""
    if not isinstance(ref, str):
        raise TypeError(f"ref must be a str, got {type(ref).__name__}")
    if "<ref>" in ref or "</ref>" in ref:
        raise ValueError(f"ref {ref!r} already contains a <ref> tag; pass the bare text")
    return f"<ref>{ref}</ref>"


_TAG = re.compile(r"<ref>(.*?)</ref>|<(box|quad)>(.*?)</(?:box|quad)>", re.DOTALL)
_POINT = r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*"
_BODY = {"box": re.compile(",".join([_POINT] * 2)), "quad": re.compile(",".join([_POINT] * 4))}
_LIST = {"box": "boxes", "quad": "quads"}
_EXPECTED = {"box": "<box>(x1,y1),(x2,y2)</box>", "quad": "<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>"}


def parse_grounding(text: str, strict: bool = True) -> list[dict]:
    """Every `<ref>..</ref>` followed by one or more regions, and every run of regions without a ref.

    A region is a box `<box>(x1,y1),(x2,y2)</box>` or a quadrilateral `<quad>(x1,y1),..,(x4,y4)</quad>` (the four
    corners of rotated text in Qwen-VL's OCR grounding data), both on the [0, 1000) grid. Returns
    [{"ref": str | None, "boxes": [(x1, y1, x2, y2), ...], "quads": [(x1, y1, .., x4, y4), ...]}] in text order.
    Only whitespace may separate a ref from its regions and the regions of one run; a ref not followed by a region
    is skipped. A region whose content does not match raises ValueError, or is skipped with strict=False (model
    output can be malformed).
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_grounding expects a str, got {type(text).__name__}")
    out: list[dict] = []
    current = None      # the entry that a following region joins
    last_end = 0
    for m in _TAG.finditer(text):
        if text[last_end:m.start()].strip():
            current = None  # text in between ends a group
        last_end = m.end()
        if m.group(1) is not None:
            current = {"ref": m.group(1).strip(), "boxes": [], "quads": []}
            continue
        kind, content = m.group(2), m.group(3)
        body = _BODY[kind].fullmatch(content)
        if body is None or not m.group(0).endswith(f"</{kind}>"):
            if strict:
                raise ValueError(
                    f"malformed {kind} {m.group(0)!r}: expected {_EXPECTED[kind]} with integers; "
                    f"pass strict=False to skip such regions"
                )
            continue
        if current is None:
            current = {"ref": None, "boxes": [], "quads": []}
        if not (current["boxes"] or current["quads"]):
            out.append(current)
        current[_LIST[kind]].append(tuple(int(v) for v in body.groups()))
    return out


def box_iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in the same coordinates; 0.0 when both are empty."""
    ax1, ay1, ax2, ay2 = _four(a)
    bx1, by1, bx2, by2 = _four(b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return float(inter / union) if union > 0 else 0.0
