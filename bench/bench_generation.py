"""Generation with the KV cache: prefill of one image (448 px) + a 30-token prompt, then 128 new tokens (greedy, no
stop token), batch 1 and 8, on the reduced-depth real-width model (ViT 8/48, decoder 4/32, full vocabulary).
Prefill and decode are timed apart inside each run (CUDA events at the first and last new token); decode tokens/s is
batch x 127 / decode time. Target: decode tokens/s >= 1.5x the torch backend at batch 1 and at batch 8.
Row "triton-compiled": our kernels with `generate(compile=True)`, the decode step compiled once over a static KV
cache and replayed as a CUDA graph (CUDA only: on the CPU inductor's build alone outlasts the case); its row
records how many graphs the step compiled (`decode_compiles`: 1 for the whole case)."""
import time

import pytest
import torch

from benchlib.cases import params
from benchlib.compiles import warming
from benchlib.env import DTYPE, ON_CUDA, compile_available
from benchlib.models import Lazy, build_on_device, model_config, param_bytes, set_kernels, vl_batch
from benchlib.timing import summarize

IMPLS = ["torch", "triton", "triton-compiled"]
# the first row (torch) builds the model; ours compiles and autotunes its prefill and decode kernels; the compiled
# decode step adds inductor's build and the CUDA graph capture
COSTS = {"torch": 10, "triton": 8, "triton-compiled": 45}
# the CPU run keeps the GPU case names (so the targets' bookkeeping is exercised) at toy sizes: batch 2 stands for 8
BATCHES = {1: 1, 8: 8} if ON_CUDA else {1: 1, 8: 2}
N_NEW = 128 if ON_CUDA else 3
N_TEXT = 30 if ON_CUDA else 2        # a 288-token prefill: a multiple of 16, as the other cases
REPS = 3 if ON_CUDA else 1


def _build():
    from qwenvl.model import QwenVL

    cfg = model_config()
    model = build_on_device(lambda: QwenVL(cfg, kernels="torch"))
    model.eval()
    model.requires_grad_(False)
    return cfg, model


MODEL = Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    MODEL.release()


def generate_once(model, ids, pixels, n_new, compile=False):
    """(prefill ms, decode ms, tokens produced): one prefill, then n_new - 1 cached decode steps."""
    from qwenvl.generation import generate_steps

    if ON_CUDA:
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        mark = lambda i: marks[i].record()  # noqa: E731
    else:
        stamps = [0.0] * 3
        mark = lambda i: stamps.__setitem__(i, time.perf_counter())  # noqa: E731
    mark(0)
    steps = generate_steps(model, ids, pixel_values=pixels, max_new_tokens=n_new, compile=compile)
    next(steps)
    mark(1)
    n = 1 + sum(1 for _ in steps)
    mark(2)
    if ON_CUDA:
        torch.cuda.synchronize()
        return marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2]), n
    return (stamps[1] - stamps[0]) * 1e3, (stamps[2] - stamps[1]) * 1e3, n


@pytest.mark.model
@pytest.mark.parametrize("name, impl", params([f"b{b}" for b in BATCHES], IMPLS, COSTS,
                                               case_name=lambda name: f"generation_{name} decode"))
def test_generation(bm, suite, name, impl):
    batch = BATCHES[int(name[1:])]
    prefill_case, decode_case = f"generation_{name} prefill", f"generation_{name} decode"
    bm.group = decode_case
    bm.extra_info.update({"case": decode_case, "impl": impl})
    suite.gate(decode_case, impl)
    with suite.guarded(decode_case, impl, bm.extra_info, bench=bm, title=f"decode, batch {batch}, {N_NEW} new tokens"):
        compiled = impl.endswith("-compiled")
        if compiled:
            compile_available()
            if warming():  # the warm-up queues Triton launches without running them: nothing to capture
                return
        cfg, model = MODEL()
        set_kernels(model, impl.removesuffix("-compiled"))
        ids, _, pixels = vl_batch(cfg, batch, N_TEXT, labels=False)
        T = ids.shape[1]
        if ON_CUDA or warming():  # compile / autotune the prefill and decode kernels (the interpreter has none)
            # the compiled step: its build and capture, at the capacity bucket of the timed runs (no recompile)
            generate_once(model, ids, pixels, N_NEW if compiled else 4, compiled)
        if warming():
            return
        if ON_CUDA:
            torch.cuda.reset_peak_memory_stats()
        runs = []
        bm.pedantic(lambda: runs.append(generate_once(model, ids, pixels, N_NEW, compiled)), rounds=REPS,
                    iterations=1, warmup_rounds=0)
        if not runs:  # pytest-benchmark disabled: it skipped the call
            runs.append(generate_once(model, ids, pixels, N_NEW, compiled))
        produced = runs[0][2]
        peak = torch.cuda.max_memory_allocated() if ON_CUDA else None

        # what one decode step must read: the decoder weights, the LM head, and the KV cache so far
        t = cfg.text
        e = torch.empty((), dtype=DTYPE).element_size()
        weights = param_bytes(model.transformer.h) + param_bytes(model.transformer.ln_f) + param_bytes(model.lm_head)
        steps = produced - 1
        kv = 2 * t.num_hidden_layers * batch * (T + produced / 2) * t.hidden_size * e
        decode_bytes = steps * (weights + kv)
        decode_flops = steps * batch * 2 * weights / e
        pre = summarize([r[0] for r in runs], 0.0)
        dec = summarize([r[1] for r in runs], 0.0)
        pre_row = suite.row(pre, None, None, None, tokens=batch * T)
        dec_row = suite.row(dec, decode_flops, decode_bytes, None, tokens=batch * steps)
        if peak is not None:
            dec_row["peak_abs_bytes"] = peak
        dec_row.update(new_tokens=produced, prompt_tokens=T, batch=batch)
        if compiled:
            from qwenvl.compiled import static_decoder

            dec_row["decode_compiles"] = static_decoder(model, batch, T + N_NEW, "inductor").compiles
        shape = {"batch": batch, "prompt": T, "new_tokens": N_NEW}
        suite.results.put(prefill_case, impl, pre_row, title=f"prefill, batch {batch}, 1 image + {N_TEXT} tokens",
                          shape=shape, mode="module")
        suite.results.put(decode_case, impl, dec_row, bm.extra_info, shape=shape, mode="module",
                          flops=decode_flops, bytes=decode_bytes, floor_ms=suite.floor_ms(decode_flops, decode_bytes))
