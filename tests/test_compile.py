"""torch.compile: the whole model (backend aot_eager) with no graph break on the text and the image path, compiled
outputs and gradients equal to eager ones with kernels="torch" and kernels="triton", value checks that became
assertions in the graph, and `generate(compile=...)`: the compiled one-token decode step over a static KV cache
gives eager decoding's tokens and compiles once per (batch, capacity bucket)."""
import pytest
import torch

from qwenvl import QwenVL, QwenVLConfig
from qwenvl.cache import KVCache
from qwenvl.cli import main as cli_main
from qwenvl.compiled import capacity_bucket, static_decoder
from qwenvl.generation import generate, generate_steps
from tests.helpers import DEVICE, assert_close

# trained length 48: prompts past it exercise dynamic NTK (a factor per row) and log-n scaling
CFG = QwenVLConfig.from_name("tiny").replace(text=dict(seq_length=48), vision=dict(image_size=28, n_queries=4))
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def tiny(kernels="torch", cfg=CFG):
    torch.manual_seed(0)
    return QwenVL(cfg, kernels=kernels).to(DEVICE).eval()


def text_batch(T=10, pad=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :pad] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def image_batch():
    """Two rows, each an image span then text; labels on the text only."""
    v = CFG.vision
    span = torch.tensor([v.image_start_id] + [v.image_pad_id] * v.n_queries + [v.image_end_id])
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([span[None].expand(2, -1), torch.randint(0, 256, (2, 8), generator=g)], 1)
    labels = ids.clone()
    labels[:, : span.numel()] = -100
    return ids.to(DEVICE), labels.to(DEVICE), torch.randn(2, 3, 28, 28, generator=g).to(DEVICE)


def cache_for(B, capacity=16):
    t = CFG.text
    return KVCache(t.num_hidden_layers, B, capacity, t.num_attention_heads, t.kv_channels, torch.float32, DEVICE)


# --------------------------------------------------------------------------------------------- graph breaks
def _break_cases():
    ids, mask = text_batch()
    img, img_labels, pix = image_batch()
    return {  # name: (training, kwargs, breaks allowed)
        "text": (False, dict(input_ids=ids), 0),
        "text+labels": (True, dict(input_ids=ids, labels=ids), 0),
        "text+prefill": (False, dict(input_ids=ids, past_key_values=cache_for(2), use_cache=True,
                                     num_logits_to_keep=1), 0),
        "text+padding+prefill": (False, dict(input_ids=ids, attention_mask=mask, past_key_values=cache_for(2),
                                             use_cache=True, num_logits_to_keep=1), 0),
        "image": (False, dict(input_ids=img, pixel_values=pix), 1),
        "image+labels": (True, dict(input_ids=img, pixel_values=pix, labels=img_labels), 1),
    }


@pytest.mark.parametrize("case", list(_break_cases()))
def test_graph_breaks(case):
    """The value checks, the padding layout and the image splice trace into one graph (0 breaks everywhere today;
    the image path is allowed one)."""
    training, kwargs, allowed = _break_cases()[case]
    model = tiny().train(training)
    torch._dynamo.reset()
    with torch.set_grad_enabled(training):
        explained = torch._dynamo.explain(model)(**kwargs)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count <= allowed, reasons
    assert explained.graph_count == explained.graph_break_count + 1


# --------------------------------------------------------------------------------------- compiled model = eager
@pytest.mark.parametrize("kernels", BACKENDS)
def test_fullgraph_model_matches_eager(kernels):
    """fullgraph=True: logits of the image path, the prefill into a KV cache (logits and cached keys/values), and
    the training loss with every parameter's gradient."""
    model = tiny(kernels)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids, labels, pix = image_batch()
    text, mask = text_batch()
    with torch.no_grad():
        assert_close(compiled(ids, pixel_values=pix).logits, model(ids, pixel_values=pix).logits, name="logits",
                     rel_rms=1e-6, max_abs=1e-6)
        eager_cache, compiled_cache = cache_for(2), cache_for(2)
        eager = model(text, attention_mask=mask, past_key_values=eager_cache, use_cache=True).logits
        got = compiled(text, attention_mask=mask, past_key_values=compiled_cache, use_cache=True).logits
        assert_close(got, eager, name="prefill logits", rel_rms=1e-6, max_abs=1e-6)
        assert compiled_cache.length == eager_cache.length == text.shape[1]
        assert torch.equal(compiled_cache.seq_start, eager_cache.seq_start)
        for a, b in zip(eager_cache.k + eager_cache.v, compiled_cache.k + compiled_cache.v):
            assert_close(b[:, :10], a[:, :10], name="cached keys/values", rel_rms=1e-6, max_abs=1e-6)

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    eager_loss = model(ids, pixel_values=pix, labels=labels).loss
    eager_grads = torch.autograd.grad(eager_loss, params)
    compiled_loss = compiled(ids, pixel_values=pix, labels=labels).loss
    compiled_grads = torch.autograd.grad(compiled_loss, params)
    assert_close(compiled_loss, eager_loss, name="loss", rel_rms=1e-6, max_abs=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), eager_grads, compiled_grads):
        assert_close(b, a, name=f"grad {name}", rel_rms=1e-5, max_abs=1e-5)


def test_value_checks_are_assertions_in_the_graph():
    """What eager mode refuses with a ValueError before any heavy step, the compiled graph refuses when it runs."""
    model = tiny()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids, labels, pix = image_batch()
    bad = ids.clone()
    bad[0, -1] = CFG.text.vocab_size
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model(bad, pixel_values=pix)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        compiled(bad, pixel_values=pix)
    with pytest.raises(RuntimeError, match="one <img> ... </img> span per image"):
        compiled(ids, pixel_values=pix[:1])  # two spans, one image
    broken = ids.clone()
    broken[1, CFG.vision.n_queries + 1] = 7  # the second row's </img> overwritten
    with pytest.raises(RuntimeError, match="one <img> ... </img> span per image"):
        compiled(broken, pixel_values=pix)
    text, mask = text_batch()
    right_padded = mask.flip(1)
    with pytest.raises(RuntimeError, match="needs left padding"):
        compiled(text, attention_mask=right_padded, past_key_values=cache_for(2), use_cache=True)
    labels = text.clone()
    labels[0, 3] = CFG.text.vocab_size
    with pytest.raises(RuntimeError, match="token ids 0..511 or -100"):
        compiled(text, labels=labels)


# ----------------------------------------------------------------------------------------- generate(compile=)
def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("kernels", BACKENDS)
def test_compiled_generate_matches_eager_and_compiles_once(kernels):
    """Greedy tokens of a left-padded batch equal eager decoding's; the decode step compiles once for the whole
    generation and not again for another prompt of the same capacity bucket (same buffers, same graph)."""
    model = tiny(kernels)
    torch._dynamo.reset()
    ids, mask = text_batch(T=10, pad=3)
    eager = generate(model, ids, attention_mask=mask, max_new_tokens=6)
    before = _graphs()
    got = generate(model, ids, attention_mask=mask, max_new_tokens=6, compile="aot_eager")
    assert torch.equal(got, eager)
    decoder = static_decoder(model, 2, 16, "aot_eager")
    assert decoder.capacity == 64 and decoder.compiles == 1 and _graphs() - before == 1

    ids2, mask2 = text_batch(T=7, pad=1)
    again = generate(model, ids2, attention_mask=mask2, max_new_tokens=9, compile="aot_eager")
    assert torch.equal(again, generate(model, ids2, attention_mask=mask2, max_new_tokens=9))
    assert decoder.compiles == 1 and _graphs() - before == 1


def test_compiled_generate_past_the_trained_length():
    """Rows whose real lengths give different dynamic-NTK factors (one table block per row) and log-n scaling
    past the trained length: the same tokens, sampled with repetition penalty and stop ids too."""
    model = tiny()
    torch._dynamo.reset()
    ids, mask = text_batch(T=60, pad=25)  # 60 and 35 real tokens around seq_length 48
    options = dict(attention_mask=mask, max_new_tokens=8, repetition_penalty=1.3)
    assert torch.equal(generate(model, ids, compile="aot_eager", **options), generate(model, ids, **options))
    sampled = dict(options, do_sample=True, top_p=0.9, eos_token_id=[5, 6])
    eager = generate(model, ids, generator=torch.Generator(DEVICE).manual_seed(3), **sampled)
    got = generate(model, ids, generator=torch.Generator(DEVICE).manual_seed(3), compile="aot_eager", **sampled)
    assert torch.equal(got, eager)


def test_compiled_generate_continues_a_callers_cache():
    """A KV cache holding the start of the prompt (a chat's earlier turns) is continued, and ends holding what eager
    decoding leaves in it, also when the caller stops early."""
    model = tiny()
    torch._dynamo.reset()
    ids = text_batch(T=12)[0][:1]
    caches = []
    for compile in (False, "aot_eager"):
        cache = KVCache(CFG.text.num_hidden_layers, 1, 20, CFG.text.num_attention_heads, CFG.text.kv_channels,
                        torch.float32, DEVICE)
        with torch.no_grad():
            model(ids[:, :5], past_key_values=cache, use_cache=True)
        steps = generate_steps(model, ids, max_new_tokens=6, past_key_values=cache, compile=compile)
        tokens = [next(steps) for _ in range(4)]
        steps.close()
        caches.append((torch.stack(tokens), cache))
    (eager_tokens, eager_cache), (tokens, cache) = caches
    assert torch.equal(tokens, eager_tokens)
    assert cache.length == eager_cache.length == 12 + 3
    for a, b in zip(eager_cache.k + eager_cache.v, cache.k + cache.v):
        assert_close(b[:, :15], a[:, :15], name="cache", rel_rms=1e-5, max_abs=1e-5)


def test_compiled_chat_turns_match_eager():
    """Chat turns with compile: the same answers as eager ones, and the second turn still reuses the first's keys and
    values (the chat cache goes through the compiled generation and comes back holding prompt + answer)."""
    from qwenvl.conversation import chat_cache
    from qwenvl.generation import chat
    from qwenvl.tokenizer import QwenVLTokenizer

    torch._dynamo.reset()
    tok = QwenVLTokenizer.byte_level(CFG.vision.image_start_id, CFG.vision.n_queries)
    answers = []
    for compile in (False, "aot_eager"):
        # the trained length of the preset (512): both turns' prompts keep NTK factor 1, so the second reuses
        model, history, turns = tiny(cfg=CFG.replace(text=dict(seq_length=512))), None, []
        for query in ("hello", "and then?"):
            response, history = chat(model, tok, query, history=history, max_new_tokens=5, do_sample=False,
                                     compile=compile)
            turns.append((response, chat_cache(model).last_turn["reused_tokens"]))
        answers.append(turns)
    assert answers[1] == answers[0] and answers[0][1][1] > 0


def test_compile_option_refused_before_any_work(monkeypatch):
    model = tiny()
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    ids = text_batch()[0]
    with pytest.raises(ValueError, match="compile must be True, False or a torch.compile backend"):
        generate_steps(model, ids, compile="fastest")
    with pytest.raises(ValueError, match="compile must be"):
        generate_steps(model, ids, compile=1)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="needs the model on a CUDA device"):
            generate_steps(model, ids, compile="cudagraphs")


def test_capacity_buckets():
    assert [capacity_bucket(n) for n in (1, 64, 65, 1000, 1024, 1025, 5000, 32767)] == [
        64, 64, 128, 1024, 1024, 2048, 5120, 32767]


def test_cli_generate_compile(tmp_path, capsys):
    ckpt = tmp_path / "tiny"
    assert cli_main(["init", "--model", "tiny", "--out", str(ckpt)]) == 0
    capsys.readouterr()
    args = ["generate", "--checkpoint", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "3", "--kernels", "torch",
            "--device", "cpu", "--no-sample"]
    assert cli_main(args) == 0
    eager = capsys.readouterr().out
    torch._dynamo.reset()
    before = _graphs()
    assert cli_main(args + ["--compile", "aot_eager"]) == 0
    assert capsys.readouterr().out == eager and _graphs() == before + 1  # the decode step, compiled once
    assert cli_main(args + ["--compile", "fastest"]) == 2
    assert "compile must be" in capsys.readouterr().err
