"""The model's own contracts on the tiny config (torch backend): cache, padding, image spans, errors."""
import pytest
import torch

from qwenvl import QwenVL, QwenVLConfig
from tests.helpers import assert_close


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return QwenVL(QwenVLConfig.from_name("tiny").replace(text=dict(seq_length=24)), kernels="torch").eval()


def span(cfg, path=b"a.png"):
    v = cfg.vision
    return torch.tensor([v.image_start_id, *path] + [v.image_pad_id] * (v.n_queries - len(path)) + [v.image_end_id])


@pytest.mark.parametrize("prefill", [5, 30])  # inside and past seq_length (24)
def test_kv_cache_decoding_equals_full_forward(model, prefill):
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(ids[:, :prefill]).logits
        out = model(ids[:, :prefill], use_cache=True)
        assert_close(out.logits, full)
        cache = out.past_key_values
        if prefill <= 24:  # the NTK factor is fixed at prefill: compare against full forwards with the same factor
            for t in range(prefill, 24):
                step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
                assert_close(step, model(ids[:, :t + 1]).logits[:, -1], name=f"step {t}")
        else:
            for t in range(prefill, 40):
                step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            # several tokens at once through the cache equal one token at a time
            cache2 = model(ids[:, :prefill], use_cache=True).past_key_values
            chunk = model(ids[:, prefill:40], past_key_values=cache2, use_cache=True).logits[:, -1]
            assert_close(chunk, step)


def test_cache_with_images_and_growth(model):
    cfg = model.config
    ids = torch.cat([torch.randint(0, 256, (1, 3)), span(cfg)[None], torch.randint(0, 256, (1, 4))], 1)
    pix = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        full = model(torch.cat([ids, torch.tensor([[7, 8, 9]])], 1), pixel_values=pix).logits
        out = model(ids, pixel_values=pix, use_cache=True)  # capacity exactly the prompt: must grow
        cache = out.past_key_values
        for i, tok in enumerate([7, 8, 9]):
            step = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[:, -1]
            assert_close(step, full[:, ids.shape[1] + i])


def test_left_padded_batch_generates_as_each_prompt_alone(model):
    prompts = [torch.randint(0, 256, (n,)) for n in (4, 11, 7)]
    T = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(T - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=20)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=20)
        assert torch.equal(batch[i, T:], alone[0, len(p):]), f"row {i}"


def test_images_go_into_their_spans_in_order(model):
    cfg = model.config
    a, b, c = torch.randn(3, 3, 112, 112)
    row0 = torch.cat([torch.tensor([1, 2]), span(cfg), torch.tensor([3]), span(cfg), torch.tensor([4])])
    row1 = torch.cat([torch.tensor([5, 6, 7]), span(cfg), torch.tensor([8, 9])])
    ids = torch.stack([row0, torch.cat([row1, torch.zeros(len(row0) - len(row1), dtype=torch.long)])])
    mask = (torch.arange(len(row0))[None] < torch.tensor([[len(row0)], [len(row1)]])).long()  # right padding
    with torch.no_grad():
        both = model(ids, pixel_values=torch.stack([a, b, c]), attention_mask=mask).logits
        first = model(row0[None], pixel_values=torch.stack([a, b])).logits
        second = model(row1[None], pixel_values=c[None]).logits
        feats = model.encode_images(torch.stack([a, b, c]))
        via_features = model(ids, image_features=feats, attention_mask=mask).logits
    assert_close(both[0], first[0])
    assert_close(both[1, : len(row1)], second[0])
    assert_close(via_features, both)
    swapped = model(row0[None], pixel_values=torch.stack([b, a])).logits
    assert (swapped - first).abs().max() > 1e-4  # order matters


def test_loss_ignores_minus_100_and_matches_cross_entropy(model):
    ids = torch.randint(0, 256, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                            labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(out.loss, ref)


def test_bad_input_raises_clear_errors(model):
    cfg = model.config
    good = torch.cat([span(cfg), torch.tensor([1, 2])])[None]
    with pytest.raises(ValueError, match="no pixel_values"):
        model(good)
    short = torch.cat([span(cfg)[:-3], torch.tensor([cfg.vision.image_end_id])])[None]
    with pytest.raises(ValueError, match="malformed image span"):
        model(short, pixel_values=torch.randn(1, 3, 112, 112))
    with pytest.raises(TypeError, match="floating point"):
        model(good, pixel_values=torch.zeros(1, 3, 112, 112, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"2 image\(s\) given for 1"):
        model(good, pixel_values=torch.randn(2, 3, 112, 112))
    with pytest.raises(ValueError, match="no <img> span"):
        model(torch.tensor([[1, 2, 3]]), pixel_values=torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match="square"):
        model(good, pixel_values=torch.randn(1, 3, 112, 100))
    with pytest.raises(ValueError, match="padding only"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="left padding"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 0]]), use_cache=True)
    with pytest.raises(ValueError, match="exceeds the longest context"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=40_000)
    with pytest.raises(ValueError, match="integer"):
        model(torch.tensor([[1.0, 2.0]]))


def test_training_mode_returns_loss_without_logits_and_grads_flow(model):
    model.train()
    try:
        ids = torch.cat([span(model.config), torch.randint(0, 256, (6,))])[None]
        out = model(ids, pixel_values=torch.randn(1, 3, 112, 112), labels=ids)
        assert out.logits is None
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]
        assert not missing, missing
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_packed_sequences_equal_separate_ones(model):
    model.train()
    try:
        a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 10))
        packed = torch.cat([a, b], 1)
        cu = torch.tensor([0, 7, 17], dtype=torch.int32)
        loss_packed = model(packed, labels=packed, cu_seqlens=cu).loss
        la = model(a, labels=a).loss
        lb = model(b, labels=b).loss
        assert_close(loss_packed, (la * 6 + lb * 9) / 15)
    finally:
        model.eval()
