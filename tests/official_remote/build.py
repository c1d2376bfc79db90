"""Tiny official-structure models, images and prompts for the patch tests, and a remote-code folder that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` loads as users load the released model."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel
from .tokenization_qwen import FIRST_SPECIAL, SPECIALS, QWenTokenizer

HERE = Path(__file__).parent
REMOTE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "visual.py", "qwen_generation_utils.py",
                "tokenization_qwen.py")
IMAGE_START_ID = FIRST_SPECIAL + SPECIALS.index("<img>")
N_QUERIES = 16  # the adapter's queries: the image span is 1 + 16 + 1 ids


def tiny_config(**overrides):
    visual = dict(image_size=56, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=2.5, n_queries=N_QUERIES,
                  output_dim=128, image_start_id=IMAGE_START_ID)
    visual.update(overrides.pop("visual", {}))
    kwargs = dict(vocab_size=293, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, kv_channels=32,
                  intermediate_size=344, seq_length=40, max_position_embeddings=512, fp32=True, visual=visual)
    kwargs.update(overrides)
    return QWenConfig(**kwargs)


def build(seed=0, **overrides):
    """A random tiny QWenLMHeadModel in fp32, eval mode, norms and biases away from their init."""
    torch.manual_seed(seed)
    model = QWenLMHeadModel(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                continue
            if p.dim() == 1 and "ln" in name.split(".")[-2]:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(std=0.1)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
            else:
                p.normal_(std=0.08)
    return model.eval()


def tokenizer():
    return QWenTokenizer(image_span=N_QUERIES)


def write_images(folder, n, size=40, seed=0):
    """n random RGB PNGs in folder; returns their names (short relative paths: the span holds 16 bytes at most)."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"i{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(Path(folder) / name)
        names.append(name)
    return names


def save_remote_folder(model, folder):
    """The model as a released checkpoint folder: weights, config.json with auto_map, and the remote code."""
    folder = Path(folder)
    model.save_pretrained(folder)
    for name in REMOTE_FILES:
        text = (HERE / name).read_text()
        (folder / name).write_text(text)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_qwen.QWenConfig",
                          "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    eod = tokenizer().eod_id  # the released Qwen-VL-Chat generation_config.json, greedy and short
    generation = dict(chat_format="chatml", eos_token_id=eod, pad_token_id=eod, max_window_size=6144,
                      max_new_tokens=8, do_sample=False)
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder


