"""Image preprocessing (hand-computed values, conversions, errors) and boxes on the [0, 1000) grid."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.drawing import BOX_COLORS, draw_boxes
from qwenvl.processing import (
    CLIP_MEAN, CLIP_STD, box_iou, denormalize_box, format_box, format_ref, images_for, load_image, load_images,
    normalize_box, parse_grounding,
)
from qwenvl.tokenizer import QwenVLTokenizer


def expected(rgb):
    """Normalized value of one colour, computed by hand: (c / 255 - mean) / std per channel."""
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)], dtype=torch.float32)


def solid(rgb, size=(2, 2), mode="RGB"):
    return Image.new(mode, size, rgb)


# --- images -----------------------------------------------------------------------------------------------------
def test_solid_colour_hand_computed():
    x = load_image(solid((10, 128, 250)), 4)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    want = expected((10, 128, 250)).view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(x, want, atol=1e-6, rtol=0)


def test_aspect_not_kept_no_crop():
    # 8 wide, 2 high: left half red, right half blue; squashed to 4x4, both halves stay whole
    img = Image.new("RGB", (8, 2), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 4, 2))
    x = load_image(img, 4)
    torch.testing.assert_close(x[:, :, 0], expected((255, 0, 0)).view(3, 1).expand(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, :, 3], expected((0, 0, 255)).view(3, 1).expand(3, 4), atol=1e-5, rtol=0)


def test_layout_matches_pil_bicubic():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)      # 7 wide, 5 high
    img = Image.fromarray(arr)
    x = load_image(img, 6)
    ref = np.asarray(img.resize((6, 6), Image.BICUBIC), dtype=np.float32) / 255
    for c in range(3):
        want = (torch.from_numpy(ref[:, :, c]) - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(x[c], want, atol=1e-6, rtol=0)


def test_mode_conversions(tmp_path):
    rgba = solid((200, 100, 50, 0), mode="RGBA")          # alpha is dropped, not composited
    torch.testing.assert_close(load_image(rgba, 3), load_image(solid((200, 100, 50)), 3))
    grey = load_image(solid(77, mode="L"), 3)
    torch.testing.assert_close(grey, load_image(solid((77, 77, 77)), 3))
    p = tmp_path / "p.png"
    solid(5, mode="P").save(p)
    assert load_image(p, 3).shape == (3, 3, 3)
    assert load_image(str(p), 3).shape == (3, 3, 3)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    # a 16-bit PNG opens as mode "I;16"; Pillow's own convert("RGB") clips it to white
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(values).save(p)
    with Image.open(p) as img:
        assert img.mode.startswith("I;16")
    eight = Image.fromarray(np.array([[0, 64], [128, 255]], dtype=np.uint8)).convert("RGB")
    torch.testing.assert_close(load_image(p, 2), load_image(eight, 2))
    torch.testing.assert_close(load_image(Image.open(p), 2), load_image(eight, 2))


def test_url_refused():
    with pytest.raises(ValueError, match="URL"):
        load_image("https://example.com/a.jpg", 4)
    with pytest.raises(ValueError, match="download"):
        load_image("http://example.com/a.jpg", 4)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png", 4)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(bad, 4)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(cut, 4)
    with pytest.raises(TypeError):
        load_image(123, 4)
    with pytest.raises(ValueError, match="image_size"):
        load_image(solid((0, 0, 0)), 0)


def test_load_images():
    x = load_images([solid((255, 0, 0)), solid((0, 255, 0))], 4)
    assert x.shape == (2, 3, 4, 4)
    assert load_images([], 4).shape == (0, 3, 4, 4)
    with pytest.raises(TypeError):
        load_images(solid((0, 0, 0)), 4)


def test_images_for_order_and_root(tmp_path):
    colours = {"r.png": (255, 0, 0), "sub/g.png": (0, 255, 0), "b.png": (0, 0, 255)}
    (tmp_path / "sub").mkdir()
    for name, c in colours.items():
        solid(c).save(tmp_path / name)
    tok = QwenVLTokenizer.byte_level(image_start_id=300, n_image_tokens=16)
    ids, _ = tok.batch_encode(["<img>r.png</img><img>sub/g.png</img> two", "one <img>b.png</img>"])
    px = images_for(ids, tok, 4, root=tmp_path)
    assert px.shape == (3, 3, 4, 4)
    for k, name in enumerate(["r.png", "sub/g.png", "b.png"]):
        torch.testing.assert_close(px[k, :, 0, 0], expected(colours[name]), atol=1e-5, rtol=0)
    no_images = images_for([tok.encode("text only")], tok, 4)
    assert no_images.shape == (0, 3, 4, 4)


def test_images_for_absolute_path(tmp_path):
    p = tmp_path / "a.png"
    solid((1, 2, 3)).save(p)
    tok = QwenVLTokenizer.byte_level()
    px = images_for(torch.tensor([tok.encode(f"<img>{p}</img>")]), tok, 2, root="/somewhere/else")
    torch.testing.assert_close(px[0, :, 0, 0], expected((1, 2, 3)), atol=1e-5, rtol=0)


# --- boxes ------------------------------------------------------------------------------------------------------
def test_normalize_denormalize():
    assert normalize_box((64, 48, 320, 240), 640, 480) == (100, 100, 500, 500)
    assert normalize_box((0, 0, 640, 480), 640, 480) == (0, 0, 999, 999)       # clamped to the grid
    assert normalize_box((-5, 1, 700, 2), 640, 480) == (0, 2, 999, 4)          # int() truncates 2.08 -> 2
    assert denormalize_box((100, 100, 500, 500), 640, 480) == (64.0, 48.0, 320.0, 240.0)
    back = normalize_box(denormalize_box((123, 456, 789, 999), 301, 177), 301, 177)
    assert all(abs(a - b) <= 1 for a, b in zip(back, (123, 456, 789, 999)))
    with pytest.raises(ValueError, match="x2 < x1"):
        normalize_box((10, 0, 5, 5), 100, 100)
    with pytest.raises(ValueError, match="width and height"):
        normalize_box((1, 2, 3, 4), 0, 100)
    with pytest.raises(ValueError, match="four"):
        denormalize_box((1, 2, 3), 10, 10)


def test_format():
    assert format_box((1, 2, 3, 4)) == "<box>(1,2),(3,4)</box>"
    assert format_ref("the dog") == "<ref>the dog</ref>"
    with pytest.raises(ValueError, match="normalize_box"):
        format_box((0, 0, 1000, 5))
    with pytest.raises(ValueError, match="tag"):
        format_ref("<ref>x</ref>")


def _entry(ref, boxes=(), quads=()):
    return {"ref": ref, "boxes": list(boxes), "quads": list(quads)}


def test_parse_grounding():
    text = ("<ref>the dog</ref><box>(1,2),(3,4)</box> and <ref> two cats </ref><box>(5,6),(7,8)</box>\n"
            "<box>(9, 10), (11, 12)</box>, plus <box>(13,14),(15,16)</box><box>(17,18),(19,20)</box>"
            " <ref>nothing</ref> here <box>(21,22),(23,24)</box>")
    assert parse_grounding(text) == [
        _entry("the dog", [(1, 2, 3, 4)]),
        _entry("two cats", [(5, 6, 7, 8), (9, 10, 11, 12)]),
        _entry(None, [(13, 14, 15, 16), (17, 18, 19, 20)]),
        _entry(None, [(21, 22, 23, 24)]),
    ]
    assert parse_grounding("no boxes here") == []
    # what format_ref / format_box write parses back
    assert parse_grounding(format_ref("x") + format_box((1, 2, 3, 4))) == [_entry("x", [(1, 2, 3, 4)])]
    bad = "<ref>a</ref><box>(1,2)</box><box>(1,2),(3,4)</box>"
    with pytest.raises(ValueError, match="malformed"):
        parse_grounding(bad)
    assert parse_grounding(bad, strict=False) == [_entry("a", [(1, 2, 3, 4)])]


def test_parse_grounding_quads():
    # OCR grounding: the four corners of a rotated word, alone or mixed with boxes under one ref
    text = ("<ref>STOP</ref><quad>(10,20),(90,25),(88,60),(8,55)</quad> and "
            "<ref>sign</ref><box>(1,2),(3,4)</box><quad>(5, 6),(7,8),(9,10),(11,12)</quad>")
    assert parse_grounding(text) == [
        _entry("STOP", quads=[(10, 20, 90, 25, 88, 60, 8, 55)]),
        _entry("sign", [(1, 2, 3, 4)], [(5, 6, 7, 8, 9, 10, 11, 12)]),
    ]
    for bad in ("<quad>(1,2),(3,4)</quad>", "<quad>(1,2),(3,4),(5,6),(7,8)</box>"):
        with pytest.raises(ValueError, match="malformed quad"):
            parse_grounding(bad)
        assert parse_grounding(bad, strict=False) == []


def test_box_iou():
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_draw_boxes(tmp_path):
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    src = tmp_path / "src.png"
    img.save(src)
    parsed = [{"ref": "thing", "boxes": [(250, 200, 750, 800)]}, {"ref": None, "boxes": [(0, 0, 100, 100)]}]
    out = tmp_path / "out.png"
    drawn = draw_boxes(src, parsed, out)
    with Image.open(out) as saved:
        assert saved.format == "PNG" and saved.size == (200, 100)
        saved = saved.convert("RGB")
        # the first box is (50, 20)-(150, 80) in pixels: its left and bottom edges carry the first colour, 2 px wide
        assert saved.getpixel((50, 60)) == saved.getpixel((51, 60)) == BOX_COLORS[0]
        assert saved.getpixel((100, 79)) == BOX_COLORS[0]
        assert saved.getpixel((100, 50)) == (255, 255, 255)       # inside stays untouched
        assert saved.getpixel((0, 5)) == BOX_COLORS[1]
    assert drawn.size == (200, 100)
    with Image.open(src) as original:
        assert original.convert("RGB").getpixel((50, 60)) == (255, 255, 255)   # drawn on a copy
    with pytest.raises(ValueError, match="boxes"):
        draw_boxes(img, [{"ref": "x"}], tmp_path / "x.png")


def test_drawn_boxes_are_visible_at_any_size(tmp_path):
    """Lines scale with the picture, a box on a shape of its own colour keeps a contrasting halo, labels stay
    inside the picture, and a title band shows the question."""
    big = Image.new("RGB", (1200, 900), BOX_COLORS[0])  # the whole picture is the first box's colour
    drawn = draw_boxes(big, [{"ref": "a long label that would not fit", "boxes": [(900, 0, 999, 500)]}],
                       tmp_path / "big.png")
    x1 = round(900 / 1000 * 1200)
    line = round(900 / 150)
    assert all(drawn.getpixel((x1 + k, 300)) == BOX_COLORS[0] for k in range(line))
    halo = [drawn.getpixel((x1 - 1, 300)), drawn.getpixel((x1 + line, 300))]
    assert all(p in ((0, 0, 0), (255, 255, 255)) for p in halo), halo
    assert drawn.getpixel((1199, 5)) != BOX_COLORS[0]  # the label was shifted left to stay in the picture
    titled = draw_boxes(Image.new("RGB", (100, 100), "white"), [{"ref": None, "boxes": [(0, 0, 500, 500)]}],
                        tmp_path / "t.png", title="Where is the red circle?")
    assert titled.size[0] == 100 and titled.size[1] > 100  # a band above the picture
    assert any(sum(titled.getpixel((x, y))) < 200 for x in range(100) for y in range(titled.size[1] - 100))


def test_draw_quads(tmp_path):
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    quad = (250, 200, 750, 200, 750, 800, 250, 800)  # an axis-aligned quad: (50, 20)-(150, 80) in pixels
    drawn = draw_boxes(img, [{"ref": "word", "boxes": [], "quads": [quad]}], tmp_path / "q.png")
    assert drawn.getpixel((100, 20)) == BOX_COLORS[0] and drawn.getpixel((50, 50)) == BOX_COLORS[0]
    assert drawn.getpixel((100, 50)) == (255, 255, 255)
