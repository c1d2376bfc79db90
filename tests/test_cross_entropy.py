"""linear_cross_entropy (fused LM head + loss) against qwenvl_kernels.reference, its memory bound, and its errors."""
from __future__ import annotations

import json

import pytest
import torch

import qwenvl_kernels.ops.cross_entropy as ce
from qwenvl_kernels import launch, reference
from qwenvl_kernels.launch import UnsupportedInput
from qwenvl_kernels.ops.cross_entropy import linear_cross_entropy
from tests.helpers import CUDA, DEVICE, TEST_DTYPES, assert_close, needs_cuda, non_contiguous

pytestmark = pytest.mark.triton


def _inputs(N, V, H, dtype, ignore_frac=0.3, device=DEVICE):
    hidden = torch.randn(N, H, device=device).to(dtype)
    # a spread of logits of a few units, like a trained LM head
    weight = (torch.randn(V, H, device=device) * (2.0 / H ** 0.5)).to(dtype)
    labels = torch.randint(0, V, (N,), device=device)
    if N > 1 and ignore_frac:
        labels[torch.rand(N, device=device) < ignore_frac] = -100
        labels[0] = 1  # at least one counted token
    return hidden, weight, labels


def _run(fn, hidden, weight, labels, grad_scale=1.0, **kw):
    """Loss and the gradients of hidden and weight after `(loss * grad_scale).backward()`."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad


def _check(hidden, weight, labels, dtype, grad_scale=1.0, ref_kw=None, **kw):
    """Ours in `dtype` against the reference on the same values upcast to fp32."""
    out = _run(linear_cross_entropy, hidden, weight, labels, grad_scale, **kw)
    kw.pop("chunk_size", None)
    ref = _run(reference.linear_cross_entropy, hidden.float(), weight.float(), labels, grad_scale,
               **(ref_kw or kw))
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    assert out[1].dtype == dtype and out[2].dtype == dtype
    for name, o, r in zip(("loss", "dhidden", "dweight"), out, ref):
        assert_close(o, r, dtype=dtype, name=name)
    return out


# (N, V, H, chunk_size): V never a multiple of the block (the interpreter's is 512: 1000 spans two blocks);
# chunk sizes that leave a short last chunk
SHAPES = [(1, 7, 16, None), (7, 300, 64, 3), (65, 1000, 16, 16)]


@pytest.mark.parametrize("dtype", TEST_DTYPES)
@pytest.mark.parametrize("N,V,H,chunk", SHAPES)
def test_matches_reference_mean(N, V, H, chunk, dtype):
    _check(*_inputs(N, V, H, dtype), dtype, reduction="mean", chunk_size=chunk)


@pytest.mark.parametrize("dtype", TEST_DTYPES)
@pytest.mark.parametrize("N,V,H,chunk", [(1, 7, 64, None), (7, 1000, 16, 4), (33, 300, 16, 8)])
def test_matches_reference_sum(N, V, H, chunk, dtype):
    _check(*_inputs(N, V, H, dtype), dtype, reduction="sum", chunk_size=chunk)


@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_poisoned_buffers(dtype):
    """The logits chunk, per-row losses and dhidden start as NaN: every row and chunk must be written."""
    assert launch.POISON_OUTPUTS, "tests/conftest.py turns the poisoning on"
    _check(*_inputs(23, 300, 16, dtype), dtype, reduction="mean", chunk_size=6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored(reduction):
    hidden, weight, labels = _inputs(9, 300, 16, torch.float32)
    labels.fill_(-100)
    loss, dh, dw = _run(linear_cross_entropy, hidden, weight, labels, reduction=reduction, chunk_size=4)
    ref_loss = reference.linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    assert loss.item() == 0.0 and ref_loss.item() == 0.0
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


def test_empty_batch():
    hidden, weight, _ = _inputs(1, 7, 16, torch.float32)
    hidden = hidden[:0]
    labels = torch.empty(0, dtype=torch.int64, device=DEVICE)
    for reduction in ("mean", "sum"):
        loss, dh, dw = _run(linear_cross_entropy, hidden, weight, labels, reduction=reduction)
        assert loss.item() == 0.0 and dh.shape == (0, 16) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("ignore_index", [5, -1])
def test_non_default_ignore_index(ignore_index):
    hidden, weight, labels = _inputs(21, 300, 16, torch.float32, ignore_frac=0)
    labels[::3] = ignore_index  # 5 is also a real class: it must be skipped all the same
    _check(hidden, weight, labels, torch.float32, ignore_index=ignore_index, chunk_size=8)


@pytest.mark.parametrize("dtype", TEST_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_output_not_one(reduction, dtype):
    """loss * 3.0 (e.g. accumulation scaling): the gradients made in the forward must be scaled in the backward."""
    _check(*_inputs(13, 300, 16, dtype), dtype, grad_scale=3.0, reduction=reduction, chunk_size=5)


def test_backward_keeps_incoming_gradient_and_saved_state():
    hidden, weight, labels = _inputs(11, 300, 16, torch.float32)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk_size=4)
    g = torch.tensor(0.5, device=DEVICE)
    loss.backward(g, retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    loss.backward(g)  # a second backward must see unchanged saved gradients: grads accumulate to exactly twice
    assert g.item() == 0.5
    assert torch.allclose(h.grad, 2 * first[0]) and torch.allclose(w.grad, 2 * first[1])
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels, 0.5)
    assert_close(first[0], ref[1], name="dhidden")
    assert_close(first[1], ref[2], name="dweight")


@pytest.mark.parametrize("layout", ["stride_gap", "row_slice", "column_major"])
def test_non_contiguous_inputs(layout):
    N, V, H = 19, 300, 16
    hidden, weight, labels = _inputs(N, V, H, torch.float32)
    if layout == "stride_gap":
        h_in = non_contiguous(hidden)
    elif layout == "row_slice":  # hidden[:, :-1] of a [B, T, H] decoder output, flattened: rows with a gap
        wide = torch.randn(N, 3 * H, device=DEVICE)
        wide[:, H:2 * H] = hidden
        h_in = wide[:, H:2 * H]
    else:
        h_in = hidden.t().contiguous().t()
    assert not h_in.is_contiguous()
    w_in = non_contiguous(weight, dim=0)
    lab_in = non_contiguous(labels)
    out = _run(linear_cross_entropy, h_in, w_in, lab_in, 2.0, chunk_size=6)
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels, 2.0)
    for name, o, r in zip(("loss", "dhidden", "dweight"), out, ref):
        assert_close(o, r, name=name)


def test_only_some_inputs_require_grad():
    hidden, weight, labels = _inputs(9, 300, 16, torch.float32)
    ref = _run(reference.linear_cross_entropy, hidden, weight, labels)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, chunk_size=4).backward()
    assert_close(h.grad, ref[1], name="dhidden")
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, labels, chunk_size=4).backward()
    assert_close(w.grad, ref[2], name="dweight")
    loss = linear_cross_entropy(hidden, weight, labels)
    assert not loss.requires_grad
    assert_close(loss, ref[0], name="loss")
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    assert not loss.requires_grad
    assert_close(loss, ref[0], name="loss")


def test_int32_labels():
    hidden, weight, labels = _inputs(9, 300, 16, torch.float32)
    a = linear_cross_entropy(hidden, weight, labels.int())
    b = linear_cross_entropy(hidden, weight, labels)
    assert torch.equal(a, b)


def test_sliced_dw_accumulation(monkeypatch):
    """fp16 dW accumulated in fp32 through vocabulary slices (the path without an fp32-output GEMM)."""
    monkeypatch.setattr(ce, "_DW_SLICE_BYTES", 64 * 16 * 2)  # 64 vocabulary rows per slice: 5 slices of 300
    monkeypatch.setattr(ce, "_fp32_out_gemm_works", lambda device, dtype: False)  # on CUDA too
    hidden, weight, labels = _inputs(20, 300, 16, torch.float16)
    _check(hidden, weight, labels, torch.float16, reduction="sum", chunk_size=7)


def test_public_import_and_auto_backend():
    import qwenvl_kernels

    hidden, weight, labels = _inputs(5, 7, 16, torch.float32)
    assert qwenvl_kernels.linear_cross_entropy is linear_cross_entropy
    auto = qwenvl_kernels.get_backend("auto").linear_cross_entropy
    assert_close(auto(hidden, weight, labels), reference.linear_cross_entropy(hidden, weight, labels))


# ------------------------------------------------------------------------------------------------------ errors

def test_error_bad_label():
    hidden, weight, labels = _inputs(6, 7, 16, torch.float32)
    for bad in (7, -2):
        lab = labels.clone()
        lab[3] = bad
        with pytest.raises(ValueError, match=r"outside \[0, 7\)") as info:
            linear_cross_entropy(hidden, weight, lab)
        # bad data, not an unsupported input: "auto" must not fall back to the reference (a device assert on CUDA)
        assert not isinstance(info.value, UnsupportedInput)
    lab = labels.clone()
    lab[3] = -100
    with pytest.raises(ValueError, match="not ignore_index=5"):
        linear_cross_entropy(hidden, weight, lab, ignore_index=5)


def test_error_bad_arguments():
    hidden, weight, labels = _inputs(6, 7, 16, torch.float32)
    cases = [
        (dict(reduction="none"), "reduction must be 'mean' or 'sum'"),
        (dict(weight=weight[:, :8]), "hidden size mismatch"),
        (dict(labels=labels[:5]), r"labels must be \[N\] = \[6\]"),
        (dict(hidden=hidden[None]), r"expected hidden \[N, H\]"),
        (dict(labels=labels.float()), "labels must be int64"),
        (dict(weight=weight.half()), "different dtypes"),
        (dict(hidden=hidden.double(), weight=weight.double()), "not supported"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(ignore_index=1.5), "ignore_index must be an int"),
    ]
    for kw, msg in cases:
        args = dict(hidden=hidden, weight=weight, labels=labels)
        args.update(kw)
        with pytest.raises(UnsupportedInput, match=msg):
            linear_cross_entropy(**args)
    if not CUDA:
        with pytest.raises(UnsupportedInput, match="bfloat16"):
            linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels)


# ------------------------------------------------------------------------------------------------------ memory

def _cpu_peak_bytes(fn, tmp_path):
    """Peak of CPU bytes allocated by torch while fn runs, above what was live when it started (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    return max([0] + [e["args"]["Total Allocated"] for e in events if e["args"].get("Device Type") == 0])


@pytest.mark.skipif(CUDA, reason="CPU allocator events under the interpreter; CUDA: test_qwen_vl_size_cuda")
def test_peak_memory_bounded_by_chunk(tmp_path):
    N, V, H, C = 64, 700, 4, 8
    hidden, weight, labels = _inputs(N, V, H, torch.float32, device="cpu")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    hr = hidden.clone().requires_grad_()
    wr = weight.clone().requires_grad_()

    def fused():
        linear_cross_entropy(h, w, labels, chunk_size=C).backward()

    def unfused():
        reference.linear_cross_entropy(hr, wr, labels).backward()

    logits_bytes = N * V * 4
    peak_fused = _cpu_peak_bytes(fused, tmp_path)
    peak_ref = _cpu_peak_bytes(unfused, tmp_path)
    # chunk + fp32 dW + dhidden, then the returned gradients of both inputs, plus small vectors (losses, labels)
    model = C * V * 4 + 2 * V * H * 4 + 2 * N * H * 4 + 4 * N * 8
    print(f"peak fused {peak_fused} B (model {model} B), unfused {peak_ref} B, one [N, V] fp32 = {logits_bytes} B")
    assert peak_fused <= model
    assert peak_fused < logits_bytes / 3
    assert peak_ref >= 2 * logits_bytes  # the tracker does see the materialized logits
    assert_close(w.grad, wr.grad, name="dweight")
    assert_close(h.grad, hr.grad, name="dhidden")


# ------------------------------------------------------------------------------------------------------ CUDA

@needs_cuda
@pytest.mark.parametrize("N,V,H,chunk", SHAPES + [(300, 4099, 128, 64)])
def test_bf16_cuda(N, V, H, chunk):
    _check(*_inputs(N, V, H, torch.bfloat16), torch.bfloat16, grad_scale=0.5, chunk_size=chunk)


@needs_cuda
def test_fp32_out_gemm_probe_cuda():
    # whichever dW path the probe picks, it must agree with a plain fp32 accumulation
    dw = torch.randn(300, 64, device="cuda")
    dl = torch.randn(17, 300, device="cuda").bfloat16()
    h = torch.randn(17, 64, device="cuda").bfloat16()
    want = dw + dl.float().t() @ h.float()
    ce._accumulate_dw(dw, dl, h)
    assert_close(dw, want, dtype=torch.bfloat16)


@needs_cuda
def test_qwen_vl_size_cuda():
    """4096 tokens x H 4096 x V 151936 in bf16: parity with the fp32 reference, and peak memory vs the unfused path."""
    N, V, H = 4096, 151936, 4096
    hidden, weight, labels = _inputs(N, V, H, torch.bfloat16, ignore_frac=0.1)
    torch.cuda.synchronize()

    def peak(fn):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out

    peak_fused, out = peak(lambda: _run(linear_cross_entropy, hidden, weight, labels))
    peak_unfused, ref_bf16 = peak(lambda: _run(reference.linear_cross_entropy, hidden, weight, labels))
    # dW fp32 + the weight copy made by _run and the returned dW (bf16) + the chunk, its autotune clone and
    # do_bench's cache-flush buffer (first call) + dhidden and copies + slack (cuBLAS workspace, dW slices)
    bound = V * H * 4 + 2 * V * H * 2 + 3 * ce._CHUNK_BYTES_CUDA + 8 * N * H * 2 + (256 << 20)
    print(f"peak fused {peak_fused / 2**30:.2f} GiB (bound {bound / 2**30:.2f}), "
          f"unfused {peak_unfused / 2**30:.2f} GiB")
    assert peak_fused <= bound
    assert peak_fused < peak_unfused
    for name, o, r in zip(("loss", "dhidden", "dweight"), out, ref_bf16):
        assert_close(o, r, dtype=torch.bfloat16, name=name)
    del ref_bf16
    ref = _run(reference.linear_cross_entropy, hidden.float(), weight.float(), labels)
    for name, o, r in zip(("loss", "dhidden", "dweight"), out, ref):
        assert_close(o, r, dtype=torch.bfloat16, name=name)
