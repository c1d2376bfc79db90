"""A full training step of the reduced-depth, real-width model: ViT 8 of 48 layers at width 1664 and 448 px, the
adapter, 4 of 32 decoder layers at 4096, the 151936-token LM head; batch 4, one image + 512 text tokens per row.
Forward, loss, backward, AdamW step, gradients dropped. The torch backend against the Triton kernels on the same
model object (model.set_kernels). Targets: tokens/s >= 1.3x torch; peak memory allocated during the step <= 0.75x
(parameters, gradients and optimizer state included: what bounds the batch one can train)."""
import pytest
import torch

import harness as H

IMPLS = ["torch", "triton", "compile"]
BATCH, N_TEXT = (4, 512) if H.ON_CUDA else (1, 8)


def _build():
    from qwenvl.model import QwenVL

    cfg = H.model_config()
    model = H.build_on_device(lambda: QwenVL(cfg, kernels="torch"))
    model.train()
    ids, labels, pixels = H.vl_batch(cfg, BATCH, N_TEXT)
    opt = H.make_optimizer(model.parameters())

    def fwd_bwd():
        loss = model(ids, pixel_values=pixels, labels=labels).loss
        loss.backward()

    # FLOPs through the torch path (our kernels are opaque to the counter); this also creates the optimizer state,
    # so every measured step, whichever backend, starts from the same memory
    flops = H.count_flops(fwd_bwd)
    try:
        opt.step()
    except (RuntimeError, TypeError) as e:  # a fused AdamW that refuses these parameters: the portable one
        if not H.ON_CUDA:
            raise
        print(f"fused AdamW refused ({e}); using foreach")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return dict(cfg=cfg, model=model, opt=opt, ids=ids, labels=labels, pixels=pixels, flops=flops)


MODEL = H.Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    MODEL.release()


@pytest.mark.model
@pytest.mark.parametrize("case, impl", H.params(["train_step"], IMPLS))
def test_train_step(bm, suite, case, impl):
    facts = {}

    def setup():
        if impl == "compile":
            H.compile_available("model")
        m = MODEL()
        model, opt = m["model"], m["opt"]
        forward = model
        if impl == "compile":
            model.set_kernels("torch")
            forward = torch.compile(model)
        else:
            model.set_kernels(impl)
        facts.update(flops=m["flops"], params=sum(p.numel() for p in model.parameters()),
                     tokens_per_step=m["ids"].numel())

        def step():
            loss = forward(m["ids"], pixel_values=m["pixels"], labels=m["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    T = H.model_config().vision.n_queries + 2 + N_TEXT
    cost = {"compile": 240, "triton": 60}.get(impl, 30) if H.ON_CUDA else 3
    suite.run(bm, case=case, impl=impl, setup=setup, mode="module", tokens=BATCH * T, cost_s=cost,
              shape={"batch": BATCH, "seq": T, "vit_layers": 8 if H.ON_CUDA else 2,
                     "decoder_layers": 4 if H.ON_CUDA else 2},
              title=f"training step, B{BATCH} x (1 image + {N_TEXT} text tokens)", extra=facts)
    H.add_rate(suite, case, impl, facts.get("flops"))
