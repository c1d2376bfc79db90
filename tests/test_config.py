import json

import pytest

from qwenvl import QwenVL, QwenVLConfig

RELEASED_CONFIG = {  # the keys of the released Qwen-VL config.json
    "architectures": ["QWenLMHeadModel"], "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"},
    "attn_dropout_prob": 0.0, "bf16": True, "emb_dropout_prob": 0.0, "fp16": False, "fp32": False,
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 22016, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen", "no_bias": True,
    "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 2048, "tie_word_embeddings": False,
    "tokenizer_type": "QWenTokenizer", "torch_dtype": "bfloat16", "transformers_version": "4.31.0",
    "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": False, "use_logn_attn": True,
    "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
               "output_dim": 4096, "patch_size": 14, "width": 1664},
    "vocab_size": 151936,
}


def test_released_config_json_reads_as_the_preset():
    cfg = QwenVLConfig.from_dict(RELEASED_CONFIG)
    assert cfg == QwenVLConfig.from_name("qwen-vl")
    assert cfg.vision.mlp_width == 8192  # int(1664 * 4.9231), truncated as released
    assert cfg.vision.adapter_heads == 32 and cfg.vision.head_dim == 104
    assert cfg.text.mlp_width == 11008 and cfg.dtype == "bfloat16"


@pytest.mark.parametrize("name", ["qwen-vl", "tiny"])
def test_config_json_round_trip(tmp_path, name):
    cfg = QwenVLConfig.from_name(name)
    cfg.save_json(str(tmp_path))
    assert QwenVLConfig.from_json(str(tmp_path)) == cfg
    if name == "qwen-vl":  # the released keys come back with their released values
        written = json.loads((tmp_path / "config.json").read_text())
        for k in ("hidden_size", "intermediate_size", "kv_channels", "seq_length", "vocab_size", "visual"):
            assert written[k] == RELEASED_CONFIG[k]


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="unknown config key.*sliding_window"):
        QwenVLConfig.from_dict({**RELEASED_CONFIG, "sliding_window": 4096})
    with pytest.raises(ValueError, match="visual.depth"):
        QwenVLConfig.from_dict({**RELEASED_CONFIG, "visual": {**RELEASED_CONFIG["visual"], "depth": 3}})


def test_unknown_preset_and_inconsistent_sizes():
    with pytest.raises(ValueError, match="unknown preset"):
        QwenVLConfig.from_name("qwen-72b")
    with pytest.raises(ValueError, match="must equal hidden_size"):
        QwenVLConfig.from_name("tiny").replace(text=dict(kv_channels=20))
    with pytest.raises(ValueError, match="output_dim"):
        QwenVLConfig.from_name("tiny").replace(vision=dict(output_dim=32, adapter_head_dim=16))


def test_released_parameter_split():
    import torch

    with torch.device("meta"):
        model = QwenVL(QwenVLConfig.from_name("qwen-vl"), kernels="torch")
    c = model.parameter_counts()
    assert round(c["vit"] / 1e9, 1) == 1.9
    assert round(c["adapter"] / 1e9, 2) == 0.08
    assert round(c["llm"] / 1e9, 1) == 7.7
    assert round(c["total"] / 1e9, 2) == 9.66
