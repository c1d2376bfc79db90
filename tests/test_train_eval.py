"""Evaluation metrics on hand-made predictions, the trivial baselines, and the report of a real (tiny) run."""
import json

import pytest
import torch

from qwenvl.evaluation import scoring
from qwenvl.evaluation.answers import question_of, run
from qwenvl.evaluation.report import draw, table, write
from qwenvl.train.sources import SyntheticSource
from qwenvl.train.synthetic import SyntheticTasks


def test_grounding_hit_at_iou_half():
    ref = "<box>(100,100),(300,300)</box>"
    assert scoring.score("grounding", "<box>(100,100),(300,300)</box>", ref) == {"correct": True, "iou": 1.0}
    # shifted by a quarter of the side in x: IoU 150*200 / (2*200*200 - 150*200) = 0.6
    s = scoring.score("grounding", "<box>(150,100),(350,300)</box>", ref)
    assert s["correct"] and s["iou"] == pytest.approx(0.6)
    # shifted by half the side: IoU 1/3
    s = scoring.score("grounding", "<box>(200,100),(400,300)</box>", ref)
    assert not s["correct"] and s["iou"] == pytest.approx(1 / 3)
    # the ref before the box, swapped corners and junk are handled
    assert scoring.score("grounding", "<ref>x</ref><box>(300,300),(100,100)</box>", ref)["correct"]
    assert scoring.score("grounding", "<box>(1,2)</box> no box", ref) == {"correct": False, "iou": 0.0}
    assert scoring.score("grounding", "", ref)["correct"] is False
    with pytest.raises(ValueError, match="no <box>"):
        scoring.score("grounding", ref, "a cat")


def test_exact_match_normalization():
    assert scoring.score("vqa", " Red. ", "red")["correct"]
    assert scoring.score("caption", "a red  circle above a blue square", "A red circle above a blue square.")["correct"]
    assert not scoring.score("ocr", "CAT", "CAR")["correct"]
    assert not scoring.score("vqa", "2 ", "3")["correct"]


def test_grounded_caption_needs_text_and_every_box():
    ref = "<ref>a red circle</ref><box>(0,0),(100,100)</box> above <ref>a blue square</ref><box>(0,500),(100,600)</box>"
    good = ("<ref>a red circle</ref><box>(0,0),(100,100)</box> above "
            "<ref>a blue square</ref><box>(0,510),(100,600)</box>")
    wrong_text = good.replace("above", "left of")
    wrong_box = good.replace("(0,510)", "(500,510)")
    assert scoring.score("grounded_caption", good, ref)["correct"]
    assert not scoring.score("grounded_caption", wrong_text, ref)["correct"]
    s = scoring.score("grounded_caption", wrong_box, ref)
    assert not s["correct"] and 0.4 < s["iou"] < 0.6


def test_baseline_mean_box_and_most_common_answer():
    triples = [("grounding", "<ref>a</ref>", "<box>(0,0),(100,100)</box>"),
               ("grounding", "<ref>b</ref>", "<box>(100,100),(300,300)</box>"),
               ("vqa", "How many circles?", "1"), ("vqa", "How many circles?", "1"), ("vqa", "How many circles?", "2"),
               ("vqa", "Is there a red square?", "no"), ("ocr", "Read the text.", "CAT")]
    b = scoring.Baseline(triples)
    assert b.mean_box == (50, 50, 200, 200)
    assert b.answer("grounding", "<ref>zzz</ref>") == "<box>(50,50),(200,200)</box>"
    assert b.answer("vqa", "How many circles?") == "1"
    assert b.answer("vqa", "Is there a red square?") == "no"
    assert b.answer("vqa", "never seen?") in {"1", "no"}  # falls back to the kind's most common answer
    assert b.answer("ocr", "Read the text.") == "CAT"


def test_infer_kind_and_question():
    assert scoring.infer_kind({}, "<box>(1,2),(3,4)</box>") == "grounding"
    assert scoring.infer_kind({}, "<ref>cat</ref><box>(1,2),(3,4)</box>") == "grounding"
    assert scoring.infer_kind({}, "<ref>a cat</ref><box>(1,2),(3,4)</box> on a mat") == "grounded_caption"
    assert scoring.infer_kind({}, "yes") == "vqa"
    assert scoring.infer_kind({"kind": "ocr"}, "yes") == "ocr"
    rec = {"conversations": [{"from": "user", "value": "Picture 1: <img>a.png</img>\nHow many?"},
                             {"from": "assistant", "value": "2"}]}
    assert question_of(rec) == "How many?"


def test_summary_and_table():
    results = [{"kind": "grounding", "correct": True, "iou": 0.8, "baseline_correct": False, "baseline_iou": 0.1},
               {"kind": "grounding", "correct": False, "iou": 0.2, "baseline_correct": True, "baseline_iou": 0.6},
               {"kind": "vqa", "correct": True, "baseline_correct": False}]
    s = scoring.summarize(results)
    assert s["grounding"] == {"n": 2, "accuracy": 0.5, "baseline_accuracy": 0.5, "mean_iou": 0.5,
                              "baseline_mean_iou": 0.35}
    assert s["vqa"]["accuracy"] == 1.0
    text = table(s)
    assert "acc@IoU>=0.5" in text and "grounding" in text


def test_evaluation_run_writes_report_and_pngs(tmp_path):
    """A random tiny model through the real generate path: batched, left-padded, scored, drawn, reported."""
    from qwenvl.config import QwenVLConfig
    from qwenvl.model import QwenVL
    from qwenvl.tokenizer import QwenVLTokenizer

    torch.manual_seed(0)
    config = QwenVLConfig.from_name("tiny").replace(vision={"n_queries": 16, "image_size": 56})
    model = QwenVL(config, kernels="torch")
    tok = QwenVLTokenizer.byte_level(300, 16)
    source = SyntheticSource(SyntheticTasks(seed=0, split="eval", canvas=56, mix="grounding=1,vqa=1"))
    baseline = scoring.Baseline([("grounding", "", "<box>(0,0),(500,500)</box>"), ("vqa", "", "yes")])
    results = run(model, tok, source, range(6), style="chatml", system="", image_size=56, baseline=baseline,
                  batch_size=4, max_new_tokens=5, progress=False)
    assert len(results) == 6 and all("prediction" in r and "baseline_correct" in r for r in results)
    pngs = draw(results, source, str(tmp_path), n=2)
    assert len(pngs) == min(2, sum(r["kind"] == "grounding" for r in results))
    summary = write(results, str(tmp_path))
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["summary"] == summary and len(doc["predictions"]) == 6
