"""Recompilation across sequence lengths: a decoder-layer training step (RMSNorm, rotary, causal attention, SwiGLU,
fused linear + CE; forward and backward) and a decode-attention call at every length 1000..1100 (toy lengths on
the CPU). Triton specializes integer arguments on divisibility by 16, so a handful of variants per kernel is
expected; what must not happen is a compile (or an autotuning run) per new length. Counted from each @triton.jit
function's compile cache and each autotuner's chosen-config cache: the first half of the lengths may add variants,
the second half must add none (target recompiles_bounded), and no kernel may gain more than 4 variants."""
import time

import pytest
import torch

import harness as H

LENGTHS = list(range(1000, 1101)) if H.ON_CUDA else [5, 6]


def _delta(after, before):
    return {k: v - (before or {}).get(k, 0) for k, v in (after or {}).items() if v - (before or {}).get(k, 0)}


@pytest.mark.model
def test_recompiles(suite):
    case = "recompiles"
    suite.gate(case, H.OURS, 30 if H.ON_CUDA else 2)
    with suite.guarded(case, H.OURS, title="Triton compilations across lengths"):
        from qwenvl.text import QWenBlock, RotaryEmbedding

        cfg = H.model_config().text
        block = H.init_params_(H.build_on_device(lambda: QWenBlock(cfg, H.kernels("torch"))))
        H.set_kernels(block, H.OURS)
        k = H.kernels(H.OURS)
        top = max(LENGTHS)
        cos, sin = RotaryEmbedding(cfg.rotary_dim, cfg.rotary_emb_base).tables(top + 1, 1.0, H.DEVICE)
        lm_head = H.randn(cfg.vocab_size, cfg.hidden_size, scale=0.02, grad=True)
        cache_k = H.randn(1, top + 16, cfg.num_attention_heads, cfg.kv_channels)
        cache_v = H.randn(1, top + 16, cfg.num_attention_heads, cfg.kv_channels)

        def one(L):
            x = H.randn(1, L, cfg.hidden_size, grad=True)
            h = block(x, (cos, sin, torch.arange(L, device=H.DEVICE), None))
            labels = torch.randint(0, cfg.vocab_size, (L,), device=H.DEVICE)
            k.linear_cross_entropy(h[0], lm_head, labels).backward()
            q = H.randn(1, 1, cfg.num_attention_heads, cfg.kv_channels)
            k.decode_attention(q, cache_k, cache_v, torch.tensor([L], dtype=torch.int32, device=H.DEVICE))
            block.zero_grad(set_to_none=True)
            lm_head.grad = None

        half = len(LENGTHS) // 2
        start = H.compile_counts()
        times, done = [], []
        mid = None
        for i, L in enumerate(LENGTHS):
            if i == half:
                H.sync()
                mid = H.compile_counts()
            if suite.deadline is not None and time.time() > suite.deadline - 5:
                break
            t0 = time.perf_counter()
            one(L)
            H.sync()
            times.append((time.perf_counter() - t0) * 1e3)
            done.append(L)
        end = H.compile_counts()
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
        suite.results.put(case, H.OURS, {"status": "ok", "median_ms": rec["median_ms"], "lengths": covered},
                          title="Triton compilations across lengths", mode="module")
