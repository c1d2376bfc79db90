"""The kernels as torch.library custom ops: `opcheck` of every op (schema, fake implementation, autograd
registration, AOT dispatch with dynamic shapes), torch.compile (backend aot_eager, fullgraph) of every public
function and of a block that chains them against eager outputs and gradients. fp32 at small shapes (the interpreter
on the CPU, or CUDA). The whole model compiled with these ops (fullgraph, both backends) is tests/test_compile.py's."""
import pytest
import torch

import qwenvl_kernels as qk
from qwenvl_kernels.launch import LOG2E
from tests.helpers import DEVICE, assert_close

pytestmark = pytest.mark.triton

ops = torch.ops.qwenvl


def _t(*shape, grad=False, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE, dtype=dtype) * scale).requires_grad_(grad)


def _i(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _tables(S, half):
    freqs = torch.outer(torch.arange(S, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(half) / half))
    return freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)


def _resampler_inputs(B=2, Nq=5, Nk=9, E=32, grad=True):
    return (_t(Nq, E, grad=grad), _t(Nq, E), _t(B, Nk, E, grad=grad), _t(Nk, E), _t(3 * E, E, grad=grad) * 0.2,
            _t(3 * E, grad=grad), _t(E, E, grad=grad) * 0.2, _t(E, grad=grad))


def _opcheck_cases():
    """(op, args) per case: every forward op with inputs that require grad (so its autograd registration and the
    compiled backward are checked too), and every backward op with the saved tensors its forward made."""
    cos, sin = _tables(16, 8)
    q, k, v = _t(2, 7, 4, 16), _t(2, 5, 2, 16), _t(2, 5, 2, 16)
    o, lse = ops.flash_attn(q, k, v, None, None, None, 0, 0, 0.25, True)
    cu_q, cu_k = _i([0, 3, 10]), _i([0, 6, 8])
    res = _resampler_inputs(grad=False)
    _, rq, kxv, pk, ro, rlse = ops.resampler_attention(*res, 4)
    x, w = _t(6, 40), _t(40)
    _, mean, rstd = ops.layer_norm(x, w, w, 1e-5)
    _, _, rms = ops.rms_norm(x, w, None, 1e-6)
    return {
        "rms_norm": (ops.rms_norm, (_t(3, 5, 40, grad=True), _t(40, grad=True), None, 1e-6)),
        "rms_norm+residual": (ops.rms_norm, (_t(3, 40, grad=True), _t(40, grad=True), _t(3, 40, grad=True), 1e-6)),
        "rms_norm_backward": (ops.rms_norm_backward, (_t(6, 40), None, x, w, rms, True, True)),
        "layer_norm": (ops.layer_norm, (_t(3, 5, 40, grad=True), _t(40, grad=True), _t(40, grad=True), 1e-5)),
        "layer_norm_backward": (ops.layer_norm_backward, (_t(6, 40), x, w, mean, rstd, True, True, False)),
        "apply_rotary": (ops.apply_rotary, (_t(2, 6, 3, 16, grad=True), _t(2, 6, 1, 16, grad=True), cos, sin,
                                            _i([[0, 1, 2, 3, 4, 5], [9, 10, 11, 12, 13, 14]], torch.int64))),
        "apply_rotary_backward": (ops.apply_rotary_backward, (_t(2, 6, 3, 16), None, cos, sin, None)),
        "swiglu": (ops.swiglu, (_t(4, 33, grad=True), _t(4, 33, grad=True))),
        "swiglu_backward": (ops.swiglu_backward, (_t(4, 33), _t(4, 33), _t(4, 33))),
        "flash_attn": (ops.flash_attn, (_t(2, 7, 4, 16, grad=True), _t(2, 5, 2, 16, grad=True),
                                        _t(2, 5, 2, 16, grad=True), _i([0, 2]), None, None, 0, 0, 0.25, True)),
        "flash_attn varlen": (ops.flash_attn, (_t(10, 2, 16, grad=True), _t(8, 2, 16, grad=True),
                                               _t(8, 2, 16, grad=True), None, cu_q, cu_k, 7, 6, 0.25, False)),
        "flash_attn_backward": (ops.flash_attn_backward, (_t(2, 7, 4, 16), q, k, v, o, lse, None, None, None, 0, 0,
                                                          0.25, True, True, True)),
        "decode_attention": (ops.decode_attention, (_t(2, 2, 4, 16), _t(2, 12, 2, 16), _t(2, 12, 2, 16),
                                                    _i([7, 12]), _i([0, 3]), 0.25, 2)),
        "resampler_attention": (ops.resampler_attention, (*_resampler_inputs(), 4)),
        "resampler_attention_backward": (ops.resampler_attention_backward,
                                         (_t(2, 5, 32), res[0], res[1], res[2], res[3], res[4], res[6], rq, kxv, pk,
                                          ro, rlse, 4, [True] * 8)),
        "linear_cross_entropy": (ops.linear_cross_entropy, (_t(9, 16, grad=True), _t(50, 16, grad=True),
                                                            _i([1, -100, 3, 49, 0, 7, 7, -100, 2], torch.int64),
                                                            -100, "mean", 4, True, True)),
        "linear_cross_entropy_backward": (ops.linear_cross_entropy_backward,
                                          (torch.tensor(0.5, device=DEVICE), _t(9, 16), _t(50, 16), torch.float32)),
    }


# the cases by name (the inputs are built at run time: collection must not launch a kernel)
CASES = ["rms_norm", "rms_norm+residual", "rms_norm_backward", "layer_norm", "layer_norm_backward", "apply_rotary",
         "apply_rotary_backward", "swiglu", "swiglu_backward", "flash_attn", "flash_attn varlen",
         "flash_attn_backward", "decode_attention", "resampler_attention", "resampler_attention_backward",
         "linear_cross_entropy", "linear_cross_entropy_backward"]


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_every_op_is_checked():
    cases = _opcheck_cases()
    assert sorted(cases) == sorted(CASES)
    checked = {str(op).split(".")[-1] for op, _ in cases.values()}
    registered = {name for name in dir(ops) if not name.startswith("_") and hasattr(getattr(ops, name), "default")}
    assert registered <= checked, f"custom ops without an opcheck case: {registered - checked}"


# ------------------------------------------------------------------------------------------------ torch.compile

def _grads(out, leaves, seed=1):
    outs = out if isinstance(out, tuple) else (out,)
    outs = [o for o in outs if o is not None and o.requires_grad]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, device=DEVICE, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, leaves, cot, allow_unused=True)


def _compare_compiled(fn, *args):
    """fn compiled (aot_eager, fullgraph) gives the eager outputs and the eager gradients of every leaf."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    eager = fn(*args)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
    eager_t = eager if isinstance(eager, tuple) else (eager,)
    compiled_t = compiled if isinstance(compiled, tuple) else (compiled,)
    for i, (a, b) in enumerate(zip(eager_t, compiled_t)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(b, a, name=f"output {i}", rel_rms=1e-6, max_abs=1e-6)
    if leaves:
        for i, (a, b) in enumerate(zip(_grads(eager, leaves), _grads(compiled, leaves))):
            assert (a is None) == (b is None)
            if a is not None:
                assert_close(b, a, name=f"grad {i}", rel_rms=1e-6, max_abs=1e-6)


def _compile_cases():
    cos, sin = _tables(16, 8)
    cu = _i([0, 3, 10])
    lab = _i([1, -100, 3, 49, 0, 7, 7, -100, 2], torch.int64)
    attention = qk.get_backend("triton").attention
    return {
        "rms_norm": (lambda x, w, r: qk.rms_norm(x, w, 1e-6, residual=r), _t(3, 5, 40, grad=True),
                     _t(40, grad=True), _t(3, 5, 40, grad=True)),
        "layer_norm": (lambda x, w, b: qk.layer_norm(x, w, b), _t(3, 40, grad=True), _t(40, grad=True),
                       _t(40, grad=True)),
        "apply_rotary": (lambda q, k: qk.apply_rotary(q, k, cos, sin, _i([3, 4, 5, 6], torch.int64)),
                         _t(2, 4, 3, 16, grad=True), _t(2, 4, 1, 16, grad=True)),
        "swiglu": (qk.swiglu, _t(4, 33, grad=True), _t(4, 33, grad=True)),
        "attention": (lambda q, k, v: attention(q, k, v, True, None, _i([0, 2])),
                      _t(2, 7, 4, 16, grad=True), _t(2, 9, 2, 16, grad=True), _t(2, 9, 2, 16, grad=True)),
        "flash_attn_func lse": (lambda q, k, v: qk.flash_attn_func(q, k, v, 0.0, 0.3, True, (-1, -1), 0.0, None,
                                                                   True, True),
                                _t(2, 7, 4, 16, grad=True), _t(2, 7, 2, 16, grad=True), _t(2, 7, 2, 16, grad=True)),
        "flash_attn_varlen_func": (lambda q, k, v: qk.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True),
                                   _t(10, 2, 16, grad=True), _t(10, 2, 16, grad=True), _t(10, 2, 16, grad=True)),
        "decode_attention": (lambda q, k, v: qk.decode_attention(q, k, v, _i([5, 12]), _i([0, 2])),
                             _t(2, 2, 4, 16), _t(2, 12, 2, 16), _t(2, 12, 2, 16)),
        "resampler_attention": (lambda *a: qk.resampler_attention(*a, 4), *_resampler_inputs()),
        "linear_cross_entropy": (lambda h, w: qk.linear_cross_entropy(h, w, lab, chunk_size=4),
                                 _t(9, 16, grad=True), _t(50, 16, grad=True)),
    }


COMPILE_CASES = ["rms_norm", "layer_norm", "apply_rotary", "swiglu", "attention", "flash_attn_func lse",
                 "flash_attn_varlen_func", "decode_attention", "resampler_attention", "linear_cross_entropy"]


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiled_function_matches_eager(case):
    cases = _compile_cases()
    assert sorted(cases) == sorted(COMPILE_CASES)
    fn, *args = cases[case]
    torch._dynamo.reset()
    _compare_compiled(fn, *args)


def test_compiled_kvcache_append_matches_eager():
    """flash_attn_with_kvcache writes the new keys into the caches in place, compiled as in eager mode."""
    q, k, v = _t(2, 1, 4, 16), _t(2, 1, 2, 16), _t(2, 1, 2, 16)
    caches = [(_t(2, 12, 2, 16), _t(2, 12, 2, 16)) for _ in range(2)]
    caches[1] = (caches[0][0].clone(), caches[0][1].clone())
    lens = _i([4, 9])
    fn = lambda kc, vc: qk.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)  # noqa: E731
    with torch.no_grad():
        eager = fn(*caches[0])
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(*caches[1])
    assert_close(compiled, eager, rel_rms=1e-6, max_abs=1e-6)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_compiled_block_chains_the_kernels():
    """A decoder-like block: rms_norm (fused residual) -> projections -> rotary -> attention -> swiglu MLP ->
    layer_norm -> fused LM head and loss, compiled as one graph of custom ops, gradients through all of it."""
    T, H, D, E = 7, 2, 16, 32
    cos, sin = _tables(T, D // 2)
    x, res = _t(2, T, E, grad=True), _t(2, T, E, grad=True)
    # weights scaled as an initialization would: activations stay O(1) through the block
    w_norm, w_qkv = _t(E, grad=True), _t(3 * E, E, grad=True, scale=E ** -0.5)
    w_mlp, w_out, head = _t(2 * E, E, grad=True, scale=E ** -0.5), _t(E, E, scale=E ** -0.5), _t(50, E, grad=True)
    labels = torch.randint(0, 50, (2 * T,), device=DEVICE)

    def block(x, res, w_norm, w_qkv, w_mlp, head):
        h, resid = qk.rms_norm(x, w_norm, 1e-6, residual=res)
        q, k, v = (h @ w_qkv.t()).view(2, T, 3, H, D).unbind(2)
        q, k = qk.apply_rotary(q, k, cos, sin)
        a = qk.flash_attn_func(q, k, v, causal=True).reshape(2, T, E) @ w_out.t() + resid
        gate, up = (a @ w_mlp.t()).chunk(2, dim=-1)
        m = qk.layer_norm(qk.swiglu(up, gate) + a, w_norm, w_norm)
        return qk.linear_cross_entropy(m.reshape(-1, E), head, labels)

    torch._dynamo.reset()
    _compare_compiled(block, x, res, w_norm, w_qkv, w_mlp, head)


def test_flash_attn_lse_units():
    """return_attn_probs gives flash-attn's lse: natural log of the softmax normalizer of the scaled scores."""
    q, k, v = _t(1, 3, 2, 16), _t(1, 5, 2, 16), _t(1, 5, 2, 16)
    _, lse, probs = qk.flash_attn_func(q, k, v, softmax_scale=0.3, return_attn_probs=True)
    want = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3, dim=-1)
    assert probs is None
    assert_close(lse, want, name="lse")
    assert LOG2E > 1  # the kernels' own lse is in log2 units: the conversion is not the identity
