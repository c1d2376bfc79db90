"""Every bad input to the public API and the command line is refused before any heavy step, with a message that
says what was wrong. Each case checks the exception type (or exit status 2 and one line on stderr), the words of
the message, and, through spies, that nothing heavy ran first: no model built or loaded, no tensor data read, no
ViT or decoder forward, no training model built."""
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import qwenvl.checkpoint as checkpoint
import qwenvl.cli as cli
import qwenvl.train.cli as train_cli
import qwenvl.train.pipeline as pipeline
from qwenvl import QwenVL, QwenVLConfig
from qwenvl.generation import chat, generate, sample_next
from qwenvl.model import QWenTransformer
from qwenvl.processing import load_image
from qwenvl.prompts import chat_ids, from_list_format
from qwenvl.tokenizer import QwenVLTokenizer
from qwenvl.vision import VisionTransformer


def tiny_config():
    return QwenVLConfig.from_name("tiny").replace(vision={"n_queries": 16, "image_size": 56})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return QwenVL(tiny_config(), kernels="torch").eval()


@pytest.fixture(scope="module")
def tok():
    return QwenVLTokenizer.byte_level(300, 16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, tok):
    path = tmp_path_factory.mktemp("ckpt") / "m"
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture
def ckpt(folder, tmp_path):
    """A fresh copy of the checkpoint folder, free to damage."""
    return shutil.copytree(folder, tmp_path / "m")


@pytest.fixture
def heavy(monkeypatch):
    """Counts of heavy steps; a case passes only when it is still empty after the error."""
    calls = Counter()

    def spy(owner, name, what):
        original = getattr(owner, name)

        def counted(*a, **k):
            calls[what] += 1
            return original(*a, **k)

        monkeypatch.setattr(owner, name, counted)

    original_init = QwenVL.__init__

    def built(self, *a, **k):  # a model on the meta device holds no memory: building one is not heavy
        original_init(self, *a, **k)
        if not self.lm_head.weight.is_meta:
            calls["model built"] += 1

    monkeypatch.setattr(QwenVL, "__init__", built)
    spy(torch.nn.Module, "to_empty", "weights allocated")
    spy(checkpoint, "safe_open", "tensor data read")
    spy(VisionTransformer, "forward", "ViT ran")
    spy(QWenTransformer, "forward", "decoder ran")
    spy(cli, "_load_model", "model loaded")
    spy(pipeline, "build_model", "training model built")
    monkeypatch.setattr(train_cli, "_threads", lambda n: None)  # leave the session's torch threads alone
    return calls


def refused(heavy, exc, words, fn, *args, **kwargs):
    with pytest.raises(exc) as e:
        fn(*args, **kwargs)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"
    assert not heavy, f"heavy work before the error: {dict(heavy)}"
    return e.value


def exits_2(heavy, capsys, words, fn, argv):
    """A command line refused with status 2 and one line on stderr (argparse errors exit through SystemExit)."""
    try:
        rc = fn(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    assert not heavy, f"heavy work before the error: {dict(heavy)}"


# --- checkpoint folders -------------------------------------------------------------------------------------
def _remove_config(p):
    os.remove(p / "config.json")


def _remove_weights(p):
    os.remove(p / "model.safetensors")


def _index(p, content):
    (p / "model.safetensors.index.json").write_text(content)
    os.remove(p / "model.safetensors")


@pytest.mark.parametrize("damage,exc,words", [
    (_remove_config, FileNotFoundError, ["no config.json"]),
    (_remove_weights, FileNotFoundError, ["no model.safetensors"]),
    (lambda p: _index(p, json.dumps({"weight_map": {"lm_head.weight": "model-00002.safetensors"}})),
     FileNotFoundError, ["model-00002.safetensors", "missing"]),
    (lambda p: _index(p, json.dumps({"metadata": {}})), ValueError, ["weight_map"]),
    (lambda p: _index(p, "{not json"), ValueError, ["not valid JSON"]),
    (lambda p: _index(p, json.dumps({"weight_map": {"lm_head.weight": "../x.safetensors"}})), ValueError,
     ["outside the checkpoint folder"]),
    (lambda p: (p / "model.safetensors.index.json").write_text("{}"), ValueError, ["two models"]),
], ids=["no-config", "no-weights", "missing-shard", "no-weight-map", "index-not-json", "shard-outside",
        "two-layouts"])
def test_checkpoint_folder(ckpt, heavy, damage, exc, words):
    damage(ckpt)
    refused(heavy, exc, [str(ckpt)] + words, QwenVL.from_pretrained, ckpt)


def test_checkpoint_folder_not_there(heavy, tmp_path):
    refused(heavy, FileNotFoundError, ["never downloaded"], QwenVL.from_pretrained, "Qwen/Qwen-VL-Chat")


# --- config.json --------------------------------------------------------------------------------------------
def _edit(key, value=None, drop=False, visual=False):
    def edit(d):
        section = d["visual"] if visual else d
        if drop:
            del section[key]
        else:
            section[key] = value
    return edit


@pytest.mark.parametrize("edit,words", [
    (_edit("seq_length", drop=True), ["missing config key", "seq_length", "nothing is filled in"]),
    (_edit("visual", drop=True), ["'visual' section"]),
    (_edit("width", drop=True, visual=True), ["visual.width"]),
    (_edit("hidden_size", "4096"), ["hidden_size must be an integer", "'4096'"]),
    (_edit("num_hidden_layers", 2.5), ["num_hidden_layers must be an integer"]),
    (_edit("num_attention_heads", 0), ["num_attention_heads must be >= 1"]),
    (_edit("use_logn_attn", "yes"), ["use_logn_attn must be true or false"]),
    (_edit("layer_norm_epsilon", float("nan")), ["layer_norm_epsilon must be a finite number"]),
    (_edit("rotary_pct", 1.5), ["rotary_pct", "(0, 1]"]),
    (_edit("torch_dtype", "float64"), ["torch_dtype 'float64' is not supported", "bfloat16"]),
    (lambda d: d.update(fp16=True, bf16=True), ["more than one of the flags"]),
    (_edit("sliding_window", 4096), ["unknown config key", "sliding_window"]),
    (_edit("patch_size", 15, visual=True), ["not a multiple of patch_size"]),
], ids=["missing-key", "missing-visual", "missing-visual-key", "string-number", "float-int", "zero-heads",
        "string-bool", "nan", "rotary-pct", "dtype", "two-flags", "unknown-key", "patch-size"])
def test_config_json(ckpt, heavy, edit, words):
    d = json.loads((ckpt / "config.json").read_text())
    d.update(bf16=False, fp16=False, fp32=False)
    edit(d)
    (ckpt / "config.json").write_text(json.dumps(d))
    refused(heavy, ValueError, [str(ckpt / "config.json")] + words, QwenVL.from_pretrained, ckpt)


@pytest.mark.parametrize("content,words", [
    (b'{"hidden_size": 64,', ["not valid JSON", "line 1"]),
    (b'{"model_type": "qwen\xff"}', ["not UTF-8"]),
    (b"[1, 2]", ["one JSON object"]),
], ids=["truncated-json", "not-utf8", "a-list"])
def test_config_json_unreadable(ckpt, heavy, content, words):
    (ckpt / "config.json").write_bytes(content)
    refused(heavy, ValueError, [str(ckpt / "config.json")] + words, QwenVL.from_pretrained, ckpt)


# --- weights ------------------------------------------------------------------------------------------------
def _rewrite(p, change):
    sd = load_file(p / "model.safetensors")
    change(sd)
    save_file(sd, p / "model.safetensors")


@pytest.mark.parametrize("change,words", [
    (lambda sd: sd.pop("transformer.h.1.mlp.w2.weight"), ["missing keys", "transformer.h.1.mlp.w2.weight"]),
    (lambda sd: sd.update({"transformer.rotary.inv_freq": torch.zeros(8)}), ["unexpected keys", "rotary.inv_freq"]),
    (lambda sd: sd.update({"transformer.ln_f.weight": torch.zeros(7)}), ["mis-shaped", "(7,) vs model (64,)"]),
    (lambda sd: sd.update({"transformer.ln_f.weight": torch.zeros(64, dtype=torch.int32)}),
     ["not 16/32/64-bit floats", "I32"]),
], ids=["missing", "unexpected", "mis-shaped", "integer"])
def test_weights_checked_from_headers(ckpt, heavy, change, words):
    _rewrite(ckpt, change)
    refused(heavy, ValueError, ["does not match the model"] + words, QwenVL.from_pretrained, ckpt)


@pytest.mark.parametrize("cut,words", [
    (lambda b: b[: len(b) - 100], ["truncated"]),
    (lambda b: b[:5], ["not a complete safetensors file"]),
    (lambda b: b[:8] + b"\xff" * 20 + b[28:], ["header is not valid JSON"]),
], ids=["cut-data", "cut-header", "garbled-header"])
def test_damaged_safetensors(ckpt, heavy, cut, words):
    f = ckpt / "model.safetensors"
    f.write_bytes(cut(f.read_bytes()))
    refused(heavy, ValueError, [str(f)] + words, QwenVL.from_pretrained, ckpt)


def test_overwritten_bytes_are_not_loaded_as_nan(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8:8 + header])["transformer.ln_f.weight"]["data_offsets"]
    data[8 + header + begin: 8 + header + begin + 8] = b"\xff" * 8  # two float32 NaNs
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"NaN or Inf: \['transformer.ln_f.weight'\]"):
        QwenVL.from_pretrained(ckpt, kernels="torch")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_bin_with_code_is_refused_not_run(ckpt, heavy, tmp_path):
    marker = str(tmp_path / "payload-ran")
    os.remove(ckpt / "model.safetensors")
    torch.save({"lm_head.weight": torch.zeros(2), "x": _Payload(marker)}, ckpt / "pytorch_model.bin")
    refused(heavy, ValueError, ["objects other than tensors", "could run code"], QwenVL.from_pretrained, ckpt)
    assert not os.path.exists(marker)


def test_tensor_stored_twice(ckpt, heavy):
    sd = load_file(ckpt / "model.safetensors")
    names = list(sd)
    save_file({n: sd[n] for n in names[:3]}, ckpt / "model-00001-of-00002.safetensors")
    save_file({n: sd[n] for n in names[2:]}, ckpt / "model-00002-of-00002.safetensors")
    index = {"weight_map": {n: f"model-0000{1 if i < 3 else 2}-of-00002.safetensors" for i, n in enumerate(names)}}
    _index(ckpt, json.dumps(index))
    refused(heavy, ValueError, ["stored twice", names[2]], QwenVL.from_pretrained, ckpt)


# --- images -------------------------------------------------------------------------------------------------
def span(cfg):
    v = cfg.vision
    return torch.tensor([v.image_start_id] + [v.image_pad_id] * v.n_queries + [v.image_end_id])


def _grey32(tmp_path):
    p = tmp_path / "i32.tiff"
    Image.fromarray(np.full((4, 4), 1 << 20, dtype=np.int32), "I").save(p)
    return p


@pytest.mark.parametrize("make,exc,words", [
    (lambda t: t / "nope.png", FileNotFoundError, ["image file not found", "nope.png"]),
    (lambda t: "https://example.com/a.jpg", ValueError, ["URL", "never fetched"]),
    (lambda t: t, IsADirectoryError, ["folder"]),
    (lambda t: (t / "bad.png").write_bytes(b"GIF89a junk") and t / "bad.png", ValueError, ["cannot read", "bad.png"]),
    (_grey32, ValueError, ["only 8- and 16-bit", "i32.tiff"]),
], ids=["missing", "url", "folder", "corrupt", "32-bit"])
def test_image_files(heavy, tmp_path, make, exc, words):
    refused(heavy, exc, words, load_image, make(tmp_path), 56)


@pytest.mark.parametrize("pixels,exc,words", [
    (lambda: torch.zeros(1, 3, 56, 56, dtype=torch.uint8), TypeError, ["floating point", "load_image"]),
    (lambda: torch.randn(2, 3, 56, 56), ValueError, ["2 image(s) given for 1 <img> span"]),
    (lambda: torch.randn(1, 3, 56, 42), ValueError, ["square", "56x42"]),
    (lambda: torch.randn(3, 56, 56), ValueError, ["[num_images, 3, H, W]"]),
    (lambda: torch.randn(1, 3, 50, 50), ValueError, ["patch size 14"]),
], ids=["uint8", "count", "not-square", "3d", "patch"])
def test_pixel_values_before_the_vit(model, heavy, pixels, exc, words):
    ids = torch.cat([span(model.config), torch.tensor([1, 2])])[None]
    refused(heavy, exc, words, model, ids, pixel_values=pixels())


def test_image_features_shape(model, heavy):
    ids = torch.cat([span(model.config), torch.tensor([1])])[None]
    refused(heavy, ValueError, ["image_features must be [num_images, 16, 64]"], model, ids,
            image_features=torch.randn(1, 8, 64))


# --- prompts and text ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn,exc,words", [
    (lambda t: t.encode("caf\udce9"), ValueError, ["not valid UTF-8", "position 3"]),
    (lambda t: t.encode("<img>a.png and more"), ValueError, ["unclosed image tag"]),
    (lambda t: t.encode("<img>" + "x" * 17 + "</img>"), ValueError, ["too long", "17 UTF-8 bytes"]),
    (lambda t: t.encode("hi", allowed_special={"<|im_end|>", "<nope>"}), ValueError, ["unknown special", "<nope>"]),
    (lambda t: t.decode([t.vocab_size]), ValueError, ["outside this tokenizer's vocabulary"]),
    (lambda t: from_list_format([{"text": 42}]), TypeError, ["a text item holds a str"]),
    (lambda t: from_list_format([{"box": [(1, 2, "x", 4)]}]), ValueError, ["four numbers"]),
    (lambda t: from_list_format([{"image": "a</img>b"}]), ValueError, ["<img> tag"]),
    (lambda t: chat_ids(t, "q", history=[("only the question",)]), ValueError, ["history[0]", "pair"]),
    (lambda t: chat_ids(t, b"bytes"), TypeError, ["query must be a str"]),
    (lambda t: chat_ids(t, "q", system=None), TypeError, ["system must be a str"]),
], ids=["surrogate", "unclosed", "path-too-long", "unknown-special", "decode-range", "text-item", "box-item",
        "image-item", "history", "query-type", "system-type"])
def test_prompts_and_text(tok, heavy, fn, exc, words):
    refused(heavy, exc, words, fn, tok)


@pytest.mark.parametrize("ids,words", [
    (lambda c: torch.tensor([[1, 600, 2]]), ["token id 600", "outside the model's vocabulary 0..511"]),
    (lambda c: torch.tensor([[1, -100]]), ["token id -100", "ignore_index"]),
    (lambda c: torch.zeros(1, 0, dtype=torch.long), ["empty prompt"]),
    (lambda c: torch.tensor([[1.0, 2.0]]), ["integer [batch, seq]"]),
    (lambda c: torch.cat([span(c)[:-3], span(c)[-1:]])[None], ["malformed image span"]),
], ids=["past-vocab", "negative", "empty", "float", "cut-span"])
def test_input_ids_before_the_decoder(model, heavy, ids, words):
    refused(heavy, ValueError, words, model, ids(model.config), pixel_values=None)


def test_labels_checked_before_the_decoder(model, heavy):
    ids = torch.tensor([[1, 2, 3]])
    refused(heavy, ValueError, ["labels must have the shape"], model, ids, labels=torch.tensor([[1, 2]]))
    refused(heavy, ValueError, ["label 999"], model, ids, labels=torch.tensor([[1, 2, 999]]))


# --- generation arguments -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,words", [
    (dict(top_p=1.5), ["top_p must be in (0, 1]"]),
    (dict(top_p=0.0), ["top_p must be in (0, 1]"]),
    (dict(top_p=-0.1, do_sample=True), ["top_p"]),
    (dict(top_k=-1), ["top_k must be an int >= 0"]),
    (dict(top_k=2.5), ["top_k"]),
    (dict(repetition_penalty=0.0), ["repetition_penalty must be a finite number > 0"]),
    (dict(temperature=0.0, do_sample=True), ["temperature must be a finite number > 0"]),
    (dict(temperature=float("nan")), ["temperature"]),
    (dict(max_new_tokens=2.5), ["max_new_tokens must be an int >= 1"]),
    (dict(max_new_tokens=0), ["max_new_tokens must be an int >= 1"]),
    (dict(do_sample="yes"), ["do_sample must be True or False"]),
    (dict(eos_token_id=10_000), ["eos_token_id", "0..511"]),
    (dict(pad_token_id=-1), ["pad_token_id"]),
    (dict(vocab_size=1000), ["vocab_size", "1..512"]),
    (dict(max_new_tokens=40_000), ["exceeds the longest context"]),
], ids=["top_p>1", "top_p=0", "top_p<0", "top_k<0", "top_k-float", "penalty-0", "temperature-0", "temperature-nan",
        "float-budget", "zero-budget", "do_sample-str", "eos-range", "pad-range", "vocab_size", "too-long"])
def test_generation_arguments_before_the_prefill(model, heavy, kwargs, words):
    refused(heavy, ValueError, words, generate, model, torch.tensor([[1, 2, 3]]), **kwargs)


def test_generation_objects_before_the_prefill(model, tok, heavy):
    refused(heavy, TypeError, ["torch.Generator"], generate, model, torch.tensor([[1]]), generator=3)
    refused(heavy, TypeError, ["streamer must be callable"], generate, model, torch.tensor([[1]]), streamer="x")
    refused(heavy, ValueError, ["top_p"], chat, model, tok, "hi", top_p=2.0)
    refused(heavy, ValueError, ["top_k"], sample_next, torch.zeros(1, 4), True, top_k=-2)


# --- kernel arguments (the public kernel functions) ---------------------------------------------------------
def _kernels():
    kernels = pytest.importorskip("qwenvl_kernels")
    if not hasattr(kernels, "rms_norm"):
        pytest.skip("the kernel functions need triton")
    return kernels


@pytest.mark.parametrize("call,words", [
    (lambda K: K.rms_norm(torch.randn(4, 16), torch.ones(8), 1e-6), ["rms_norm", "weight has shape (8,)"]),
    (lambda K: K.layer_norm(torch.randn(4, 16), torch.ones(8), torch.zeros(16), 1e-6), ["layer_norm", "(8,)"]),
    (lambda K: K.swiglu(torch.randn(4, 8), torch.randn(4, 9)), ["swiglu", "one shape"]),
    (lambda K: K.flash_attn_func(torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)),
     ["same head_dim", "16 and 8"]),
    (lambda K: K.apply_rotary(torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(4, 8),
                              torch.randn(4, 8)), ["longer than the cos/sin tables"]),
    (lambda K: K.linear_cross_entropy(torch.randn(4, 16), torch.randn(10, 16), torch.zeros(5, dtype=torch.long)),
     ["labels must be [N] = [4]"]),
], ids=["rms_norm", "layer_norm", "swiglu", "flash_attn", "rotary", "cross_entropy"])
def test_kernel_arguments(call, words):
    kernels = _kernels()
    with pytest.raises(kernels.UnsupportedInput) as e:
        call(kernels)
    for w in words:
        assert w in str(e.value)


def test_unknown_backend_name():
    from qwenvl_kernels import get_backend

    with pytest.raises(ValueError, match="unknown kernels backend 'cuda'"):
        QwenVL(tiny_config(), kernels="cuda")
    with pytest.raises(ValueError, match="choose 'auto', 'torch' or 'triton'"):
        get_backend("fast")


# --- data files (qwenvl train: every record is checked before a model is built) -----------------------------
GOOD = {"id": "g", "conversations": [{"from": "user", "value": "Picture 1: <img>a.png</img>\nColour?"},
                                     {"from": "assistant", "value": "red"}]}


def _train_args(folder, out, data, *extra):
    return ["--model", str(folder), "--out", str(out), "--stage", "3", "--data", str(data), "--steps", "1",
            "--batch-size", "2", "--kernels", "torch", "--workers", "0", "--quiet", "--eval-samples", "0", *extra]


@pytest.mark.parametrize("content,words", [
    (None, ["data file not found"]),
    (b"[{\"id\": 1,", ["not valid JSON"]),
    (b"[\"caf\xe9\"]", ["not UTF-8"]),
    (b"[]", ["holds no records"]),
    (json.dumps({"id": "x"}).encode(), ["record 'x'", "'conversations' must be a non-empty list"]),
    (json.dumps([{"id": "r1", "conversations": [{"from": "user", "value": "hi"}]}] + [GOOD] * 3).encode(),
     ["r1", "last turn must be the assistant's", "--bad-records skip"]),
    (json.dumps([GOOD, {"id": "r2", "conversations": [{"from": "user", "value": "<img>zz.png</img>"},
                                                      {"from": "assistant", "value": "x"}]}] * 2).encode(),
     ["r2", "image file not found"]),
    (json.dumps([GOOD]).encode(), ["fewer than one global batch of 2"]),
], ids=["missing", "bad-json", "not-utf8", "empty", "one-object", "no-reply", "missing-image", "too-small"])
def test_data_files(folder, heavy, capsys, tmp_path, content, words):
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "a.png")
    data = tmp_path / "data.json"
    if content is not None:
        data.write_bytes(content)
    exits_2(heavy, capsys, words, train_cli.main_train, _train_args(folder, tmp_path / "run", data))


# --- the command line ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,words", [
    (["--max-new-tokens", "0"], ["--max-new-tokens must be >= 1"]),
    (["--image", "nope.png"], ["image file not found", "nope.png"]),
    (["--top-p", "1.5"], ["top_p must be in (0, 1]"]),
    (["--sample", "--temperature", "0"], ["temperature"]),
    (["--top-k", "-3"], ["top_k"]),
    (["--repetition-penalty", "0"], ["repetition_penalty"]),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], ["device"]),
    (["--draw", "no/such/folder/out.png"], ["does not exist"]),
    (["--prompt", "caf\udce9"], ["not valid UTF-8"]),
    (["--image", "a.png", "--prompt", "<img>" + "p" * 30 + "</img>"], ["too long"]),
], ids=["budget", "image", "top-p", "temperature", "top-k", "penalty", "device", "draw", "prompt-bytes",
        "long-path"])
def test_generate_flags_before_the_model_loads(folder, heavy, capsys, tmp_path, monkeypatch, extra, words):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (20, 20), (255, 0, 0)).save("a.png")
    argv = ["generate", "--checkpoint", str(folder), "--prompt", "hi", "--kernels", "torch", *extra]
    exits_2(heavy, capsys, ["qwenvl generate: error"] + words, cli.main, argv)


def test_generate_on_a_missing_or_mixed_folder(folder, heavy, capsys, tmp_path):
    exits_2(heavy, capsys, ["no config.json"], cli.main,
            ["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "hi"])
    mixed = shutil.copytree(folder, tmp_path / "mixed")
    QwenVLTokenizer.byte_level(300, 32).save_pretrained(mixed)
    exits_2(heavy, capsys, ["mixes two models"], cli.main, ["generate", "--checkpoint", str(mixed), "--prompt", "hi"])


@pytest.mark.parametrize("fn,argv,words", [
    (cli.main, ["generate", "--checkpoint", "x", "--prompt", "hi", "--max-new-tokens", "many"], ["invalid int"]),
    (cli.main, ["fly"], ["invalid choice"]),
    (train_cli.main_train, ["--stage", "4"], ["--stage takes stages among 1, 2, 3"]),
    (train_cli.main_train, ["--mix", "dance=1"], ["unknown or no kinds"]),
    (train_cli.main_train, ["--train", "vit,eyes"], ["--train takes parts"]),
    (train_cli.main_train, ["--batch-size", "0"], ["must be > 0"]),
    (train_cli.main_eval, ["--model", "no-such-model"], ["neither a preset"]),
], ids=["not-an-int", "no-command", "stage", "mix", "parts", "batch", "eval-model"])
def test_flags(heavy, capsys, fn, argv, words):
    exits_2(heavy, capsys, words, fn, argv)


def test_init_refuses_to_overwrite(heavy, capsys, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    exits_2(heavy, capsys, ["already exists", "--force"], cli.main, ["init", "--out", str(tmp_path / "taken")])
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]


def test_resume_from_pickles_is_refused_not_run(folder, heavy, capsys, tmp_path):
    """A run folder of an older version: optimizer.pt / rng.pt are refused before any model is built, unread."""
    marker = str(tmp_path / "payload-ran")
    ck = shutil.copytree(folder, tmp_path / "run" / "stage3" / "checkpoint-000001")
    torch.save({"x": _Payload(marker)}, ck / "optimizer.pt")
    torch.save({"x": _Payload(marker)}, ck / "rng.pt")
    (ck / "trainer_state.json").write_text(json.dumps({"stage": 3, "step": 1, "tokens_seen": 0, "plan": {},
                                                       "recipe": {}}))
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "data.json").write_text(json.dumps([GOOD] * 4))
    argv = _train_args(folder, tmp_path / "run", tmp_path / "data.json", "--resume")
    exits_2(heavy, capsys, ["optimizer.pt, rng.pt", "never loaded", "can run code"], train_cli.main_train, argv)
    assert not os.path.exists(marker)
