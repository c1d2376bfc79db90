import pytest
import torch
from PIL import Image

from qwenvl import QwenVL, QwenVLConfig
from qwenvl.cli import main as cli_main
from qwenvl.generation import chat, chat_stream, generate, sample_next
from qwenvl.tokenizer import QwenVLTokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return QwenVL(QwenVLConfig.from_name("tiny"), kernels="torch").eval()


@pytest.fixture(scope="module")
def tok(model):
    v = model.config.vision
    return QwenVLTokenizer.byte_level(v.image_start_id, v.n_queries)


def test_greedy_is_argmax_of_full_forward(model):
    ids = torch.randint(0, 256, (1, 6))
    out = generate(model, ids, max_new_tokens=5)
    seq = ids
    for _ in range(5):
        with torch.no_grad():
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, True, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, True, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 alone is below 0.7, 0.5 + 0.3 reaches it
    draws = {int(sample_next(logits, True, top_p=0.3, generator=g)) for _ in range(100)}
    assert draws == {0}
    assert int(sample_next(logits, False)) == 0
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, True, temperature=0)


def test_sampling_is_reproducible_with_a_generator(model):
    ids = torch.randint(0, 256, (2, 5))
    a = generate(model, ids, max_new_tokens=8, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = generate(model, ids, max_new_tokens=8, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_repetition_penalty_discourages_seen_tokens(model):
    ids = torch.randint(0, 256, (1, 4))
    plain = generate(model, ids, max_new_tokens=12)
    penalized = generate(model, ids, max_new_tokens=12, repetition_penalty=50.0)
    new = penalized[0, 4:].tolist()
    assert len(set(new)) == len(new), "a heavily penalized token came back"
    assert not torch.equal(plain, penalized) or len(set(plain[0, 4:].tolist())) == 12


def test_stop_tokens_pad_finished_rows_and_streamer(model):
    ids = torch.randint(0, 256, (2, 5))
    free = generate(model, ids, max_new_tokens=6)
    stop = int(free[0, 7])  # the third token row 0 produces
    seen = []
    out = generate(model, ids, max_new_tokens=6, eos_token_id=[stop], pad_token_id=stop, streamer=seen.append)
    assert len(seen) == out.shape[1] - 5
    row0 = out[0, 5:].tolist()
    first = row0.index(stop)
    assert all(t == stop for t in row0[first:])


def test_vocab_padding_ids_are_never_produced(model, tok):
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] += 100.0  # make the padding rows win every argmax
    try:
        out = generate(model, ids, max_new_tokens=4, vocab_size=tok.vocab_size)
        assert (out[0, 5:] < tok.vocab_size).all()
    finally:
        with torch.no_grad():
            model.lm_head.weight[tok.vocab_size:] -= 100.0


def test_chat_and_stream_agree(model, tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short relative path: the tiny model's image span holds 64 bytes
    Image.new("RGB", (40, 30), (255, 0, 0)).save("red.png")
    query = tok.from_list_format([{"image": "red.png"}, {"text": "what colour?"}])
    response, history = chat(model, tok, query, max_new_tokens=6, do_sample=False)
    streamed = list(chat_stream(model, tok, query, max_new_tokens=6, do_sample=False))
    assert streamed and streamed[-1] == response
    assert all(streamed[i + 1].startswith(streamed[i][: len(streamed[i]) - 1]) for i in range(len(streamed) - 1))
    assert history == [(query, response)]
    response2, history2 = chat(model, tok, "and now?", history=history, max_new_tokens=3, do_sample=False)
    assert len(history2) == 2


def test_cli_init_then_generate_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = "img.png"
    Image.new("RGB", (64, 64), (0, 128, 255)).save(img)
    ckpt = tmp_path / "tiny"
    assert cli_main(["init", "--model", "tiny", "--out", str(ckpt)]) == 0
    rc = cli_main(["generate", "--checkpoint", str(ckpt), "--image", img, "--prompt", "Describe:",
                   "--max-new-tokens", "4", "--kernels", "torch", "--device", "cpu", "--draw", str(tmp_path / "g.png")])
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")  # the answer was printed (a random model's text is arbitrary)
