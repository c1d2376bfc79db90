"""`patch_official_model` against the official-structure stand-in (tests/official_remote): the patched instance gives
the unpatched model's logits, loss, gradients, cache, greedy tokens and chat answers (fp32, relative error <= 1e-4)
on the torch and the Triton backends, changes nothing else, and refuses what it cannot serve before changing anything.

Padding: the released code counts rotary and log-n positions from the padded start of a row, and so does the patch
(its promise is the unpatched numbers). At positions whose attention_mask is 0 the released code computes values
that no real token reads (a padded query averages over masked keys); there the patched model keeps other finite
values, so logits, cache entries and the loss term that predicts a row's first real token from a padding position
are compared where they carry meaning: every real position, labels -100 on padding and on that first token.
"""
import copy
import logging

import pytest
import torch
from torch import nn

from qwenvl.official import UnsupportedOfficialModel, is_patched, patch_official_model, unpatch_official_model
from qwenvl.official.forwards import PATCH_ATTR
from tests.official_remote import build
from tests.official_remote.modeling_qwen import QWenAttention, QWenLMHeadModel

TOL = 1e-4
PROMPTS = (
    [{"image": "i0.png"}, {"text": "What is in the picture? Describe it."}],
    [{"image": "i1.png"}, {"image": "i0.png"}, {"text": "Compare."}],
)


def _triton_or_skip():
    pytest.importorskip("triton")
    from qwenvl_kernels import get_backend

    try:
        get_backend("triton")
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.slow)])
def kernels(request):
    if request.param == "triton":
        _triton_or_skip()
    return request.param


@pytest.fixture
def images(tmp_path, monkeypatch):
    """The released model reads images from the paths in the token stream: short names in the working directory."""
    monkeypatch.chdir(tmp_path)
    return build.write_images(tmp_path, 2)


def rel(a, b):
    assert torch.isfinite(a).all()
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item() if b.norm() > 0 else a.norm().item()


def batch(prompts, side="left", tok=None):
    tok = tok or build.tokenizer()
    seqs = [tok.encode(tok.from_list_format(p)) for p in prompts]
    length = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        pad = length - len(s)
        ids.append([tok.eod_id] * pad + s if side == "left" else s + [tok.eod_id] * pad)
        mask.append([0] * pad + [1] * len(s) if side == "left" else [1] * len(s) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask)


def training_labels(ids, mask):
    """-100 on padding and on a token predicted from a padding position (a row's first token after left padding)."""
    real = mask.bool()
    after_pad = torch.cat([torch.zeros_like(real[:, :1]), ~real[:, :-1]], dim=1)
    return ids.masked_fill(~real | after_pad, -100)


def pair(kernels, **config):
    reference = build.build(**config)
    patched = patch_official_model(build.build(**config), kernels=kernels)
    return reference, patched


def assert_cache_close(p_cache, r_cache, mask):
    real = mask.bool()
    assert len(p_cache) == len(r_cache)
    for (pk, pv), (rk, rv) in zip(p_cache, r_cache):
        assert pk.shape == rk.shape and pv.shape == rv.shape
        assert rel(pk[real], rk[real]) <= TOL and rel(pv[real], rv[real]) <= TOL


# ---------------------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_loss_and_gradients_match(kernels, images, side):
    reference, patched = pair(kernels)
    ids, mask = batch(PROMPTS, side)
    real = mask.bool()
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, use_cache=True)
        got = patched(ids, attention_mask=mask, use_cache=True)
    assert rel(got.logits[real], want.logits[real]) <= TOL
    assert_cache_close(got.past_key_values, want.past_key_values, mask)

    labels = training_labels(ids, mask)
    reference.train()
    patched.train()
    want = reference(ids, attention_mask=mask, labels=labels)
    got = patched(ids, attention_mask=mask, labels=labels)
    assert got.logits is None  # training with labels: the head and the loss ran fused, no [tokens, vocab] logits
    assert rel(got.loss, want.loss) <= TOL
    want.loss.backward()
    got.loss.backward()
    grads = dict(patched.named_parameters())
    checked = 0
    for name, p in reference.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
            continue
        assert rel(grads[name].grad, p.grad) <= TOL, name
        checked += 1
    assert checked == sum(p.requires_grad for p in reference.parameters())  # every trainable parameter, ViT included


def test_eval_loss_with_logits_and_tuple_outputs(images):
    reference, patched = pair("torch")
    ids, mask = batch(PROMPTS)
    labels = training_labels(ids, mask)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, labels=labels, return_dict=False)
        got = patched(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert len(got) == len(want) == 3  # (loss, logits, presents) as the released tuple
    assert rel(got[0], want[0]) <= TOL
    assert rel(got[1][mask.bool()], want[1][mask.bool()]) <= TOL


def test_training_logits_option(images):
    reference, patched = build.build().train(), patch_official_model(build.build(), "torch", training_logits=True)
    patched.train()
    ids, mask = batch(PROMPTS[:1])
    got = patched(ids, labels=ids)
    want = reference(ids, labels=ids)
    assert rel(got.logits, want.logits) <= TOL and rel(got.loss, want.loss) <= TOL


def test_training_without_images_runs_the_vit_on_the_blank_image(kernels):
    reference, patched = pair(kernels)
    reference.train()
    patched.train()
    ids = torch.randint(0, 256, (2, 9))
    want, got = reference(ids, labels=ids), patched(ids, labels=ids)
    assert rel(got.loss, want.loss) <= TOL
    want.loss.backward()
    got.loss.backward()
    w_ref, w_got = reference.transformer.visual.conv1.weight.grad, patched.transformer.visual.conv1.weight.grad
    assert w_ref is not None and w_got is not None and rel(w_got, w_ref) <= TOL  # zero, and present, in both


def test_cached_decode_matches(kernels, images):
    reference, patched = pair(kernels)
    ids, mask = batch(PROMPTS)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, use_cache=True)
        got = patched(ids, attention_mask=mask, use_cache=True)
        for _ in range(3):
            step = want.logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(step, got.logits[:, -1].argmax(-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            want = reference(step, past_key_values=want.past_key_values, attention_mask=mask, use_cache=True)
            got = patched(step, past_key_values=got.past_key_values, attention_mask=mask, use_cache=True)
            assert rel(got.logits, want.logits) <= TOL
            assert_cache_close(got.past_key_values, want.past_key_values, mask)


def test_dynamic_ntk_and_logn_past_seq_length(kernels, images):
    reference, patched = pair(kernels, seq_length=24)
    ids, mask = batch(PROMPTS)
    assert ids.shape[1] > 2 * 24  # past twice the trained length: NTK alpha 3 or more, log-n factors above 1
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, use_cache=True)
        got = patched(ids, attention_mask=mask, use_cache=True)
        assert patched.transformer.rotary_emb._ntk_alpha_cached == reference.transformer.rotary_emb._ntk_alpha_cached
        assert reference.transformer.rotary_emb._ntk_alpha_cached >= 3
        assert rel(got.logits[mask.bool()], want.logits[mask.bool()]) <= TOL
        step = want.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        want = reference(step, past_key_values=want.past_key_values, attention_mask=mask)
        got = patched(step, past_key_values=got.past_key_values, attention_mask=mask)
    assert rel(got.logits, want.logits) <= TOL


def test_first_masking_revision_and_multi_token_continuation(images):
    """The first released revision: causal through registered_causal_mask, a [b, 1, 1, s] padding mask."""
    reference, patched = pair("torch", legacy_causal_mask=True)
    ids, mask = batch(PROMPTS)
    more = torch.randint(0, 256, (2, 3))
    with torch.no_grad():
        want = reference(ids, attention_mask=mask)
        got = patched(ids, attention_mask=mask)
        assert rel(got.logits[mask.bool()], want.logits[mask.bool()]) <= TOL
        mask = torch.cat([mask, torch.ones_like(more)], dim=1)
        want = reference(more, past_key_values=want.past_key_values, attention_mask=mask)
        got = patched(more, past_key_values=got.past_key_values, attention_mask=mask)
    assert rel(got.logits, want.logits) <= TOL


def test_what_the_kernels_do_not_compute_runs_the_released_forward(images, caplog):
    reference, patched = pair("torch")
    ids, mask = batch(PROMPTS)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="qwenvl.official"):
        want = reference(ids, attention_mask=mask, output_attentions=True)
        got = patched(ids, attention_mask=mask, output_attentions=True)
        assert "output_attentions" in caplog.text
        for a, b in zip(got.attentions, want.attentions):  # [batch, heads, queries, keys]
            assert rel(a.transpose(1, 2)[mask.bool()], b.transpose(1, 2)[mask.bool()]) <= TOL
        holed = mask.clone()
        holed[0, -5] = 0  # a masked key between visible ones: not padding
        want = reference(ids, attention_mask=holed)
        got = patched(ids, attention_mask=holed)
        assert "between visible ones" in caplog.text
    assert rel(got.logits[holed.bool()], want.logits[holed.bool()]) <= TOL


def test_gradient_checkpointing(images):
    reference, patched = pair("torch")
    for m in (reference, patched):
        m.transformer.gradient_checkpointing = True
        m.train()
    ids, mask = batch(PROMPTS)
    labels = training_labels(ids, mask)
    want = reference(ids, attention_mask=mask, labels=labels)
    got = patched(ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    got.loss.backward()
    assert rel(got.loss, want.loss) <= TOL
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        if p.grad is not None:
            assert rel(q.grad, p.grad) <= TOL, name


# ----------------------------------------------------------------------------------------- what stays as it was

def _instance_forwards(model):
    return [path for path, m in model.named_modules() if "forward" in m.__dict__ or PATCH_ATTR in m.__dict__]


def test_only_the_patched_instance_changes(images):
    class_forwards = (QWenAttention.forward, QWenLMHeadModel.forward)
    other, patched = build.build(), build.build()
    ids, mask = batch(PROMPTS)
    with torch.no_grad():
        before = other(ids, attention_mask=mask).logits
    patch_official_model(patched, "torch")
    assert (QWenAttention.forward, QWenLMHeadModel.forward) == class_forwards  # the classes are untouched
    assert _instance_forwards(other) == []
    assert is_patched(patched) == "torch" and is_patched(other) is None
    paths = _instance_forwards(patched)
    assert "transformer.h.0.attn" in paths and "transformer.visual.attn_pool" in paths
    assert "transformer.visual.transformer.resblocks.1.ln_2" in paths and "" in paths
    with torch.no_grad():
        assert torch.equal(other(ids, attention_mask=mask).logits, before)


def test_parameters_buffers_and_state_dict_unchanged():
    model = build.build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    patch_official_model(model, "torch")
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert dict(model.named_parameters()) == params and dict(model.named_buffers()) == buffers
    assert sum(1 for _ in model.modules()) == sum(1 for _ in build.build().modules())  # no wrapper modules


def test_unpatch_and_repatch(images):
    model = build.build()
    ids, mask = batch(PROMPTS)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        patch_official_model(model, "torch")
        patch_official_model(model, "auto")  # a re-patch swaps the backend
        assert is_patched(model) == "auto"
        patched = model(ids, attention_mask=mask).logits
        patch_official_model(model, kernels=None)
        assert _instance_forwards(model) == [] and is_patched(model) is None
        assert torch.equal(model(ids, attention_mask=mask).logits, before)
    assert rel(patched[mask.bool()], before[mask.bool()]) <= TOL
    assert unpatch_official_model(model) is model


def test_deepcopy_of_a_patched_model_is_patched_and_independent(images):
    model = patch_official_model(build.build(), "torch")
    twin = copy.deepcopy(model)
    assert twin.transformer.h[0].attn.forward.__self__ is twin.transformer.h[0].attn
    ids, mask = batch(PROMPTS)
    with torch.no_grad():
        assert torch.equal(twin(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


# ------------------------------------------------------------------------------------------------------ refusals

def _unchanged(model):
    assert _instance_forwards(model) == [] and is_patched(model) is None


def test_refuses_a_quantized_layer():
    class Linear8bitLt(nn.Linear):  # the class bitsandbytes swaps in for an 8-bit load
        pass

    model = build.build()
    mlp = model.transformer.h[1].mlp
    mlp.w1 = Linear8bitLt(mlp.w1.in_features, mlp.w1.out_features, bias=False)
    with pytest.raises(UnsupportedOfficialModel, match=r"quantized .*transformer\.h\.1\.mlp\.w1 is a .*Linear8bitLt"):
        patch_official_model(model, "torch")
    _unchanged(model)


def test_refuses_a_quantization_config():
    model = build.build()
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(UnsupportedOfficialModel, match="quantized .*gptq"):
        patch_official_model(model, "torch")
    _unchanged(model)


def test_refuses_integer_weights():
    model = build.build()
    model.transformer.h[0].attn.c_proj.weight = nn.Parameter(torch.zeros(128, 128, dtype=torch.int8),
                                                             requires_grad=False)
    with pytest.raises(UnsupportedOfficialModel, match=r"transformer\.h\.0\.attn\.c_proj\.weight holds torch\.int8"):
        patch_official_model(model, "torch")
    _unchanged(model)


def test_refuses_an_unknown_structure():
    with pytest.raises(UnsupportedOfficialModel, match="not a QWenLMHeadModel"):
        patch_official_model(nn.Linear(2, 2), "torch")

    class QWenAttentionWithBias(QWenAttention):  # a revision whose attention takes another argument
        def forward(self, hidden_states, rotary_pos_emb=None, alibi=None, **kwargs):
            return super().forward(hidden_states, rotary_pos_emb, **kwargs)

    model = build.build()
    model.transformer.h[1].attn.__class__ = QWenAttentionWithBias
    with pytest.raises(UnsupportedOfficialModel, match=r"transformer\.h\.1\.attn .*QWenAttention\.forward takes"):
        patch_official_model(model, "torch")
    _unchanged(model)

    model = build.build()
    del model.transformer.h[0].attn.logn_tensor
    with pytest.raises(UnsupportedOfficialModel, match=r"transformer\.h\.0\.attn .*no attribute logn_tensor"):
        patch_official_model(model, "torch")
    _unchanged(model)

    model = build.build()
    model.transformer.visual.attn_pool = nn.Identity()
    with pytest.raises(UnsupportedOfficialModel, match="no Resampler inside"):
        patch_official_model(model, "torch")
    _unchanged(model)

    model = build.build()
    model.transformer.h[0].mlp.forward = lambda x: x  # someone else's instance patch
    with pytest.raises(UnsupportedOfficialModel, match=r"transformer\.h\.0\.mlp .*replaced on the instance"):
        patch_official_model(model, "torch")


def test_refuses_an_unknown_transformers_version(monkeypatch):
    transformers = pytest.importorskip("transformers")
    model = build.build()
    monkeypatch.setattr(transformers, "__version__", "4.20.1")
    with pytest.raises(UnsupportedOfficialModel, match=r"transformers 4\.20\.1 is not a version it knows"):
        patch_official_model(model, "torch")
    _unchanged(model)
    monkeypatch.setattr(transformers, "__version__", "6.1.0")
    with pytest.raises(UnsupportedOfficialModel, match=r"transformers 6\.1\.0"):
        patch_official_model(model, "torch")
    _unchanged(model)
    assert is_patched(patch_official_model(model, "torch", allow_unknown_transformers=True)) == "torch"


def test_refuses_an_unknown_backend_before_any_change():
    model = build.build()
    with pytest.raises(ValueError, match="unknown kernels backend"):
        patch_official_model(model, "cuda")
    _unchanged(model)


# ------------------------------------------------------------------------ transformers' generate and model.chat

@pytest.fixture(scope="module")
def remote_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    return build.save_remote_folder(build.build(), tmp_path_factory.mktemp("remote"))


@pytest.fixture(scope="module")
def remote_pair(remote_folder):
    """Two instances of the class users get from AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).

    Loaded once per module: transformers 5.25 gives GenerationMixin (and generate) only to the first load of a
    remote class in a process; the second instance is a deep copy of the first.
    """
    transformers = pytest.importorskip("transformers")
    from qwenvl.official import _repair_for_transformers5

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(remote_folder), trust_remote_code=True).eval()
    if int(transformers.__version__.split(".")[0]) >= 5:
        _repair_for_transformers5(reference)  # what transformers 5 needs of the released code (patch does it too)
    patched = patch_official_model(copy.deepcopy(reference), "torch")
    assert is_patched(patched) and not is_patched(reference)
    return reference, patched


def test_generate_through_transformers_gives_the_same_tokens(remote_pair, images):
    reference, patched = remote_pair
    ids, mask = batch(PROMPTS)
    kwargs = dict(attention_mask=mask, max_new_tokens=6)
    with torch.no_grad():
        want = reference.generate(ids, **kwargs)
        got = patched.generate(ids, **kwargs)
    assert got.shape[1] > ids.shape[1] and torch.equal(got, want)


def test_official_chat_gives_the_same_answer(remote_pair, images):
    tok = build.tokenizer()
    answers = []
    for model in remote_pair:
        assert model.generation_config.chat_format == "chatml"  # read from the folder's generation_config.json
        query = tok.from_list_format(PROMPTS[0])
        first, history = model.chat(tok, query, history=None)
        second, history = model.chat(tok, "And the colours?", history=history)
        answers.append((first, second, history))
    assert answers[0] == answers[1]
