"""Stand-in for the released tokenization_qwen.py at a tiny vocabulary: bytes are ids 0..255 (as the released
tokenizer writes an image path's bytes), then the special tokens in the released order. `<img>path</img>` becomes
`<img>`, the path's bytes, `<imgpad>` up to `image_span` ids, `</img>`."""
import re

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<ref>", "</ref>", "<box>", "</box>", "<quad>",
            "</quad>", "<img>", "</img>", "<imgpad>"]
FIRST_SPECIAL = 256


class QWenTokenizer:
    IMAGE_ST = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")

    def __init__(self, image_span):
        self.image_span = image_span
        self.special_tokens = {s: FIRST_SPECIAL + i for i, s in enumerate(SPECIALS)}
        self.eod_id = self.special_tokens["<|endoftext|>"]
        self.im_start_id = self.special_tokens["<|im_start|>"]
        self.im_end_id = self.special_tokens["<|im_end|>"]
        self.img_start_id = self.special_tokens["<img>"]
        self.img_end_id = self.special_tokens["</img>"]
        self.img_pad_id = self.special_tokens["<imgpad>"]
        self._split = re.compile("(<img>.*?</img>|" + "|".join(re.escape(s) for s in SPECIALS) + ")", re.S)

    def encode(self, text, allowed_special="all", **kwargs):
        ids = []
        for piece in self._split.split(text):
            if piece.startswith("<img>") and piece.endswith("</img>") and len(piece) > 11:
                path = list(piece[5:-6].encode("utf-8"))
                if len(path) > self.image_span:
                    raise ValueError("The content in <img>..</img> is too long")
                ids += [self.img_start_id] + path + [self.img_pad_id] * (self.image_span - len(path)) + [self.img_end_id]
            elif piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            else:
                ids += list(piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens=False, errors="replace", **kwargs):
        names = {v: k for k, v in self.special_tokens.items()}
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors=errors))
            pending = bytearray()
            if not skip_special_tokens and i in names and i != self.img_pad_id:
                out.append(names[i])
        out.append(pending.decode("utf-8", errors=errors))
        return "".join(out)

    def from_list_format(self, list_format):
        text, n = "", 0
        for item in list_format:
            if "image" in item:
                n += 1
                text += f"Picture {n}: <img>{item['image']}</img>\n"
            elif "text" in item:
                text += item["text"]
        return text
