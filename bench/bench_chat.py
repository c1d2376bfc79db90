"""Chat turn latency: turn 3 of a two-picture conversation (`model.chat`, greedy, up to 32 new tokens) on the
reduced-depth real-width model (ViT 8/48, decoder 4/32, 448 px pictures, 256-query image spans).
"reuse": the model's chat cache holds turns 1 and 2 (their keys and values, both pictures' features), so the turn
prefills only its new tokens; "reprefill": the chat cache is cleared first, so both pictures go through the vision
tower and the whole prompt is prefilled, as a turn that keeps nothing would. Both rows run our kernels: the
comparison is what is reused. GPU only: a CPU run records the case as skipped."""
import numpy as np
import pytest
from PIL import Image

from benchlib.cases import cuda_only, params
from benchlib.env import OURS
from benchlib.models import Lazy, build_on_device, model_config, set_kernels

CASE = "chat_turn3"
IMPLS = ["reprefill", "reuse"]
COSTS = {"reprefill": 15, "reuse": 10}
GREEDY = dict(max_new_tokens=32, do_sample=False)
QUERIES = [("a.png", "Describe this picture in detail."), ("b.png", "How does it differ from the first one?"),
           (None, "Which of the two would suit a poster better, and why?")]


def _build():
    from qwenvl.model import QwenVL
    from qwenvl.tokenizer import QwenVLTokenizer

    # the byte-level tokenizer (no vocabulary file needed) puts <img> right after its 256 bytes and specials
    cfg = model_config().replace(vision=dict(image_start_id=300))
    model = build_on_device(lambda: QwenVL(cfg, kernels="torch"))
    model.eval()
    model.requires_grad_(False)
    return cfg, model, QwenVLTokenizer.byte_level(300, cfg.vision.n_queries)


MODEL = Lazy(_build)


@pytest.fixture(scope="module", autouse=True)
def _release():
    yield
    MODEL.release()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.mark.model
@pytest.mark.parametrize("case, impl", params([CASE], IMPLS, COSTS))
def test_chat_turn(bm, suite, pictures, case, impl):
    facts = {}

    def setup():
        cuda_only(f"the chat turn ({impl})")
        from qwenvl.conversation import chat_cache

        cfg, model, tok = MODEL()
        set_kernels(model, OURS)
        queries = [tok.from_list_format(([{"image": p}] if p else []) + [{"text": t}]) for p, t in QUERIES]
        model.clear_chat_cache()
        history = None
        for q in queries[:2]:
            _, history = model.chat(tok, q, history, image_root=pictures, **GREEDY)
        state = chat_cache(model)
        after_two = (list(state.ids), dict(state.images), state.kv.length)

        def step():
            if impl == "reprefill":
                model.clear_chat_cache()
            else:
                # back to the cache as turn 2 left it: a turn rewrites keys and values only from the common prefix
                # of its prompt and the cached ids on, and that prefix is the same at every repetition
                state.ids, state.images, state.kv.length = list(after_two[0]), dict(after_two[1]), after_two[2]
                model._chat_cache = state
            model.chat(tok, queries[2], history, image_root=pictures, **GREEDY)

        step()
        facts.update(model._chat_cache.last_turn)
        return step

    suite.run(bm, case=case, impl=impl, setup=setup, mode="module", shape={"pictures": 2, "new_tokens": 32},
              title="chat turn 3 (2 pictures in the history), reused cache vs everything again", extra=facts)
