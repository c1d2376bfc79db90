"""flash-attn 2's call signatures (qwenvl_kernels.ops.flash_attn_interface): every default accepted, spelled out
or not, the lse that return_attn_probs gives, the packed variants, flash_attn_with_kvcache, and a clear error for
every argument value that is not served. Against qwenvl_kernels.reference in float64."""
import math

import pytest
import torch

import qwenvl_kernels as qk
from qwenvl_kernels import reference
from qwenvl_kernels.launch import UnsupportedInput
from tests.helpers import DEVICE, assert_close

pytestmark = pytest.mark.triton

# flash-attn 2.6's defaults, in its positional order after (q, k, v)
DEFAULTS = dict(dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                alibi_slopes=None, deterministic=False, return_attn_probs=False)


def _t(*shape, grad=True, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(grad)


def _cu(lens):
    return torch.tensor([0] + list(lens), device=DEVICE).cumsum(0).to(torch.int32)


def _check(fn, ref_fn, *inputs):
    """fn's output and the gradients of `inputs` against ref_fn run in float64."""
    out = fn(*inputs)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, do)
    xs = [x.detach().double().requires_grad_() for x in inputs]
    ref = ref_fn(*xs)
    ref_grads = torch.autograd.grad(ref, xs, do.double())
    assert_close(out, ref, dtype=torch.float32, name="out")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, dtype=torch.float32, name=f"grad {i}")


def _lse_ref(q, k, scale, causal):
    """flash-attn's softmax_lse [batch, heads, seqlen_q]: natural log, +inf for a row that sees no key."""
    Tq, Tk, H, Hk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(H // Hk, 2)) * scale
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        s = s.masked_fill(j > i + Tk - Tq, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


# ------------------------------------------------------------------------------------------------ flash_attn_func

@pytest.mark.parametrize("spelled", ["positional", "keyword", "list window", "deterministic", "omitted"])
def test_defaults_spelled_out(spelled):
    q, k, v = _t(2, 9, 4, 32), _t(2, 9, 2, 32), _t(2, 9, 2, 32)
    calls = {
        "positional": lambda q, k, v: qk.flash_attn_func(q, k, v, 0.0, None, True, (-1, -1), 0.0, None, False,
                                                         False),
        "keyword": lambda q, k, v: qk.flash_attn_func(q, k, v, **dict(DEFAULTS, causal=True)),
        "list window": lambda q, k, v: qk.flash_attn_func(q, k, v, causal=True, window_size=[-1, -1]),
        "deterministic": lambda q, k, v: qk.flash_attn_func(q, k, v, causal=True, deterministic=True),
        "omitted": lambda q, k, v: qk.flash_attn_func(q, k, v, causal=True),
    }
    _check(calls[spelled], lambda q, k, v: reference.attention(q, k, v, causal=True), q, k, v)


@pytest.mark.parametrize("window,causal,want_causal", [
    ((-1, 0), False, True),       # flash-attn: (-1, 0) is the causal mask
    ((-1, 3), True, True),        # causal overrides the right side of a window
    ((11, -1), False, False),     # a side at least seqlen_k (11) is unlimited
    ((20, 11), False, False),
    ((-5, -3), False, False),     # any negative side is unlimited
])
def test_windows_that_equal_plain_or_causal_attention(window, causal, want_causal):
    q, k, v = _t(1, 7, 2, 16), _t(1, 11, 2, 16), _t(1, 11, 2, 16)
    _check(lambda q, k, v: qk.flash_attn_func(q, k, v, causal=causal, window_size=window),
           lambda q, k, v: reference.attention(q, k, v, causal=want_causal), q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_return_attn_probs(causal):
    # seqlen_q > seqlen_k: with causal, the first rows see no key (zeros out, +inf lse, as flash-attn 2)
    q, k, v = _t(2, 9, 4, 32), _t(2, 5, 2, 32), _t(2, 5, 2, 32)
    out, lse, probs = qk.flash_attn_func(q, k, v, softmax_scale=0.2, causal=causal, return_attn_probs=True)
    assert probs is None
    assert lse.shape == (2, 4, 9) and lse.dtype == torch.float32 and not lse.requires_grad
    assert_close(out, reference.attention(q, k, v, causal=causal, softmax_scale=0.2).detach())
    want = _lse_ref(q.detach(), k.detach(), 0.2, causal)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(want))
    assert_close(lse[finite], want[finite].float(), name="lse")
    if causal:
        assert torch.isposinf(lse[:, :, :4]).all() and torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    out.sum().backward()  # the output stays differentiable
    assert q.grad is not None


def test_packed_qkv_and_kv():
    qkv = _t(2, 9, 3, 4, 32)
    _check(lambda qkv: qk.flash_attn_qkvpacked_func(qkv, 0.0, None, True, (-1, -1), 0.0, None, False, False),
           lambda qkv: reference.attention(*qkv.unbind(2), causal=True), qkv)
    q, kv = _t(2, 7, 4, 32), _t(2, 9, 2, 2, 32)
    _check(lambda q, kv: qk.flash_attn_kvpacked_func(q, kv, **DEFAULTS),
           lambda q, kv: reference.attention(q, *kv.unbind(2)), q, kv)
    out, lse, none = qk.flash_attn_kvpacked_func(q, kv, return_attn_probs=True)
    assert lse.shape == (2, 4, 7) and none is None


# ------------------------------------------------------------------------------------------------ varlen

@pytest.mark.parametrize("spelled", ["positional", "keyword", "omitted"])
def test_varlen_defaults_spelled_out(spelled):
    lens_q, lens_k = [3, 1, 6], [5, 2, 6]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v = _t(10, 4, 16), _t(13, 2, 16), _t(13, 2, 16)
    calls = {
        "positional": lambda q, k, v: qk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 6, 0.0, None, True, (-1, -1),
                                                                0.0, None, False, False, None),
        "keyword": lambda q, k, v: qk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 6, block_table=None,
                                                             **dict(DEFAULTS, causal=True)),
        "omitted": lambda q, k, v: qk.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 6, causal=True),
    }
    _check(calls[spelled], lambda q, k, v: reference.varlen_attention(q, k, v, cu_q, cu_k, 6, 6, causal=True), q, k, v)


def test_varlen_return_attn_probs_and_packed():
    lens = [4, 1, 7]
    cu = _cu(lens)
    q, k, v = _t(12, 2, 16), _t(12, 2, 16), _t(12, 2, 16)
    out, lse, probs = qk.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, softmax_scale=0.25, return_attn_probs=True)
    assert probs is None and lse.shape == (2, 12)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want = _lse_ref(q[None, s:e].detach(), k[None, s:e].detach(), 0.25, False)[0]
        assert_close(lse[:, s:e], want.float(), name="lse")
    qkv = _t(12, 3, 2, 16)
    _check(lambda qkv: qk.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True),
           lambda qkv: reference.varlen_attention(*qkv.unbind(1), cu, cu, 7, 7, causal=True), qkv)
    q, kv = _t(12, 4, 16), _t(12, 2, 2, 16)
    _check(lambda q, kv: qk.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 7, 7, **DEFAULTS),
           lambda q, kv: reference.varlen_attention(q, *kv.unbind(1), cu, cu, 7, 7), q, kv)


# ------------------------------------------------------------------------------------------------ errors

def test_unserved_arguments_name_themselves():
    q, k = _t(1, 4, 2, 16, grad=False), _t(1, 4, 2, 16, grad=False)
    cu = _cu([4])
    cases = [
        (dict(dropout_p=0.1), "dropout_p"),
        (dict(window_size=(2, 0)), "window_size"),
        (dict(window_size=(1, 1)), "window_size"),
        (dict(window_size=5), "window_size must be a pair"),
        (dict(softcap=30.0), "softcap"),
        (dict(alibi_slopes=torch.ones(2, device=DEVICE)), "alibi_slopes"),
        (dict(deterministic="yes"), "deterministic"),
        (dict(return_attn_probs="yes"), "return_attn_probs"),
    ]
    for kw, match in cases:
        with pytest.raises(UnsupportedInput, match=match):
            qk.flash_attn_func(q, k, k, **kw)
        with pytest.raises(UnsupportedInput, match=match):
            qk.flash_attn_varlen_func(q[0], k[0], k[0], cu, cu, 4, 4, **kw)
    with pytest.raises(UnsupportedInput, match="block_table"):
        qk.flash_attn_varlen_func(q[0], k[0], k[0], cu, cu, 4, 4, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(UnsupportedInput, match="qkv must be"):
        qk.flash_attn_qkvpacked_func(_t(1, 4, 2, 2, 16))
    with pytest.raises(UnsupportedInput, match="kv must be"):
        qk.flash_attn_kvpacked_func(q, _t(1, 4, 3, 2, 16))


# ------------------------------------------------------------------------------------------------ KV cache

def _cache(B=2, S=20, Hk=2, D=16):
    return _t(B, S, Hk, D, grad=False), _t(B, S, Hk, D, grad=False)


@torch.no_grad()
@pytest.mark.parametrize("seqlens", ["tensor", "int", "none"])
def test_kvcache_without_new_keys(seqlens):
    q = _t(2, 1, 4, 16, grad=False)
    k_cache, v_cache = _cache()
    lens = {"tensor": torch.tensor([7, 20], dtype=torch.int32, device=DEVICE), "int": 13, "none": None}[seqlens]
    out = qk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    want_lens = {"tensor": lens, "int": torch.full((2,), 13, device=DEVICE), "none": torch.full((2,), 20,
                                                                                               device=DEVICE)}[seqlens]
    assert_close(out, reference.decode_attention(q, k_cache, v_cache, want_lens))


@torch.no_grad()
@pytest.mark.parametrize("Tq", [1, 3])
def test_kvcache_appends_in_place(Tq):
    q, k, v = _t(2, Tq, 4, 16, grad=False), _t(2, Tq, 2, 16, grad=False), _t(2, Tq, 2, 16, grad=False)
    k_cache, v_cache = _cache()
    k0, v0 = k_cache.clone(), v_cache.clone()
    lens = torch.tensor([5, 11], dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    out = qk.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, None, None, lens, None, leftpad, None, 0.3, True,
                                     (-1, -1), 0.0, True, None, 0, False)
    for b, n in enumerate(lens.tolist()):
        k0[b, n:n + Tq], v0[b, n:n + Tq] = k[b], v[b]
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0), "the caches were not updated as flash-attn does"
    want = reference.decode_attention(q, k0, v0, lens + Tq, leftpad, softmax_scale=0.3)
    assert_close(out, want)
    assert torch.equal(lens, torch.tensor([5, 11], dtype=torch.int32, device=DEVICE)), "cache_seqlens was written"


@torch.no_grad()
def test_kvcache_refusals():
    q = _t(2, 1, 4, 16, grad=False)
    k_cache, v_cache = _cache()
    lens = torch.tensor([5, 11], dtype=torch.int32, device=DEVICE)
    cos = torch.ones(20, 8, device=DEVICE)
    cases = [
        (dict(rotary_cos=cos, rotary_sin=cos), "rotary_cos"),
        (dict(cache_batch_idx=torch.arange(2, device=DEVICE)), "cache_batch_idx"),
        (dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), "block_table"),
        (dict(window_size=(4, 0)), "window_size"),
        (dict(softcap=5.0), "softcap"),
        (dict(alibi_slopes=torch.ones(4, device=DEVICE)), "alibi_slopes"),
        (dict(return_softmax_lse=True), "return_softmax_lse"),
        (dict(num_splits=-1), "num_splits"),
        (dict(k=_t(2, 1, 2, 16, grad=False)), "both k and v"),
    ]
    for kw, match in cases:
        with pytest.raises(UnsupportedInput, match=match):
            qk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, **kw)
    with pytest.raises(UnsupportedInput, match="causal=False with 3 query tokens"):
        qk.flash_attn_with_kvcache(_t(2, 3, 4, 16, grad=False), k_cache, v_cache, cache_seqlens=lens)
    with pytest.raises(UnsupportedInput, match="needs cache_seqlens"):
        qk.flash_attn_with_kvcache(q, k_cache, v_cache, _t(2, 1, 2, 16, grad=False), _t(2, 1, 2, 16, grad=False))
    with pytest.raises(UnsupportedInput, match="does not fit k_cache"):
        qk.flash_attn_with_kvcache(q, k_cache, v_cache, _t(2, 1, 1, 16, grad=False), _t(2, 1, 1, 16, grad=False),
                                   cache_seqlens=lens)


def test_kvcache_is_inference_only():
    q = _t(2, 1, 4, 16)
    k_cache, v_cache = _cache()
    with pytest.raises(UnsupportedInput, match="inference-only"):
        qk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3)
    assert math.isfinite(qk.flash_attn_with_kvcache(q.detach(), k_cache, v_cache, cache_seqlens=3).sum().item())
