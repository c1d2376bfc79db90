"""The tiny model with kernels="triton" against kernels="torch" (on CUDA when present, else on the CPU with the
Triton interpreter): logits, loss, the KV-cache path, and the gradient of every parameter."""
import pytest
import torch

from qwenvl import QwenVL, QwenVLConfig
from tests.helpers import DEVICE, assert_close

pytestmark = pytest.mark.triton


def span(cfg):
    v = cfg.vision
    return torch.tensor([v.image_start_id, *b"x.png"] + [v.image_pad_id] * (v.n_queries - 5) + [v.image_end_id])


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = QwenVLConfig.from_name("tiny").replace(text=dict(seq_length=48), vision=dict(image_size=56))
    ref = QwenVL(cfg, kernels="torch").to(DEVICE)
    tri = QwenVL(cfg, kernels="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def batch(cfg):
    g = torch.Generator().manual_seed(3)
    row = torch.cat([torch.randint(0, 256, (3,), generator=g), span(cfg), torch.randint(0, 256, (9,), generator=g)])
    ids = torch.stack([row, row.clone()])
    ids[1, -9:] = torch.randint(0, 256, (9,), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids.to(DEVICE), labels.to(DEVICE), torch.randn(2, 3, 56, 56, generator=g).to(DEVICE)


def test_logits_and_cached_decoding_match(pair):
    ref, tri = pair
    ref.eval(), tri.eval()
    ids, _, pix = batch(ref.config)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding exercises seq_start in the kernels
    with torch.no_grad():
        a = ref(ids, pixel_values=pix, attention_mask=mask, use_cache=True)
        b = tri(ids, pixel_values=pix, attention_mask=mask, use_cache=True)
        assert_close(b.logits, a.logits, name="prefill logits")
        nxt = a.logits[:, -1].argmax(-1, keepdim=True)
        sa = ref(nxt, past_key_values=a.past_key_values, use_cache=True).logits
        sb = tri(nxt, past_key_values=b.past_key_values, use_cache=True).logits
        assert_close(sb, sa, name="decode-step logits")


def test_loss_and_every_gradient_match(pair):
    ref, tri = pair
    ref.train(), tri.train()
    ids, labels, pix = batch(ref.config)
    la = ref(ids, pixel_values=pix, labels=labels).loss
    lb = tri(ids, pixel_values=pix, labels=labels).loss
    assert_close(lb, la, name="loss")
    ref.zero_grad(), tri.zero_grad()
    la.backward()
    lb.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, name
        assert_close(p.grad, ref_params[name].grad, name=f"grad {name}", rel_rms=5e-5, max_abs=5e-4)
