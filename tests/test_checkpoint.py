import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl import QwenVL, QwenVLConfig
from tests.helpers import assert_close


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return QwenVL(QwenVLConfig.from_name("tiny"), kernels="torch").eval()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_official_names(tiny):
    names = set(tiny.state_dict())
    for n in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
              "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.w1.weight", "transformer.h.0.mlp.w2.weight",
              "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.ln_1.weight", "transformer.ln_f.weight",
              "lm_head.weight", "transformer.visual.conv1.weight", "transformer.visual.positional_embedding",
              "transformer.visual.ln_pre.bias", "transformer.visual.transformer.resblocks.1.attn.in_proj.weight",
              "transformer.visual.transformer.resblocks.0.mlp.c_fc.bias", "transformer.visual.attn_pool.query",
              "transformer.visual.attn_pool.pos_embed", "transformer.visual.attn_pool.kv_proj.weight",
              "transformer.visual.attn_pool.attn.in_proj_weight", "transformer.visual.attn_pool.attn.out_proj.bias",
              "transformer.visual.attn_pool.ln_q.weight", "transformer.visual.ln_post.weight", "transformer.visual.proj"):
        assert n in names, n
    assert "transformer.h.0.attn.c_proj.bias" not in names and "transformer.visual.conv1.bias" not in names
    assert not any("rotary" in n or "inv_freq" in n for n in names)


@pytest.mark.parametrize("shard_bytes", [1 << 40, 200_000])
def test_safetensors_round_trip(tmp_path, tiny, shard_bytes):
    tiny.save_pretrained(str(tmp_path), max_shard_bytes=shard_bytes)
    files = sorted(os.listdir(tmp_path))
    if shard_bytes < 1 << 40:
        assert "model.safetensors.index.json" in files and any(f.startswith("model-00002-of-") for f in files)
    else:
        assert "model.safetensors" in files
    loaded = QwenVL.from_pretrained(str(tmp_path), kernels="torch")
    _same(tiny, loaded)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert_close(loaded(ids).logits, tiny(ids).logits)


def test_bin_shards_round_trip_and_dtype(tmp_path, tiny):
    sd = tiny.state_dict()
    keys = list(sd)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for fname, ks in shards.items():
        torch.save({k: sd[k].clone() for k in ks}, tmp_path / fname)
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    tiny.config.save_json(str(tmp_path))
    loaded = QwenVL.from_pretrained(str(tmp_path), kernels="torch")
    _same(tiny, loaded)
    half_model = QwenVL.from_pretrained(str(tmp_path), dtype="bfloat16", kernels="torch")
    assert half_model.dtype == torch.bfloat16


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, tiny):
    tiny.save_pretrained(str(tmp_path))
    path = str(tmp_path / "model.safetensors")
    sd = load_file(path)
    del sd["transformer.h.1.mlp.w2.weight"]
    sd["transformer.h.0.attn.rotary.inv_freq"] = torch.zeros(8)
    sd["transformer.ln_f.weight"] = torch.zeros(7)
    save_file(sd, path)
    with pytest.raises(ValueError) as e:
        QwenVL.from_pretrained(str(tmp_path), kernels="torch")
    msg = str(e.value)
    assert "transformer.h.1.mlp.w2.weight" in msg and "rotary.inv_freq" in msg and "transformer.ln_f.weight" in msg


def test_missing_shard_and_missing_folder(tmp_path, tiny):
    tiny.save_pretrained(str(tmp_path), max_shard_bytes=200_000)
    os.remove(tmp_path / "model-00002-of-00003.safetensors") if (tmp_path / "model-00002-of-00003.safetensors").exists() \
        else os.remove(next(tmp_path.glob("model-00002-*.safetensors")))
    with pytest.raises(FileNotFoundError, match="missing"):
        QwenVL.from_pretrained(str(tmp_path), kernels="torch")
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        QwenVL.from_pretrained("Qwen/Qwen-VL-Chat")
    (tmp_path / "empty").mkdir()
    tiny.config.save_json(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        QwenVL.from_pretrained(str(tmp_path / "empty"))
