"""Pictures of grounded answers: boxes on the [0, 1000) grid drawn over the image, readable at any image size.

Lines and labels scale with the picture (a 2000-pixel photo gets thicker lines and larger text than a 100-pixel
icon), each box has a 1-pixel halo of the contrasting shade so that it shows on a shape of its own colour, labels
are kept inside the picture, and an optional title band above the picture says what was asked.
"""
from __future__ import annotations

import os
import textwrap
from typing import Iterable

from PIL import Image, ImageDraw, ImageFont

from .processing import GRID, denormalize_box, open_rgb

# one colour per parsed entry, cycled; saturated so the boxes stand out on photos
BOX_COLORS = ((255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 160, 0), (200, 0, 200), (0, 200, 200), (255, 255, 0))


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)  # scalable with FreeType (Pillow >= 10.1)
    except TypeError:  # pragma: no cover - old Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _contrast(rgb) -> tuple:
    """Black or white, whichever stands out more against rgb (Rec. 601 luma)."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


def _check_out(out_path) -> str:
    out_path = os.fspath(out_path)
    parent = os.path.dirname(out_path)
    if parent and not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot save to {out_path}: the folder {parent} does not exist")
    return out_path


def _label(draw, img_size, box, text, color, font, line):
    """The entry's name on a filled tag above the box's top-left corner (inside it when there is no room)."""
    w, h = img_size
    x1, y1 = box[0], box[1]
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    tw, th = r - l + 2 * line, b - t + 2 * line
    x = min(max(0, x1), max(0, w - tw))
    y = y1 - th if y1 - th >= 0 else min(y1 + line, max(0, h - th))
    draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=color, outline=_contrast(color))
    draw.text((x + line - l, y + line - t), text, fill=_contrast(color), font=font)


def _with_title(img: Image.Image, title: str, font, pad: int) -> Image.Image:
    w, _ = img.size
    probe = ImageDraw.Draw(img)
    char_w = max(1, probe.textlength("n", font=font))
    lines = textwrap.wrap(title, width=max(8, int((w - 2 * pad) / char_w))) or [""]
    l, t, r, b = probe.textbbox((0, 0), "Ag", font=font)
    line_h = b - t + pad // 2
    band = 2 * pad + line_h * len(lines)
    out = Image.new("RGB", (w, img.size[1] + band), (255, 255, 255))
    out.paste(img, (0, band))
    draw = ImageDraw.Draw(out)
    for k, text in enumerate(lines):
        draw.text((pad, pad + k * line_h - t), text, fill=(0, 0, 0), font=font)
    return out


def draw_boxes(image, parsed: Iterable[dict], out_path, title: str | None = None) -> Image.Image:
    """Draw parsed grounding (from parse_grounding) on a copy of image and save it as PNG at out_path.

    Boxes and quads are on the [0, 1000) grid and are scaled to the image's own size; each entry gets one colour and its ref
    written on a tag at its first box. `title` (e.g. the question) goes in a band above the picture. Returns the
    drawn image.
    """
    out_path = _check_out(out_path)
    entries = list(parsed)
    for entry in entries:
        if not isinstance(entry, dict) or "boxes" not in entry:
            raise ValueError(
                f"each parsed entry is a dict with 'boxes' (and 'ref'), as parse_grounding returns; got {entry!r}"
            )
    img = open_rgb(image).copy()
    w, h = img.size
    side = min(w, h)
    line = max(2, round(side / 150))
    font = _font(max(10, round(side / 28)))
    draw = ImageDraw.Draw(img)
    for n, entry in enumerate(entries):
        color = BOX_COLORS[n % len(BOX_COLORS)]
        for k, box in enumerate(entry["boxes"]):
            x1, y1, x2, y2 = (round(v) for v in denormalize_box(box, w, h))
            x2, y2 = max(x1, x2 - 1), max(y1, y2 - 1)
            halo = _contrast(color)
            draw.rectangle([x1 - 1, y1 - 1, x2 + 1, y2 + 1], outline=halo, width=line + 2)
            draw.rectangle([x1, y1, x2, y2], outline=color, width=line)
            if k == 0 and entry.get("ref"):
                _label(draw, (w, h), (x1, y1), str(entry["ref"]), color, font, line)
        for k, quad in enumerate(entry.get("quads", ())):
            corners = [(round(x / GRID * w), round(y / GRID * h)) for x, y in zip(quad[0::2], quad[1::2])]
            draw.polygon(corners, outline=_contrast(color), width=line + 2)
            draw.polygon(corners, outline=color, width=line)
            if k == 0 and not entry["boxes"] and entry.get("ref"):
                _label(draw, (w, h), min(corners, key=lambda c: (c[1], c[0])), str(entry["ref"]), color, font, line)
    if title:
        img = _with_title(img, title, font, pad=line * 3)
    img.save(out_path, format="PNG")
    return img
