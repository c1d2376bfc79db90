"""`qwenvl generate | chat | init | train | eval`: the command line.

A user's mistake (a bad flag, a missing file, a refused input) prints one line, `qwenvl <command>: error: ...`, and
exits with status 2; a traceback means a bug. Everything a command is given is checked before the model loads.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

# what a user's mistake raises (UnsupportedInput and UnicodeError are ValueErrors); anything else is a bug
USER_ERRORS = (ValueError, OSError)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_command(prog: str, fn, *args) -> int:
    """fn(*args) with a user's mistake turned into one line on stderr and exit status 2."""
    try:
        return fn(*args)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


def check_kernels(name: str):
    """The backend, or a ValueError when it cannot run here (e.g. triton without a GPU or the interpreter)."""
    from qwenvl_kernels import get_backend

    try:
        return get_backend(name)
    except RuntimeError as e:
        raise ValueError(str(e)) from None


# --- generate and chat ----------------------------------------------------------------------------------------
def _prepare(args):
    """Everything but the model, checked: (config, tokenizer, generation options, chat format, the folder's
    GenerationDefaults: system prompt, history window)."""
    from .config import QwenVLConfig, resolve_device, resolve_dtype
    from .generation import check_sampling
    from .generation_config import read_generation_defaults
    from .processing import open_rgb
    from .tokenizer import QwenVLTokenizer

    config = QwenVLConfig.from_json(args.checkpoint)
    defaults = read_generation_defaults(args.checkpoint)
    options = defaults.sampling()
    for key in options:  # a flag given on the command line wins over the folder's generation_config.json
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    resolve_dtype(args.dtype)
    args.device = resolve_device(args.device or ("cuda" if _cuda() else "cpu"))
    if args.compile:
        from .compiled import check_compile

        check_compile(args.compile, args.device)
        options["compile"] = args.compile
    check_kernels(args.kernels)
    tokenizer = QwenVLTokenizer.from_pretrained(args.checkpoint)
    if tokenizer.n_image_tokens != config.vision.n_queries or tokenizer.img_start_id != config.vision.image_start_id:
        raise ValueError(
            f"{args.checkpoint}: the tokenizer's image spans ({tokenizer.n_image_tokens} ids from id "
            f"{tokenizer.img_start_id}) do not fit the model ({config.vision.n_queries} queries, <img> = "
            f"{config.vision.image_start_id}): this folder mixes two models"
        )
    if options["max_new_tokens"] < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {options['max_new_tokens']}")
    check_sampling(options["do_sample"], options["temperature"], options["top_p"], options["top_k"],
                   options["repetition_penalty"])
    for image in args.image:
        open_rgb(image)
    if args.draw:
        _check_draw(args.draw)
    chat_format = args.format or defaults.chat_format
    return config, tokenizer, options, chat_format, defaults


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_draw(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--draw {path}: the folder {parent} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"--draw takes a PNG file name, got the folder {path}")


def _load_model(args):
    from .config import resolve_dtype
    from .model import QwenVL

    return QwenVL.from_pretrained(args.checkpoint, dtype=resolve_dtype(args.dtype), device=args.device,
                                  kernels=args.kernels)


def _draw_if_grounded(text, image, out_path, query=None):
    from .drawing import draw_boxes
    from .processing import parse_grounding

    parsed = parse_grounding(text, strict=False)
    if not (parsed and image):
        return
    if out_path:
        draw_boxes(image, parsed, out_path, title=query)
        print(f"[boxes drawn to {out_path}]", file=sys.stderr)
    else:
        print("[the answer holds boxes: pass --draw FILE.png to see them on the image]", file=sys.stderr)


def cmd_generate(args) -> int:
    import torch

    from .generation import chat, generate, until_stop
    from .processing import images_for
    from .prompts import chat_ids

    if not args.prompt.strip() and not args.image:
        raise ValueError("--prompt is empty and no --image was given: there is nothing to answer")
    _, tok, options, chat_format, defaults = _prepare(args)
    system = defaults.system
    query = tok.from_list_format([{"image": p} for p in args.image] + [{"text": args.prompt}])
    if chat_format == "chatml":
        chat_ids(tok, query, system=system)  # refused here, not after the model has loaded
    else:  # the raw format encodes the user's text as is, as the released code does
        ids = torch.tensor([tok.encode(query)], dtype=torch.long)
    model = _load_model(args)
    if chat_format == "chatml":
        response, _ = chat(model, tok, query, system=system, max_window_size=defaults.max_window_size, **options)
    else:
        pix = images_for(ids, tok, model.config.vision.image_size) if args.image else None
        if pix is not None:
            pix = pix.to(model.device, model.dtype)
        stops = [tok.eod_id, tok.im_end_id]
        out = generate(model, ids, pixel_values=pix, eos_token_id=stops, vocab_size=tok.vocab_size, **options)
        response = tok.decode(until_stop(out[0, ids.shape[1]:].tolist(), stops))
    print(response)
    _draw_if_grounded(response, args.image[0] if args.image else None, args.draw, args.prompt)
    return 0


def _lines(stream):
    """Lines of a binary stream, each decoded as UTF-8 on its own: (text, None) or (None, error message)."""
    for raw in stream:
        try:
            yield raw.decode("utf-8").rstrip("\r\n"), None
        except UnicodeDecodeError as e:
            yield None, f"this line is not UTF-8 ({e.reason} at byte {e.start}); it was ignored, type it again"


def cmd_chat(args) -> int:
    from .generation import chat_stream
    from .processing import open_rgb

    _, tok, options, _, defaults = _prepare(args)
    system, window = defaults.system, defaults.max_window_size
    model = _load_model(args)
    history = []
    pending_images = list(args.image)
    print("qwenvl chat: type a message; ':image PATH' attaches an image; ':quit' ends.", file=sys.stderr)
    stdin = getattr(sys.stdin, "buffer", None)
    lines = _lines(stdin) if stdin is not None else ((line.rstrip("\n"), None) for line in sys.stdin)
    for line, problem in lines:
        if problem is not None:
            print(f"qwenvl chat: error: {problem}", file=sys.stderr)
            continue
        if not line.strip():
            continue
        if line.strip() in (":quit", ":q"):
            break
        if line.startswith(":image"):
            path = line[len(":image"):].strip()
            try:
                if not path:
                    raise ValueError("':image' needs a file: ':image PATH'")
                open_rgb(path)
            except USER_ERRORS as e:  # a typo keeps the session and its history
                print(f"qwenvl chat: error: {e}", file=sys.stderr)
                continue
            pending_images.append(path)
            continue
        try:
            query = tok.from_list_format([{"image": p} for p in pending_images] + [{"text": line}])
            shown = ""
            for text in chat_stream(model, tok, query, history=history, system=system, max_window_size=window,
                                    **options):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        except USER_ERRORS as e:
            print(f"\nqwenvl chat: error: {e}", file=sys.stderr)
            continue
        print()
        history.append((query, shown.strip()))  # what `chat` returns: the released decode strips the answer
        _draw_if_grounded(shown, pending_images[-1] if pending_images else None, args.draw, line)
        pending_images = []
    return 0


# --- init -----------------------------------------------------------------------------------------------------
# what a checkpoint folder written by `init` (or `save_pretrained` + the tokenizer) holds
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "qwen.tiktoken", "tokenizer_config.json")


def cmd_init(args) -> int:
    """A randomly initialized checkpoint folder of a preset, with its tokenizer (for trying the pipeline)."""
    import torch

    from .config import QwenVLConfig
    from .model import QwenVL
    from .tokenizer import QwenVLTokenizer

    cfg = QwenVLConfig.from_name(args.model)
    if cfg.text.vocab_size > 100_000:
        raise ValueError("init writes small presets only (tiny, demo); the released model is loaded from its folder")
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not args.force:
        raise FileExistsError(
            f"{out} already exists and is not empty: pass --force to replace the model in it, or another --out"
        )
    torch.manual_seed(args.seed)
    model = QwenVL(cfg, kernels="torch")
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".tmp-init-{os.path.basename(os.path.abspath(out))}-"
                                                              f"{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        QwenVLTokenizer.byte_level(cfg.vision.image_start_id, cfg.vision.n_queries).save_pretrained(tmp)
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):  # --force: the old model's files go, so that no two models mix
            if name in _MODEL_FILES or name.startswith(("model-", "pytorch_model")):
                os.remove(os.path.join(out, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote a random {args.model} checkpoint to {out}")
    return 0


# --- parsing --------------------------------------------------------------------------------------------------
def _model_args(p):
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json, weights, qwen.tiktoken)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    # decoding: None means "the checkpoint's generation_config.json, else greedy with at most 128 new tokens"
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--sample", "--do-sample", dest="do_sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample (--sample) or decode greedily (--no-sample); default: generation_config.json")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--format", choices=["raw", "chatml"], default=None,
                   help="prompt format (default: generation_config.json's chat_format, else raw)")
    p.add_argument("--draw", default=None, metavar="FILE.png",
                   help="draw the boxes of a grounded answer on the (first or last attached) image into this PNG")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="decode with a compiled step over a static KV cache (torch.compile, with CUDA graphs on a "
                        "GPU); BACKEND: a torch.compile backend (default inductor; aot_eager compiles fastest)")


def parser() -> Parser:
    parser = Parser(prog="qwenvl", description="Qwen-VL with Triton kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt (with images)")
    _model_args(g)
    g.add_argument("--prompt", required=True)
    c = sub.add_parser("chat", help="interactive ChatML chat on stdin")
    _model_args(c)
    i = sub.add_parser("init", help="write a randomly initialized small checkpoint folder")
    i.add_argument("--model", default="tiny", choices=["tiny", "demo"])
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--force", action="store_true", help="replace the model files of an existing folder")
    sub.add_parser("train", help="train (see `qwenvl train --help`)")
    sub.add_parser("eval", help="evaluate (see `qwenvl eval --help`)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval"):
        from .train import cli as train_cli

        return (train_cli.main_train if argv[0] == "train" else train_cli.main_eval)(argv[1:])
    args = parser().parse_args(argv)
    command = {"generate": cmd_generate, "chat": cmd_chat, "init": cmd_init}[args.command]
    return run_command(f"qwenvl {args.command}", command, args)


if __name__ == "__main__":
    sys.exit(main())
