"""A mini training run with kernels="triton" and kernels="torch" (on CUDA when present, else on the CPU with the
Triton interpreter): 30 AdamW steps of the tiny model (both towers, the adapter, the fused loss) from the same
initialization on the same batches. Per-step losses must agree within 1e-4 relative (fp32 round-off compounds
through 30 updates) and the final parameters within 1e-3."""
import pytest
import torch

from qwenvl import QwenVL, QwenVLConfig
from tests.helpers import DEVICE

pytestmark = pytest.mark.triton

STEPS = 30


def run(kernels, cfg, init, batches):
    model = QwenVL(cfg, kernels=kernels).to(DEVICE)
    model.load_state_dict(init)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.98),
                            eps=1e-6, weight_decay=0.05)
    losses = []
    for ids, labels, pix in batches:
        loss = model(ids, pixel_values=pix, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model.state_dict()


def test_thirty_steps_triton_vs_torch():
    cfg = QwenVLConfig.from_name("tiny").replace(vision=dict(image_size=28, n_queries=4), text=dict(seq_length=64))
    torch.manual_seed(0)
    init = QwenVL(cfg, kernels="torch").state_dict()
    v = cfg.vision
    g = torch.Generator().manual_seed(1)
    span = torch.tensor([v.image_start_id] + [v.image_pad_id] * v.n_queries + [v.image_end_id])
    text = torch.randint(0, 256, (2, 10), generator=g)  # a fixed caption per image: learnable, so the loss falls
    pix = torch.randn(2, 3, 28, 28, generator=g)
    ids = torch.cat([span[None].expand(2, -1), text], 1)
    labels = ids.clone()
    labels[:, : span.numel()] = -100
    batches = [(ids.to(DEVICE), labels.to(DEVICE), pix.to(DEVICE))] * STEPS
    ref_losses, ref_state = run("torch", cfg, init, batches)
    tri_losses, tri_state = run("triton", cfg, init, batches)
    assert ref_losses[-1] < 0.5 * ref_losses[0], "the mini model did not learn: the comparison would be vacuous"
    for step, (a, b) in enumerate(zip(ref_losses, tri_losses)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: torch {a:.6f} vs triton {b:.6f}"
    for name, p in ref_state.items():
        err = (tri_state[name] - p).norm() / p.norm().clamp_min(1e-12)
        assert err <= 1e-3, f"{name}: final parameters differ by {err:.2e}"
