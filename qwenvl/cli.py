"""`qwenvl generate | chat | init | train | eval`: the command line."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _load(args):
    from .checkpoint import resolve_dtype
    from .model import QwenVL
    from .tokenizer import QwenVLTokenizer

    model = QwenVL.from_pretrained(args.checkpoint, dtype=resolve_dtype(args.dtype), device=args.device,
                                   kernels=args.kernels)
    tokenizer = QwenVLTokenizer.from_pretrained(args.checkpoint)
    if tokenizer.n_image_tokens != model.config.vision.n_queries:
        raise SystemExit(
            f"the tokenizer pads images to {tokenizer.n_image_tokens} ids but the model has "
            f"{model.config.vision.n_queries} queries: this folder mixes two models"
        )
    return model, tokenizer


def _generation_config(args) -> dict:
    path = os.path.join(args.checkpoint, "generation_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {}


def _chat_format(args) -> str:
    return args.format or _generation_config(args).get("chat_format", "raw")


def _system_prompt(args) -> str:
    """The system prompt the checkpoint was trained with (generation_config.json), else Qwen-VL-Chat's."""
    from .generation import DEFAULT_SYSTEM

    return _generation_config(args).get("system", DEFAULT_SYSTEM)


def _draw_if_grounded(text, image, out_path):
    from .processing import draw_boxes, parse_grounding

    parsed = parse_grounding(text)
    if parsed and image and out_path:
        draw_boxes(image, parsed, out_path)
        print(f"[boxes drawn to {out_path}]", file=sys.stderr)


def cmd_generate(args) -> int:
    import torch

    from .generation import chat, generate, until_stop

    model, tok = _load(args)
    items = [{"image": p} for p in args.image] + [{"text": args.prompt}]
    query = tok.from_list_format(items)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
               top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    if _chat_format(args) == "chatml":
        response, _ = chat(model, tok, query, system=_system_prompt(args), **gen)
    else:
        from .processing import images_for

        ids = torch.tensor([tok.encode(query)], dtype=torch.long)
        pix = images_for(ids, tok, model.config.vision.image_size) if args.image else None
        if pix is not None:
            pix = pix.to(model.device, model.dtype)
        out = generate(model, ids, pixel_values=pix, eos_token_id=[tok.eod_id, tok.im_end_id],
                       vocab_size=tok.vocab_size, **gen)
        response = tok.decode(until_stop(out[0, ids.shape[1]:].tolist(), (tok.eod_id, tok.im_end_id)))
    print(response)
    _draw_if_grounded(response, args.image[0] if args.image else None, args.draw)
    return 0


def cmd_chat(args) -> int:
    from .generation import chat_stream

    model, tok = _load(args)
    history = []
    pending_images = list(args.image)
    print("qwenvl chat: type a message; ':image PATH' attaches an image; ':quit' ends.", file=sys.stderr)
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in (":quit", ":q"):
            break
        if line.startswith(":image "):
            pending_images.append(line[len(":image "):].strip())
            continue
        query = tok.from_list_format([{"image": p} for p in pending_images] + [{"text": line}])
        last_image = pending_images[-1] if pending_images else None
        pending_images = []
        shown = ""
        for text in chat_stream(model, tok, query, history=history, system=_system_prompt(args),
                                max_new_tokens=args.max_new_tokens,
                                do_sample=args.sample, top_p=args.top_p, temperature=args.temperature):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
        print()
        history.append((query, shown))
        _draw_if_grounded(shown, last_image, args.draw)
    return 0


def cmd_init(args) -> int:
    """A randomly initialized checkpoint folder of a preset, with its tokenizer (for trying the pipeline)."""
    import torch

    from .config import QwenVLConfig
    from .model import QwenVL
    from .tokenizer import QwenVLTokenizer

    cfg = QwenVLConfig.from_name(args.model)
    if cfg.text.vocab_size > 100_000:
        raise SystemExit("init writes small presets only; the released model is loaded from its own folder")
    torch.manual_seed(args.seed)
    model = QwenVL(cfg, kernels="torch")
    model.save_pretrained(args.out)
    QwenVLTokenizer.byte_level(cfg.vision.image_start_id, cfg.vision.n_queries).save_pretrained(args.out)
    print(f"wrote a random {args.model} checkpoint to {args.out}")
    return 0


def _model_args(p):
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json, weights, qwen.tiktoken)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--format", choices=["raw", "chatml"], default=None,
                   help="prompt format (default: generation_config.json's chat_format, else raw)")
    p.add_argument("--draw", default="grounding.png", help="where to draw boxes of a grounded answer (PNG)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval"):
        from .train import cli as train_cli

        return (train_cli.main_train if argv[0] == "train" else train_cli.main_eval)(argv[1:])
    parser = argparse.ArgumentParser(prog="qwenvl", description="Qwen-VL with Triton kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt (with images)")
    _model_args(g)
    g.add_argument("--prompt", required=True)
    c = sub.add_parser("chat", help="interactive ChatML chat on stdin")
    _model_args(c)
    i = sub.add_parser("init", help="write a randomly initialized small checkpoint folder")
    i.add_argument("--model", default="tiny")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    sub.add_parser("train", help="train (see `qwenvl train --help`)")
    sub.add_parser("eval", help="evaluate (see `qwenvl eval --help`)")
    args = parser.parse_args(argv)
    if getattr(args, "device", None) is None and args.command in ("generate", "chat"):
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"generate": cmd_generate, "chat": cmd_chat, "init": cmd_init}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
