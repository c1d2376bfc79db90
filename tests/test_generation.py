import os

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


def test_streaming_never_prints_a_broken_character(model, tok, monkeypatch):
    """A multi-byte character split across byte-level tokens is held back until complete, never shown as U+FFFD."""
    import qwenvl.conversation as conversation
    import qwenvl.generation as generation

    text = "naïve 中文 ok"
    ids = list(text.encode("utf-8")) + [tok.im_end_id]

    def fake_steps(*args, **kwargs):
        return iter(torch.tensor([t]) for t in ids)

    monkeypatch.setattr(conversation, "generate_steps", fake_steps)
    streamed = list(chat_stream(model, tok, "hi", max_new_tokens=len(ids)))
    assert streamed[-1] == text
    assert all("\ufffd" not in s for s in streamed)
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))
    # invalid bytes become U+FFFD once they cannot be completed, and a cut-off character at the end is flushed
    stream = generation.TextStream(tok)
    assert stream.push([0xE4, 0xB8]) == ""
    assert stream.push([0xAD]) == "中"
    assert stream.push([0xFF, ord("a")]) == "\ufffda"
    assert stream.push([0xE4]) == "" and stream.close() == "\ufffd"


def _init(tmp_path):
    ckpt = tmp_path / "tiny"
    assert cli_main(["init", "--model", "tiny", "--out", str(ckpt)]) == 0
    return ckpt


def test_cli_chat_survives_bad_lines_and_keeps_history(tmp_path, capsys, monkeypatch):
    import io
    import sys

    monkeypatch.chdir(tmp_path)
    ckpt = _init(tmp_path)
    Image.new("RGB", (30, 30), (255, 0, 0)).save("r.png")
    lines = b"hello\n\xff\xfe broken\n:image nope.png\n:image r.png\nwhat is it?\n:quit\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines)))
    seen = []
    import qwenvl.generation as generation

    real = generation.chat_stream

    def spy(model, tok, query, history=None, **kw):
        seen.append((query, list(history)))
        yield from real(model, tok, query, history=history, **kw)

    monkeypatch.setattr(generation, "chat_stream", spy)
    rc = cli_main(["chat", "--checkpoint", str(ckpt), "--kernels", "torch", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "not UTF-8" in err and "image file not found: nope.png" in err
    assert len(seen) == 2 and seen[1][0].startswith("Picture 1: <img>r.png</img>\n")
    assert len(seen[1][1]) == 1 and seen[1][1][0][0] == "hello"  # the session kept its history


def test_cli_init_force_replaces_the_model_and_files_get_the_umask(tmp_path, capsys):
    ckpt = _init(tmp_path)
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (ckpt / "notes.txt").write_text("mine")
    assert cli_main(["init", "--model", "tiny", "--out", str(ckpt)]) == 2
    assert cli_main(["init", "--model", "tiny", "--out", str(ckpt), "--force", "--seed", "1"]) == 0
    names = set(os.listdir(ckpt))
    assert "model-00001-of-00002.safetensors" not in names and "notes.txt" in names
    QwenVL.from_pretrained(str(ckpt), kernels="torch")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json"):
        assert os.stat(ckpt / name).st_mode & 0o777 == 0o666 & ~mask, name


def test_cli_generate_does_not_draw_into_the_current_folder(tmp_path, capsys, monkeypatch):
    import qwenvl.cli as cli

    monkeypatch.chdir(tmp_path)
    ckpt = _init(tmp_path)
    Image.new("RGB", (30, 30), (0, 0, 255)).save("b.png")
    monkeypatch.setattr(cli, "_load_model", lambda args: _Canned())
    monkeypatch.setattr("qwenvl.generation.generate", _canned_generate)
    assert cli_main(["generate", "--checkpoint", str(ckpt), "--image", "b.png", "--prompt", "where?",
                     "--kernels", "torch", "--format", "raw"]) == 0
    assert "pass --draw" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["b.png", "tiny"]
    assert cli_main(["generate", "--checkpoint", str(ckpt), "--image", "b.png", "--prompt", "where?",
                     "--kernels", "torch", "--format", "raw", "--draw", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").is_file()


class _Canned(torch.nn.Module):
    """A stand-in model whose raw-format answer is a box: `generate` is what the command calls."""

    def __init__(self):
        super().__init__()
        self.config = QwenVLConfig.from_name("tiny")
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32


def _canned_generate(model, ids, **kwargs):
    answer = list(b"<box>(0,0),(500,500)</box>")
    return torch.cat([ids, torch.tensor([answer])], 1)
