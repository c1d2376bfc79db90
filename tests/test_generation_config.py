"""`qwenvl generate` decodes with the checkpoint's generation_config.json unless a flag says otherwise."""
import json

import pytest

import qwenvl.generation as generation
from qwenvl.cli import main as cli_main
from qwenvl.generation_config import GenerationDefaults, read_generation_defaults


@pytest.fixture
def ckpt(tmp_path):
    folder = tmp_path / "tiny"
    assert cli_main(["init", "--model", "tiny", "--out", str(folder)]) == 0
    return folder


def _write(folder, **values):
    (folder / "generation_config.json").write_text(json.dumps(values))


def _captured_options(monkeypatch):
    seen = {}
    real = generation.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    return seen


def _generate(ckpt, *flags):
    return cli_main(["generate", "--checkpoint", str(ckpt), "--prompt", "Hello", "--kernels", "torch",
                     "--device", "cpu", *flags])


def test_the_folders_sampling_defaults_are_used(ckpt, monkeypatch, capsys):
    _write(ckpt, chat_format="raw", do_sample=True, top_p=0.3, top_k=0, max_new_tokens=3, eos_token_id=151643,
           transformers_version="4.31.0")
    seen = _captured_options(monkeypatch)
    assert _generate(ckpt) == 0
    assert (seen["do_sample"], seen["top_p"], seen["max_new_tokens"]) == (True, 0.3, 3)
    # a flag wins over the file
    assert _generate(ckpt, "--no-sample", "--max-new-tokens", "2", "--top-p", "0.9") == 0
    assert (seen["do_sample"], seen["top_p"], seen["max_new_tokens"]) == (False, 0.9, 2)


def test_without_the_file_decoding_is_greedy(ckpt, monkeypatch, capsys):
    (ckpt / "generation_config.json").unlink(missing_ok=True)
    seen = _captured_options(monkeypatch)
    assert _generate(ckpt) == 0
    assert seen["do_sample"] is False and seen["max_new_tokens"] == GenerationDefaults.max_new_tokens


@pytest.mark.parametrize("values, words", [
    ({"top_p": "high"}, ["top_p must be a float", "'high'"]),
    ({"do_sample": 1}, ["do_sample must be a bool"]),
    ({"max_new_tokens": 0}, ["max_new_tokens must be >= 1"]),
    ({"chat_format": "llama"}, ["chat_format must be 'raw' or 'chatml'"]),
    ({"top_p": 1.5}, ["top_p"]),  # a range the sampler refuses, refused before the model loads
])
def test_a_bad_file_is_one_line_and_exit_2(ckpt, monkeypatch, capsys, values, words):
    _write(ckpt, **values)
    monkeypatch.setattr("qwenvl.cli._load_model", lambda args: pytest.fail("the model loaded before the check"))
    assert _generate(ckpt) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(w in err for w in words), err


def test_reader_ignores_keys_it_does_not_use(tmp_path):
    _write(tmp_path, pad_token_id=151643, max_window_size=6144, temperature=1)
    defaults = read_generation_defaults(str(tmp_path))
    assert defaults.temperature == 1.0 and isinstance(defaults.temperature, float)
    assert read_generation_defaults(str(tmp_path / "missing")) == GenerationDefaults()
