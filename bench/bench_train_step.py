"""A full training step of the reduced-depth, real-width model: ViT 8 of 48 layers at width 1664 and 448 px, the
adapter, 4 of 32 decoder layers at 4096, the 151936-token LM head; batch 4, one image + 510 text tokens per row
(768 tokens: a multiple of 16, as the kernel cases' lengths, so the step reuses their compiled kernels).
Forward, loss, backward, AdamW step, gradients dropped. The torch backend against the Triton kernels on the same
model object (model.set_kernels). Targets: tokens/s >= 1.3x torch; peak memory allocated during the step <= 0.75x
(parameters, gradients and optimizer state included: what bounds the batch one can train)."""
import pytest
import torch

from benchlib.cases import params
from benchlib.compiles import warming
from benchlib.env import ON_CUDA, compile_available
from benchlib.models import Lazy, build_on_device, make_optimizer, model_config, set_kernels, vl_batch
from benchlib.timing import count_flops

IMPLS = ["torch", "triton", "compile"]
# the torch row builds the model (a few seconds at 2.5 B parameters) and counts its FLOPs
COSTS = {"torch": 18, "triton": 12, "compile": 240}
BATCH, N_TEXT = (4, 510) if ON_CUDA else (1, 8)


def _build():
    from qwenvl.model import QwenVL

    cfg = model_config()
    model = build_on_device(lambda: QwenVL(cfg, kernels="torch"))
    model.train()
    ids, labels, pixels = vl_batch(cfg, BATCH, N_TEXT)
    opt = make_optimizer(model.parameters())

    def fwd_bwd():
        loss = model(ids, pixel_values=pixels, labels=labels).loss
        loss.backward()

    # FLOPs through the torch path (our kernels are opaque to the counter); this also creates the optimizer state,
    # so every measured step, whichever backend, starts from the same memory
    flops = count_flops(fwd_bwd)
    if not warming():
        try:
            opt.step()
        except (RuntimeError, TypeError) as e:  # a fused AdamW that refuses these parameters: the portable one
            if not ON_CUDA:
                raise
            print(f"fused AdamW refused ({e}); using foreach")
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=True)
            opt.step()
    opt.zero_grad(set_to_none=True)
    return dict(cfg=cfg, model=model, opt=opt, ids=ids, labels=labels, pixels=pixels, flops=flops)


MODEL = Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    MODEL.release()


@pytest.mark.model
@pytest.mark.parametrize("case, impl", params(["train_step"], IMPLS, COSTS))
def test_train_step(bm, suite, case, impl):
    facts = {}

    def setup():
        if impl == "compile":
            compile_available("model")
        m = MODEL()
        model, opt = m["model"], m["opt"]
        forward = model
        if impl == "compile":
            set_kernels(model, "torch")
            forward = torch.compile(model)
        else:
            set_kernels(model, impl)
        facts.update(flops=m["flops"], params=sum(p.numel() for p in model.parameters()),
                     tokens_per_step=m["ids"].numel())

        def step():
            loss = forward(m["ids"], pixel_values=m["pixels"], labels=m["labels"]).loss
            loss.backward()
            if not warming():  # a step on garbage gradients would leave NaN weights for the next case
                opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    T = model_config().vision.n_queries + 2 + N_TEXT
    suite.run(bm, case=case, impl=impl, setup=setup, mode="module", tokens=BATCH * T,
              shape={"batch": BATCH, "seq": T, "vit_layers": 8 if ON_CUDA else 2,
                     "decoder_layers": 4 if ON_CUDA else 2},
              title=f"training step, B{BATCH} x (1 image + {N_TEXT} text tokens)", extra=facts)
    suite.add_rate(case, impl, facts.get("flops"))
