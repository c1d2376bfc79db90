"""Training data: ChatML/plain formatting and loss masks, malformed records, batch plans, packing, synthetic set."""
import json

import pytest
import torch
from PIL import Image

from qwenvl.tokenizer import QwenVLTokenizer
from qwenvl.train.data import Examples, PlanSpec, collate, count_targets, plan
from qwenvl.inputs import IGNORE_INDEX as IGNORE
from qwenvl.train.formatting import MalformedRecord, encode, prompt
from qwenvl.tokenizer import IMAGE_SPECIALS
from qwenvl.train.sources import FileSource, SyntheticSource
from qwenvl.train.synthetic import KINDS, SyntheticTasks, parse_mix

TOK = QwenVLTokenizer.byte_level(image_start_id=300, n_image_tokens=16)


def _targets(ids, labels):
    """The text of each run of supervised tokens."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(TOK.decode(cur))
            cur = []
    if cur:
        runs.append(TOK.decode(cur))
    return runs


CONV = {"id": "c1", "conversations": [
    {"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat is it?"},
    {"from": "assistant", "value": "A cat."},
    {"from": "user", "value": "Where?"},
    {"from": "assistant", "value": "<ref>the cat</ref><box>(1,2),(3,4)</box>"},
]}


def test_chatml_masks_everything_but_the_replies():
    ids, labels = encode(CONV, TOK, "chatml", system="You are a helpful assistant.")
    assert _targets(ids, labels) == ["A cat.<|im_end|>", "<ref>the cat</ref><box>(1,2),(3,4)</box><|im_end|>"]
    # the text is exactly the inference prompt of the last turn followed by the reply
    prompt_ids, reference = prompt(CONV, TOK, "chatml", system="You are a helpful assistant.")
    assert prompt_ids + TOK.encode(reference, allowed_special=IMAGE_SPECIALS) + [TOK.im_end_id] == ids
    assert reference == CONV["conversations"][-1]["value"]
    # the image span is in the input, never a target
    start = ids.index(TOK.img_start_id)
    assert all(lab == IGNORE for lab in labels[start:start + 18])


def test_plain_style_and_caption_pairs():
    ids, labels = encode({"id": "p", "image": "x.png", "caption": "a red circle"}, TOK, "plain")
    assert TOK.decode(ids).startswith("Picture 1: <img>x.png</img>\n")
    assert _targets(ids, labels) == ["a red circle<|endoftext|>"]
    ids, labels = encode(CONV, TOK, "plain")
    assert _targets(ids, labels)[-1].endswith("</box><|endoftext|>")


@pytest.mark.parametrize("record,match", [
    ({"id": "r1", "conversations": []}, "non-empty list"),
    ({"id": "r2", "conversations": [{"from": "user", "value": "hi"}]}, "last turn must be the assistant"),
    ({"id": "r3", "conversations": [{"from": "assistant", "value": "x"}]}, "alternate"),
    ({"id": "r4", "conversations": [{"from": "robot", "value": "x"}, {"from": "assistant", "value": "y"}]},
     "unknown role"),
    ({"id": "r5", "conversations": [{"from": "user", "value": "<img>a.png"}, {"from": "assistant", "value": "y"}]},
     "unclosed"),
    ({"id": "r6", "conversations": [{"from": "user", "value": "<img>" + "x" * 40 + "</img>"},
                                    {"from": "assistant", "value": "y"}]}, "too long"),
    ({"id": "r7", "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "  "}]}, "empty"),
    ({"id": "r8", "image": "a.png"}, "caption"),
    ({"id": "r9", "conversations": [{"from": "user"}, {"from": "assistant", "value": "y"}]}, "string 'value'"),
])
def test_malformed_records_name_their_id(record, match):
    with pytest.raises(MalformedRecord, match=match) as e:
        encode(record, TOK, "chatml")
    assert e.value.record_id == record["id"]


def test_too_long_is_refused_not_truncated():
    with pytest.raises(MalformedRecord, match="exceed the maximum sequence length"):
        encode(CONV, TOK, "chatml", max_len=20)


def _write_file(tmp_path, records, lines=False):
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "a.png")
    path = tmp_path / ("d.jsonl" if lines else "d.json")
    if lines:
        path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


GOOD = {"id": "good", "conversations": [{"from": "user", "value": "Picture 1: <img>a.png</img>\nColour?"},
                                        {"from": "assistant", "value": "red"}]}
MISSING_IMAGE = {"id": "noimg", "conversations": [{"from": "user", "value": "<img>b.png</img>"},
                                                  {"from": "assistant", "value": "x"}]}
NO_REPLY = {"id": "noreply", "conversations": [{"from": "user", "value": "hello"}]}


def test_malformed_file_refused_with_every_id(tmp_path):
    path = _write_file(tmp_path, [GOOD, MISSING_IMAGE, NO_REPLY])
    with pytest.raises(MalformedRecord) as e:
        Examples(FileSource(path), TOK, "chatml", "", 28, 512, bad="error")
    msg = str(e.value)
    assert "2 malformed record(s) of 3" in msg and "noimg" in msg and "noreply" in msg and "--bad-records skip" in msg


def test_malformed_file_skipped_and_reported(tmp_path, caplog):
    path = _write_file(tmp_path, [GOOD, MISSING_IMAGE, "{not json", NO_REPLY], lines=True)
    with caplog.at_level("WARNING", logger="qwenvl.train"):
        ex = Examples(FileSource(path), TOK, "chatml", "", 28, 512, bad="skip")
    assert ex.valid == [0]
    assert {rid for rid, _ in ex.skipped} == {"noimg", "d.jsonl:3", "noreply"}
    assert "noimg" in caplog.text
    ids, labels, px, rid = ex.load(0)
    assert rid == "good" and px.shape == (1, 3, 28, 28)


def test_unreadable_image_in_a_worker_is_reported(tmp_path):
    path = _write_file(tmp_path, [GOOD])
    (tmp_path / "a.png").write_bytes(b"not a png")
    ex = Examples(FileSource(path), TOK, "chatml", "", 28, 512, bad="skip")
    batch = collate([ex.load(0)], TOK.eod_id, 28)
    assert batch.empty and batch.skipped[0][0] == "good"
    ex.bad = "error"
    with pytest.raises(MalformedRecord, match="cannot load its image"):
        ex.load(0)


def _synthetic_examples(n=10_000, mix="grounding=2,vqa=1"):
    tasks = SyntheticTasks(seed=3, split="train", canvas=56, mix=mix, size=n)
    return Examples(SyntheticSource(tasks), TOK, "chatml", "", 28, 512, validate=False)


def test_plan_same_global_batch_whatever_the_split():
    ex = _synthetic_examples()
    one = plan(ex, PlanSpec(batch_size=8, shuffle=False), steps=5)
    accum = plan(ex, PlanSpec(batch_size=4, grad_accum=2, shuffle=False), steps=5)
    r0 = plan(ex, PlanSpec(batch_size=4, world=2, shuffle=False), steps=5, rank=0)
    r1 = plan(ex, PlanSpec(batch_size=4, world=2, shuffle=False), steps=5, rank=1)
    for s in range(5):
        assert one[s] == accum[2 * s] + accum[2 * s + 1] == r0[s] + r1[s]
    # bucketing: each micro-batch holds neighbouring lengths, so padding stays small
    for mb in accum:
        lengths = [ex.length(i) for i in mb]
        assert max(lengths) - min(lengths) <= max(lengths) // 2
    assert plan(ex, PlanSpec(batch_size=8, shuffle=False), steps=5) == one  # deterministic


def test_file_plan_shuffles_per_epoch_and_covers_everything(tmp_path):
    records = [dict(GOOD, id=f"g{i}") for i in range(12)]
    ex = Examples(FileSource(_write_file(tmp_path, records)), TOK, "chatml", "", 28, 512)
    micro = plan(ex, PlanSpec(batch_size=3, seed=1, pool=1), steps=8)
    first_epoch = sorted(i for mb in micro[:4] for i in mb)
    assert first_epoch == list(range(12))
    assert micro[:4] != micro[4:8]


def test_collate_padding_and_packing_agree_on_targets():
    ex = _synthetic_examples()
    items = [ex.load(i) for i in range(3)]
    padded = collate(items, TOK.eod_id, 28)
    packed = collate(items, TOK.eod_id, 28, pack=True)
    assert padded.n_targets == packed.n_targets == sum(sum(lab != IGNORE for lab in it[1]) for it in items)
    assert packed.input_ids.shape == (1, sum(len(it[0]) for it in items))
    assert packed.cu_seqlens.tolist() == [0, len(items[0][0]), len(items[0][0]) + len(items[1][0]),
                                             packed.input_ids.shape[1]]
    assert padded.pixel_values.shape == (3, 3, 28, 28)
    assert count_targets(padded.labels) == padded.n_targets


def test_packed_loss_equals_padded_loss():
    from qwenvl.config import QwenVLConfig
    from qwenvl.model import QwenVL

    torch.manual_seed(0)
    config = QwenVLConfig.from_name("tiny").replace(vision={"n_queries": 16, "image_size": 56})
    model = QwenVL(config, kernels="torch").eval()
    ex = _synthetic_examples()
    items = [ex.load(i) for i in range(3)]
    padded = collate(items, TOK.eod_id, 28)
    packed = collate(items, TOK.eod_id, 28, pack=True)
    with torch.no_grad():
        a = model(padded.input_ids, pixel_values=padded.pixel_values, labels=padded.labels).loss
        b = model(packed.input_ids, pixel_values=packed.pixel_values, labels=packed.labels,
                  cu_seqlens=packed.cu_seqlens).loss
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_packing_plan_respects_budget():
    ex = _synthetic_examples()
    micro = plan(ex, PlanSpec(batch_size=1, pack_tokens=400, shuffle=False), steps=4)
    for mb in micro:
        assert sum(ex.length(i) for i in mb) <= 400 and len(mb) >= 2


def test_synthetic_deterministic_per_seed_and_split():
    a = SyntheticTasks(seed=5, canvas=64, mix="caption=1,vqa=1,grounding=1,grounded_caption=1,ocr=1")
    b = SyntheticTasks(seed=5, canvas=64, mix="caption=1,vqa=1,grounding=1,grounded_caption=1,ocr=1")
    c = SyntheticTasks(seed=6, canvas=64, mix="caption=1,vqa=1,grounding=1,grounded_caption=1,ocr=1")
    e = SyntheticTasks(seed=5, split="eval", canvas=64, mix="caption=1,vqa=1,grounding=1,grounded_caption=1,ocr=1")
    for i in (0, 7, 123):
        assert a.record(i) == b.record(i)
        assert a.image(i).tobytes() == b.image(i).tobytes()
    texts = lambda t: [json.dumps(t.record(i)["conversations"]) for i in range(40)]  # noqa: E731
    assert texts(a) != texts(c) and texts(a) != texts(e)
    kinds = {a.record(i)["kind"] for i in range(100)}
    assert kinds == set(KINDS)


def test_synthetic_tasks_are_consistent_with_the_picture():
    from qwenvl.processing import parse_grounding

    tasks = SyntheticTasks(seed=0, canvas=100, mix="grounding=1,ocr=1")
    for i in range(30):
        rec = tasks.record(i)
        scene = tasks.scene(i)
        answer = rec["conversations"][1]["value"]
        if rec["kind"] == "grounding":
            (box,) = parse_grounding(answer)[0]["boxes"]
            assert box in [scene.grid_box(t.box) for t in scene.things]
            assert all(v % 10 == 0 or v == 999 for v in box)  # a 100-pixel canvas: corners on multiples of 10
            # the box covers the object's colour in the picture
            img = tasks.image(i)
            name = rec["conversations"][0]["value"].split("<ref>the ")[1].split("</ref>")[0]
            thing = next(t for t in scene.things if t.name == name)
            cx, cy = (int(v) for v in thing.center)
            assert img.getpixel((cx, cy)) != scene.background
        else:
            assert answer == scene.word


def test_parse_mix():
    assert parse_mix("grounding=3,vqa=1") == {"grounding": 0.75, "vqa": 0.25}
    with pytest.raises(ValueError, match="unknown"):
        parse_mix("dance=1")
    with pytest.raises(ValueError, match="kind=weight"):
        parse_mix("grounding")
