"""`qwenvl train --kernels triton` against `--kernels torch` for a few steps of the real trainer (CUDA
when present, else the Triton interpreter on the CPU): per-step losses within 1e-4 relative, on packed rows
(varlen attention).

1e-4: both paths compute in fp32, but the kernels sum in other orders (tiled softmax, fused cross-entropy), and the
round-off goes through a few AdamW updates."""
import json
import os

import pytest
import torch

from qwenvl.config import QwenVLConfig
from qwenvl.model import QwenVL
from qwenvl.tokenizer import QwenVLTokenizer
from qwenvl.train.cli import main_train

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    # one block per tower: every kernel still runs (both attentions, both norms, rotary, SwiGLU, adapter, loss)
    config = QwenVLConfig.from_name("tiny").replace(text={"num_hidden_layers": 1},
                                                    vision={"n_queries": 4, "image_size": 28, "layers": 1},
                                                    dtype="float32")
    QwenVL(config, kernels="torch").save_pretrained(str(folder))
    QwenVLTokenizer.byte_level(300, 4).save_pretrained(str(folder))
    return str(folder)


def _run(model, out, kernels, *extra):
    args = ["--model", model, "--out", str(out), "--stage", "2", "--steps", "2", "--batch-size", "2", "--lr", "3e-3",
            "--warmup-steps", "1", "--kernels", kernels, "--workers", "0", "--quiet", "--eval-samples", "0",
            "--canvas", "28", "--mix", "grounding=1,vqa=1", "--system", "", *extra]
    assert main_train(args) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_triton_matches_torch(tmp_path, micro_model):
    # packed rows: the decoder goes through varlen attention, the ViT and adapter through their own kernels
    # (padded batches through the fixed-length kernels are covered by tests/test_convergence.py)
    packing = ["--pack-tokens", "160"]
    ref = _run(micro_model, tmp_path / "torch", "torch", *packing)
    tri = _run(micro_model, tmp_path / "triton", "triton", *packing)
    assert len(ref) == len(tri) == 2
    for step, (a, b) in enumerate(zip(ref, tri)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step + 1}: torch {a:.6f} vs triton {b:.6f}"
    # the gradients went through the kernels' backward passes too: the trained weights agree
    final = [QwenVL.from_pretrained(str(tmp_path / k / "stage2" / "final"), dtype=torch.float32, kernels="torch")
             for k in ("torch", "triton")]
    for (name, p), (_, q) in zip(final[0].named_parameters(), final[1].named_parameters()):
        err = (p - q).norm() / p.norm().clamp_min(1e-12)
        assert err <= 1e-4, f"{name}: trained weights differ by {err:.2e}"
