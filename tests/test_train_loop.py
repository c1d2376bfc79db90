"""The training loop: gradient accumulation equals one large batch, resume equals an uninterrupted run, atomic
checkpoints, and the saved folders load as models."""
import json
import os

import pytest
import torch

from qwenvl.config import QwenVLConfig
from qwenvl.model import QwenVL
from qwenvl.tokenizer import QwenVLTokenizer
from qwenvl.train import state as ckpt
from qwenvl.train.data import Examples, PlanSpec, collate, plan
from qwenvl.train.distributed import Dist
from qwenvl.train.metrics import MetricsLog, read
from qwenvl.train.recipe import stage_recipe
from qwenvl.train.sources import SyntheticSource
from qwenvl.train.synthetic import SyntheticTasks
from qwenvl.train.trainer import Options, train_stage

MIX = "grounding=2,vqa=1,caption=1"


def tiny_config():
    # 16 image tokens and 56-pixel images keep a step at a few tens of milliseconds
    return QwenVLConfig.from_name("tiny").replace(vision={"n_queries": 16, "image_size": 56})


def make(seed=0):
    torch.manual_seed(seed)
    return QwenVL(tiny_config(), kernels="torch")


def examples(config, tok, image_size, style="chatml"):
    tasks = SyntheticTasks(seed=1, split="train", canvas=56, mix=MIX, size=100_000)
    return Examples(SyntheticSource(tasks), tok, style, "", image_size, 512, validate=False)


def tokenizer(config):
    return QwenVLTokenizer.byte_level(config.vision.image_start_id, config.vision.n_queries)


def run(tmp_path, name, steps=3, batch_size=8, grad_accum=1, stage=2, save_every=0, resume=None, model=None,
        lr=1e-3):
    config = tiny_config()
    tok = tokenizer(config)
    recipe = stage_recipe(stage, config, demo=True, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                          lr=lr, warmup_steps=1)
    out = str(tmp_path / name)
    opts = Options(out=out, workers=0, progress=False, save_every=save_every, shuffle=False)
    model = model or make()
    metrics = MetricsLog(os.path.join(out, "metrics.jsonl"))
    train_stage(model, tok, recipe, examples(config, tok, recipe.image_size), opts, Dist(), metrics, resume=resume)
    return model, [r["loss"] for r in read(metrics.path)]


def test_accumulation_equals_one_large_batch():
    """2 micro-batches of 4 give the loss and gradients of 1 batch of 8 (token-weighted, not micro-batch mean)."""
    config = tiny_config()
    tok = tokenizer(config)
    ex = examples(config, tok, 56)
    (big,) = plan(ex, PlanSpec(batch_size=8, shuffle=False), steps=1)
    small = plan(ex, PlanSpec(batch_size=4, grad_accum=2, shuffle=False), steps=1)
    assert sorted(big) == sorted(small[0] + small[1])

    def grads(batches):
        model = make()
        n_total = sum(b.n_targets for b in batches)
        total = 0.0
        for b in batches:
            out = model(b.input_ids, pixel_values=b.pixel_values, labels=b.labels)
            (out.loss * b.n_targets / n_total).backward()
            total += float(out.loss.detach()) * b.n_targets / n_total
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    load = lambda idx: collate([ex.load(i) for i in idx], tok.eod_id, 56)  # noqa: E731
    one_loss, one = grads([load(big)])
    two_loss, two = grads([load(small[0]), load(small[1])])
    micro = [load(s) for s in small]
    assert micro[0].n_targets != micro[1].n_targets, "unequal token counts make the test meaningful"
    assert abs(one_loss - two_loss) <= 1e-6 * one_loss  # 1e-6 relative: float32 round-off of a ~6.0 loss
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6, rtol=1e-5), name


def test_trainer_accumulation_matches_large_batch(tmp_path):
    m1, losses1 = run(tmp_path, "big", batch_size=8, grad_accum=1)
    m2, losses2 = run(tmp_path, "accum", batch_size=4, grad_accum=2)
    assert losses1 == pytest.approx(losses2, rel=1e-6)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_resume_gives_the_same_losses(tmp_path):
    _, full = run(tmp_path, "full", steps=4, save_every=2)
    # the run as if killed after step 2: its checkpoint, no final folder, and a metrics file one step ahead
    out = tmp_path / "cut"
    (out / "stage2").mkdir(parents=True)
    os.replace(tmp_path / "full" / "stage2" / "checkpoint-000002", out / "stage2" / "checkpoint-000002")
    rows = read(str(tmp_path / "full" / "metrics.jsonl"))[:3]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ck = str(out / "stage2" / "checkpoint-000002")
    model = QwenVL.from_pretrained(ck, dtype=torch.float32, kernels="torch")
    _, resumed = run(tmp_path, "cut", steps=4, save_every=2, resume=ck, model=model)
    assert resumed == full  # exactly: CPU float32, same data, same optimizer state


def test_resume_refuses_a_different_run(tmp_path):
    run(tmp_path, "a", steps=2, save_every=1)
    ck = str(tmp_path / "a" / "stage2" / "checkpoint-000001")
    with pytest.raises(ValueError, match="global batch"):
        run(tmp_path, "a", steps=2, batch_size=4, resume=ck, model=make())


def test_checkpoint_is_a_loadable_model_folder(tmp_path):
    model, _ = run(tmp_path, "m", steps=1, stage=3)
    final = tmp_path / "m" / "stage3" / "final"
    for name in ("config.json", "model.safetensors", "qwen.tiktoken", "tokenizer_config.json",
                 "optimizer.safetensors", "rng.safetensors", "trainer_state.json"):
        assert (final / name).is_file(), name
    loaded = QwenVL.from_pretrained(str(final), dtype=torch.float32, kernels="torch")
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    tok = QwenVLTokenizer.from_pretrained(str(final))
    assert tok.img_start_id == 300 and tok.n_image_tokens == 16
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["stage"] == 3 and state["step"] == 1 and state["recipe"]["train_vit"] is False


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, _ = run(tmp_path, "s", steps=2, save_every=1)
    folder = tmp_path / "s" / "stage2"
    before = {p.name: p.read_bytes() for p in (folder / "checkpoint-000001").iterdir()}

    def crash(*a, **k):
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(ckpt, "save_pretrained", crash)
    tok = tokenizer(tiny_config())
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(str(folder / "checkpoint-000001"), model, tok, None, None, {"stage": 2, "step": 1}, Dist())
    after = {p.name: p.read_bytes() for p in (folder / "checkpoint-000001").iterdir()}
    assert before == after
    assert [s for s, _ in ckpt.checkpoints(str(folder))] == [1]  # a temp folder is never taken for a checkpoint


def test_frozen_parts_do_not_move(tmp_path):
    start = make()
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    model, _ = run(tmp_path, "f", steps=2, stage=1, model=start, lr=1e-2)
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        if n.startswith("transformer.visual.") and not n.endswith("pos_embed"):
            assert moved, f"{n} should train in stage 1"
        else:
            assert not moved, f"{n} should be frozen in stage 1"
