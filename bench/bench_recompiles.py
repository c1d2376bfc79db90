"""Recompilation across sequence lengths: a decoder-layer training step (RMSNorm, rotary, causal attention, SwiGLU,
fused linear + CE; forward and backward) and a decode-attention call at every length 1000..1100 (toy lengths on
the CPU). Triton specializes integer arguments on divisibility by 16, so a handful of variants per kernel is
expected; what must not happen is a compile (or an autotuning run) per new length. Counted from each @triton.jit
function's compile cache and each autotuner's chosen-config cache: the first half of the lengths may add variants,
the second half must add none (target recompiles_bounded), and no kernel may gain more than 4 variants."""
import time

import pytest
import torch

from benchlib.cases import cost_mark, randn
from benchlib.compiles import compile_counts, warming
from benchlib.env import DEVICE, ON_CUDA, OURS, backend, ours, sync
from benchlib.models import build_on_device, decoder_rope, init_params_, model_config, set_kernels
from benchlib.suite import current_test

LENGTHS = list(range(1000, 1101)) if ON_CUDA else [5, 6]
# while warming, one length per class of Triton's integer specialization (x % 16, and 1) is enough
WARM_LENGTHS = LENGTHS[:17]


def _delta(after, before):
    return {k: v - (before or {}).get(k, 0) for k, v in (after or {}).items() if v - (before or {}).get(k, 0)}


@pytest.mark.model
@pytest.mark.target
@cost_mark(12)
def test_recompiles(suite):
    case = "recompiles"
    suite.gate(case, OURS)
    with suite.guarded(case, OURS, title="Triton compilations across lengths"):
        from qwenvl.text import QWenBlock

        cfg = model_config().text
        block = init_params_(build_on_device(lambda: QWenBlock(cfg, backend("torch"))))
        set_kernels(block, OURS)
        k = ours()
        lengths = WARM_LENGTHS if warming() else LENGTHS
        top = max(lengths)
        lm_head = randn(cfg.vocab_size, cfg.hidden_size, scale=0.02, grad=True)
        cache_k = randn(1, top + 16, cfg.num_attention_heads, cfg.kv_channels)
        cache_v = randn(1, top + 16, cfg.num_attention_heads, cfg.kv_channels)

        def one(L):
            x = randn(1, L, cfg.hidden_size, grad=True)
            h = block(x, decoder_rope(cfg, L))
            labels = torch.randint(0, cfg.vocab_size, (L,), device=DEVICE)
            k.linear_cross_entropy(h[0], lm_head, labels).backward()
            q = randn(1, 1, cfg.num_attention_heads, cfg.kv_channels)
            k.decode_attention(q, cache_k, cache_v, torch.tensor([L], dtype=torch.int32, device=DEVICE))
            block.zero_grad(set_to_none=True)
            lm_head.grad = None

        if warming():
            for L in lengths:
                one(L)
            return

        free = suite.free_s(current_test())
        stop = None if free is None else time.time() + free - 5   # the case's own time limit, with room to record
        half = len(lengths) // 2
        start = compile_counts()
        times, done = [], []
        mid = None
        for i, L in enumerate(lengths):
            if i == half:
                sync()
                mid = compile_counts()
            if stop is not None and time.time() > stop:
                break
            t0 = time.perf_counter()
            one(L)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
            done.append(L)
        end = compile_counts()
        covered = f"{done[0]}..{done[-1]}" if done else "none"
        if start is None:
            rec = {"lengths": covered, "new_in_second_half": None,
                   "note": "Triton interpreter: nothing is compiled, so nothing to count (the loop itself ran)"}
        else:
            added = _delta(end, start)
            second = _delta(end, mid) if mid is not None and len(done) > half else None
            rec = {"lengths": covered, "per_kernel_added": added,
                   "max_variants_per_kernel": max([v for n, v in added.items() if not n.startswith("<")] or [0]),
                   "new_in_second_half": sum(second.values()) if second is not None else None,
                   "second_half_added": second}
            if second is None:
                rec["note"] = "run stopped before the second half (deadline)"
        rec.update(first_length_ms=times[0] if times else None,
                   median_ms=sorted(times)[len(times) // 2] if times else None)
        suite.data["recompiles"] = rec
        suite.results.put(case, OURS, {"status": "ok", "median_ms": rec["median_ms"], "lengths": covered},
                          title="Triton compilations across lengths", mode="module")
