"""Training state without pickles, what killed saves leave behind, and the defaults that mislead on small runs:
duplicate records in a step, the paper's warm-up on a short run, the end-of-stage loss summary."""
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qwenvl.model import QwenVL
from qwenvl.train import state as ckpt
from qwenvl.train.data import PlanSpec, check_plan, plan
from qwenvl.train.metrics import summarize
from qwenvl.train.recipe import build_optimizer, build_scheduler, stage_recipe
from tests.test_train_loop import run, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkpoint_holds_no_pickle_and_restores_exactly(tmp_path):
    model, _ = run(tmp_path, "r", steps=2, save_every=1)
    folder = tmp_path / "r" / "stage2" / "checkpoint-000001"
    names = set(os.listdir(folder))
    assert {"optimizer.safetensors", "rng.safetensors"} <= names
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in names), names
    for name in names:  # nothing in the folder is a pickle (zip or protocol-2+ header)
        head = (folder / name).read_bytes()[:2]
        assert head not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"), name

    # optimizer, scheduler and generators come back exactly
    recipe = stage_recipe(2, model.config, demo=True, steps=2, lr=1e-3, warmup_steps=1)
    opt = build_optimizer(model, recipe)
    sched = build_scheduler(opt, recipe)
    ckpt.load_optimizer(str(folder), model, opt, sched)
    state = opt.state_dict()["state"]
    assert state and all(torch.isfinite(v["exp_avg"]).all() for v in state.values())
    ckpt.load_rng(str(folder))
    first = torch.rand(3)
    ckpt.load_rng(str(folder))
    assert torch.equal(first, torch.rand(3))


def test_a_damaged_state_file_is_reported(tmp_path):
    run(tmp_path, "d", steps=1, save_every=0)
    final = tmp_path / "d" / "stage2" / "final"
    (final / "rng.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="rng.safetensors cannot be read"):
        ckpt.load_rng(str(final))
    (final / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match="trainer_state.json is not valid JSON"):
        ckpt.check_resumable(str(final))


def test_orphans_of_killed_saves_are_removed_and_a_moved_checkpoint_restored(tmp_path):
    stage = tmp_path / "stage2"
    dead = 2 ** 22 + 17  # above the default pid_max: no such process
    for name in (f".tmp-checkpoint-000004-{dead}", f".del-checkpoint-000001-{dead}", f".old-checkpoint-000002-{dead}",
                 f".tmp-checkpoint-000009-{os.getppid()}"):
        (stage / name).mkdir(parents=True)
        (stage / name / "model.safetensors").write_bytes(b"x" * 100)
    (stage / "checkpoint-000003").mkdir()
    removed = ckpt.remove_orphans(str(stage))
    assert sorted(os.path.basename(r) for r in removed) == [f".del-checkpoint-000001-{dead}",
                                                            f".tmp-checkpoint-000004-{dead}"]
    # killed between moving checkpoint-000002 aside and renaming its replacement in: the old one is put back
    assert (stage / "checkpoint-000002" / "model.safetensors").is_file()
    assert (stage / f".tmp-checkpoint-000009-{os.getppid()}").is_dir()  # a live process's save is left alone
    assert (stage / "checkpoint-000003").is_dir()


SAVER = """
import sys, torch
from qwenvl.model import QwenVL
from qwenvl.train import state as ckpt
from qwenvl.train.distributed import Dist
from qwenvl.train.recipe import build_optimizer, build_scheduler, stage_recipe
from tests.test_train_loop import make, tokenizer
model = make()
recipe = stage_recipe(2, model.config, demo=True, steps=5)
opt = build_optimizer(model, recipe)
sched = build_scheduler(opt, recipe)
print("ready", flush=True)
step = 0
while True:
    step += 1
    path = f"{sys.argv[1]}/stage2/checkpoint-{step % 3 + 1:06d}"   # new folders and re-saves of old ones
    ckpt.save(path, model, tokenizer(model.config), opt, sched, {"stage": 2, "step": step, "tokens_seen": 0,
              "plan": {}, "recipe": {}}, Dist(), keep=2)
"""


def test_kill_9_during_saves_leaves_complete_checkpoints(tmp_path):
    """A process saving checkpoints in a loop is killed with SIGKILL at a few points: every checkpoint-* folder
    is complete and loads, and the next start removes what the kill left."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for delay in (0.3, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path / "run")], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stage = str(tmp_path / "run" / "stage2")
        ckpt.remove_orphans(stage)
        assert not [n for n in os.listdir(stage) if n.startswith(".")]
        for _, path in ckpt.checkpoints(stage):
            ckpt.check_resumable(path)
            QwenVL.from_pretrained(path, kernels="torch")


class _Lengths:
    """A data set of n records of equal length (the plan reads nothing else)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def index(self, k):
        return k

    def length(self, i):
        return 10


@pytest.mark.parametrize("n,batch,accum,pack", [(10, 4, 1, 0), (500, 64, 2, 0), (9, 1, 3, 0), (12, 1, 1, 40)])
def test_bucket_pool_never_repeats_a_record_in_a_step(n, batch, accum, pack):
    spec = PlanSpec(batch_size=batch, grad_accum=accum, pool=8, pack_tokens=pack, seed=3)
    micro = plan(_Lengths(n), spec, steps=20)
    per_step = len(micro) // 20
    for s in range(20):
        records = [i for mb in micro[s * per_step:(s + 1) * per_step] for i in mb]
        assert len(records) == len(set(records)), f"step {s}: {sorted(records)}"
    seen = [i for mb in micro for i in mb]
    assert set(seen) == set(range(n))  # every record is trained on


def test_a_data_set_smaller_than_a_step_is_refused():
    with pytest.raises(ValueError, match="3 trainable record"):
        check_plan(3, PlanSpec(batch_size=2, grad_accum=2))


def test_short_run_scales_the_warm_up_and_says_so(caplog):
    config = tiny_config()
    with caplog.at_level(logging.WARNING, logger="qwenvl.train"):
        r = stage_recipe(3, config, steps=3)
    assert r.warmup_steps == 1 and "instead of 3000" in caplog.text
    assert stage_recipe(3, config, steps=4000).warmup_steps == 1500  # the paper's share, 3000 of 8000
    assert stage_recipe(3, config).warmup_steps == 3000
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwenvl.train"):
        r = stage_recipe(3, config, steps=3, warmup_steps=10)
    assert r.warmup_steps == 10 and "never reaches its peak" in caplog.text


def test_loss_summary_of_short_runs_is_honest():
    rows = [{"stage": 1, "step": i + 1, "loss": loss, "tokens": 10, "step_seconds": 1.0}
            for i, loss in enumerate([6.0, 5.0, 4.0])]
    s = summarize(rows)[1]
    assert (s["loss_start"], s["loss_end"], s["window"]) == (6.0, 4.0, 1)
    assert "6.000 -> 4.000 (first step -> last step)" in s["line"]
    one = summarize(rows[:1])[1]
    assert "a single step" in one["line"] and "->" not in one["line"]
    many = summarize([dict(r, step=i + 1, loss=float(i)) for i, r in enumerate(rows * 10)])[1]
    assert many["window"] == 10 and "means of the first and last 10 steps" in many["line"]
