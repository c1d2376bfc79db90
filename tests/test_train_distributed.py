"""Two processes on the CPU (torchrun, gloo) give the losses of one process with the same global batch, for DDP
and FSDP2; and the command line end to end (exit codes, files written, the saved model loads)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from qwenvl.config import QwenVLConfig
from qwenvl.model import QwenVL
from qwenvl.tokenizer import QwenVLTokenizer
from qwenvl.train.cli import main_eval, main_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A checkpoint folder of a very small model (16 image tokens, 56-pixel images) with its tokenizer."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = QwenVLConfig.from_name("tiny").replace(vision={"n_queries": 16, "image_size": 56}, dtype="float32")
    QwenVL(config, kernels="torch").save_pretrained(str(folder))
    QwenVLTokenizer.byte_level(300, 16).save_pretrained(str(folder))
    return str(folder)


def _args(model, out, *extra):
    return ["--model", model, "--out", str(out), "--stage", "2", "--steps", "3", "--lr", "1e-3", "--warmup-steps", "1",
            "--kernels", "torch", "--workers", "0", "--threads", "1", "--quiet", "--eval-samples", "0",
            "--canvas", "56", "--mix", "grounding=2,vqa=1", *extra]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _torchrun(args, nproc=2):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "qwenvl.train", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, small_model, strategy):
    single = tmp_path / "single"
    assert main_train(_args(small_model, single, "--batch-size", "8")) == 0
    _torchrun(_args(small_model, tmp_path / "dist", "--batch-size", "4", "--strategy", strategy))
    one, two = _losses(str(single)), _losses(str(tmp_path / "dist"))
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    a = QwenVL.from_pretrained(str(single / "stage2" / "final"), dtype=torch.float32, kernels="torch")
    b = QwenVL.from_pretrained(str(tmp_path / "dist" / "stage2" / "final"), dtype=torch.float32, kernels="torch")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_cli_end_to_end(tmp_path, small_model, capsys):
    out = tmp_path / "run"
    args = _args(small_model, out, "--batch-size", "4", "--save-every", "2")
    args[args.index("--eval-samples") + 1] = "10"
    assert main_train(args) == 0
    printed = capsys.readouterr().out
    assert "grounding" in printed and "baseline" in printed
    for name in ("metrics.jsonl", "loss.png", "run.json", "eval/report.json", "stage2/final/model.safetensors",
                 "stage2/checkpoint-000002/optimizer.safetensors"):
        assert (out / name).exists(), name
    assert list((out / "eval").glob("boxes_*.png"))
    # a finished stage is skipped on --resume; a run folder is never overwritten without it
    assert main_train(args + ["--resume"]) == 0
    assert main_train(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    # qwenvl eval on the saved folder
    assert main_eval(["--model", str(out / "stage2" / "final"), "--eval-samples", "6", "--kernels", "torch",
                      "--quiet", "--out", str(tmp_path / "ev"), "--canvas", "56"]) == 0
    assert (tmp_path / "ev" / "report.json").is_file()


def test_cli_resume_after_a_kill(tmp_path, small_model):
    """The run folder as a kill after step 3 leaves it: --resume picks the newest checkpoint, rewinds the metrics,
    and the losses end up those of the uninterrupted run."""
    import shutil

    args = _args(small_model, tmp_path / "run", "--batch-size", "4", "--save-every", "2")
    args[args.index("--steps") + 1] = "4"
    assert main_train(args) == 0
    full = _losses(str(tmp_path / "run"))
    shutil.rmtree(tmp_path / "run" / "stage2" / "final")
    assert main_train(args + ["--resume"]) == 0
    assert _losses(str(tmp_path / "run")) == full


def test_cli_on_a_data_file(tmp_path, small_model, capsys):
    """The fine-tuning format from disk: images read in the loader, packed rows, then `qwenvl eval` on the file
    with its reference answers (grounding scored by IoU, the rest by exact match)."""
    from PIL import Image

    records = []
    for i, (color, box) in enumerate([("red", (10, 10, 30, 30)), ("blue", (20, 5, 50, 40))] * 3):
        Image.new("RGB", (56, 56), "white").save(tmp_path / f"{i}.png")
        img = Image.open(tmp_path / f"{i}.png")
        img.paste(color, box)
        img.save(tmp_path / f"{i}.png")
        grid = tuple(int(v / 56 * 1000) for v in box)
        records.append({"id": f"g{i}", "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{i}.png</img>\n<ref>the square</ref>"},
            {"from": "assistant", "value": "<box>({},{}),({},{})</box>".format(*grid)}]})
        records.append({"id": f"q{i}", "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{i}.png</img>\nWhat colour?"},
            {"from": "assistant", "value": color}]})
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    args = _args(small_model, out, "--data", str(data), "--batch-size", "4", "--pack-tokens", "256")
    args[args.index("--stage") + 1] = "3"
    assert main_train(args) == 0
    assert main_eval(["--model", str(out / "stage3" / "final"), "--data", str(data), "--kernels", "torch", "--quiet",
                      "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["summary"]["grounding"]["n"] == 6 and report["summary"]["vqa"]["n"] == 6
    assert "itself" in report["baseline"]["from"]


def test_cli_bad_input_exit_codes(tmp_path, small_model, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x1", "conversations": [{"from": "user", "value": "hi"}]}]))
    assert main_train(_args(small_model, tmp_path / "o", "--data", str(bad))) == 2
    assert "x1" in capsys.readouterr().err
    assert main_train(["--model", "no-such-model", "--out", str(tmp_path / "o2")]) == 2
    with pytest.raises(SystemExit):
        main_train(["--stage", "4"])
    with pytest.raises(SystemExit):
        main_train(["--batch-size", "0"])


def test_module_entry_point_help():
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "qwenvl.train", "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--stage" in done.stdout and "--strategy" in done.stdout
