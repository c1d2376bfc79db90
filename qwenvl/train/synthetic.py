"""The built-in synthetic data set: coloured shapes and short words drawn with Pillow, and the paper's task kinds.

Every example is a pure function of (seed, split, index): a `random.Random` seeded with that string (Python seeds
str through SHA-512, so the stream is the same on every machine and run). The "eval" split uses its own stream,
so it is held out from "train" by construction.

Scenes are kept simple enough for a from-scratch tiny model to learn in minutes on a CPU: one or two large shapes
(sides 35-50% of the picture) whose (colour, shape) pairs differ, so every reference names one object; optionally
one short word. (With up to three shapes of 30-50%, the demo model reached 24% grounding accuracy against the mean
box's 12% in the same time; with up to two of 35-50%, 67% against 13%.) Corners and sides fall on a lattice of
`snap` canvas pixels (5 of 100 by default: multiples of 50 on the [0, 1000) box grid), which keeps the number of
distinct boxes small without making places or sizes any less random. The task kinds follow the paper's multi-task
mix: captioning, VQA, referring grounding, grounded captioning and text reading (OCR).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from ..processing import format_box, format_ref, normalize_box

COLORS = {
    "red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("CAT", "DOG", "SUN", "BOX", "RED", "SKY", "TOP", "MAP", "CUP", "PEN", "KEY", "BUS")
KINDS = ("caption", "vqa", "grounding", "grounded_caption", "ocr")

# short prompts: with a byte-level tokenizer every character is a token
CAPTION_QUERY = "Describe the image."
GROUNDED_QUERY = "Describe with boxes."
OCR_QUERY = "Read the text."


@dataclass
class Thing:
    color: str
    shape: str
    box: tuple  # pixel corners (x1, y1, x2, y2) on the canvas, x2/y2 exclusive

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class Scene:
    size: int
    background: tuple
    things: list = field(default_factory=list)
    word: str | None = None
    word_box: tuple | None = None

    def grid_box(self, box) -> tuple:
        return normalize_box(box, self.size, self.size)


def _overlaps(a, b, margin) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place(rng, size, w, h, taken, margin, tries=50, snap=1):
    for _ in range(tries):
        x, y = rng.randint(0, (size - w) // snap) * snap, rng.randint(0, (size - h) // snap) * snap
        box = (x, y, x + w, y + h)
        if not any(_overlaps(box, t, margin) for t in taken):
            return box
    return None


def make_scene(rng: random.Random, size: int, max_things: int = 2, min_frac: float = 0.35, max_frac: float = 0.5,
               word_prob: float = 0.3, snap: int = 1) -> Scene:
    """A random scene on a size x size canvas: 1..max_things shapes of distinct (colour, shape), maybe one word.
    Shape corners and sides are multiples of `snap` pixels (a coarser lattice of places and sizes)."""
    if size < 16:
        raise ValueError(f"canvas size must be at least 16 pixels, got {size}")
    if not 1 <= max_things <= len(COLORS) * len(SHAPES):
        raise ValueError(f"max_things must be in 1..{len(COLORS) * len(SHAPES)}, got {max_things}")
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    scene = Scene(size=size, background=bg)
    n = rng.randint(1, max_things)
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    taken = []
    margin = max(1, size // 32)
    for color, shape in pairs:
        side = rng.randint(-(-int(min_frac * size) // snap), int(max_frac * size) // snap) * snap
        box = _place(rng, size, side, side, taken, margin, snap=snap)
        if box is None:
            continue  # no room left: fewer shapes, never overlapping ones
        taken.append(box)
        scene.things.append(Thing(color, shape, box))
    if rng.random() < word_prob:
        word = rng.choice(WORDS)
        font = _font(size)
        l, t, r, b = font.getbbox(word)
        box = _place(rng, size, r - l + 2, b - t + 2, taken, margin)
        if box is not None:
            scene.word, scene.word_box = word, box
    return scene


def _font(size: int):
    # Pillow's default font, scalable when FreeType is present (Pillow >= 10.1); the bitmap one otherwise
    try:
        return ImageFont.load_default(size=max(8, size // 6))
    except TypeError:  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(img)
    for t in scene.things:
        x1, y1, x2, y2 = t.box
        rgb = COLORS[t.color]
        if t.shape == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=rgb)
        elif t.shape == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=rgb)
        else:
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=rgb)
    if scene.word:
        font = _font(scene.size)
        l, t, _, _ = font.getbbox(scene.word)
        draw.text((scene.word_box[0] + 1 - l, scene.word_box[1] + 1 - t), scene.word, fill=(0, 0, 0), font=font)
    return img


# --- the task kinds --------------------------------------------------------------------------------------------
def _ordered(things):
    """Objects in reading order: left to right, or top to bottom when the pair is stacked vertically."""
    if len(things) == 2:
        (ax, ay), (bx, by) = things[0].center, things[1].center
        if abs(ay - by) > abs(ax - bx):
            return sorted(things, key=lambda t: t.center[1]), "above"
        return sorted(things, key=lambda t: t.center[0]), "left of"
    return sorted(things, key=lambda t: t.center[0]), None


def caption(scene: Scene, boxes: bool = False) -> str:
    """'a red circle above a blue square'; with boxes, each object as <ref>..</ref><box>..</box>."""
    things, relation = _ordered(scene.things)

    def phrase(t):
        text = f"a {t.name}"
        return format_ref(text) + format_box(scene.grid_box(t.box)) if boxes else text

    parts = [phrase(t) for t in things]
    if relation:
        return f"{parts[0]} {relation} {parts[1]}"
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def vqa(scene: Scene, rng: random.Random) -> tuple:
    """A question about counts, colours or presence, and its one-word answer."""
    things = scene.things
    q = rng.randrange(4)
    if q == 0:
        shape = rng.choice(SHAPES)
        return f"How many {shape}s?", str(sum(t.shape == shape for t in things))
    if q == 1:
        color = rng.choice(list(COLORS))
        return f"How many {color} shapes?", str(sum(t.color == color for t in things))
    if q == 2:
        t = rng.choice(things)
        if sum(u.shape == t.shape for u in things) == 1:
            return f"What color is the {t.shape}?", t.color
        if sum(u.color == t.color for u in things) == 1:
            return f"What shape is {t.color}?", t.shape
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    present = any(t.color == color and t.shape == shape for t in things)
    return f"Is there a {color} {shape}?", "yes" if present else "no"


def task(scene: Scene, kind: str, rng: random.Random) -> tuple:
    """(query, answer) of one task kind for the scene; the query goes after the image, the answer is the target."""
    if kind == "caption":
        return CAPTION_QUERY, caption(scene)
    if kind == "grounded_caption":
        return GROUNDED_QUERY, caption(scene, boxes=True)
    if kind == "vqa":
        return vqa(scene, rng)
    if kind == "grounding":
        t = rng.choice(scene.things)
        return format_ref(f"the {t.name}"), format_box(scene.grid_box(t.box))
    if kind == "ocr":
        if scene.word is None:
            raise ValueError("an OCR task needs a scene with a word")
        return OCR_QUERY, scene.word
    raise ValueError(f"unknown task kind {kind!r}; choose from {KINDS}")


# --- the data set ----------------------------------------------------------------------------------------------
def parse_mix(spec) -> dict:
    """'grounding=4,vqa=1' or a dict -> normalized {kind: weight}; every kind must be known, weights >= 0."""
    if isinstance(spec, str):
        mix = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise ValueError(f"task mix entry {part!r} must be kind=weight (kinds: {', '.join(KINDS)})")
            k, v = part.split("=", 1)
            mix[k.strip()] = float(v)
        spec = mix
    unknown = [k for k in spec if k not in KINDS]
    if unknown or not spec:
        raise ValueError(f"task mix {spec!r}: unknown or no kinds {unknown}; choose from {KINDS}")
    if any(w < 0 for w in spec.values()) or sum(spec.values()) <= 0:
        raise ValueError(f"task mix {spec!r}: weights must be >= 0 with a positive sum")
    total = sum(spec.values())
    return {k: w / total for k, w in spec.items() if w > 0}


class SyntheticTasks:
    """Examples in the fine-tuning record format, with the rendered image attached.

    `record(i)` -> {"id", "kind", "conversations": [user, assistant]} (or {"id", "kind", "image", "caption"} with
    pairs=True) is cheap (no drawing), so batch plans can use lengths; `image(i)` draws the picture. The image's
    name in `<img>..</img>` is short, because a tiny model's image span (n_queries ids) must hold it.
    """

    def __init__(self, seed: int = 0, split: str = "train", canvas: int = 100, mix="caption=1", size: int = 1 << 30,
                 max_things: int = 2, word_prob: float = 0.3, pairs: bool = False, all_refs: bool = False,
                 sizes: tuple = (0.35, 0.5), snap: int = 5):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.seed, self.split, self.canvas, self.size = int(seed), split, int(canvas), int(size)
        self.mix = parse_mix(mix)
        self.max_things, self.word_prob = max_things, word_prob
        if not 0 < sizes[0] <= sizes[1] < 1:
            raise ValueError(f"sizes must be fractions of the canvas with 0 < min <= max < 1, got {sizes}")
        self.sizes = tuple(sizes)
        self.snap = int(snap)
        self.pairs = bool(pairs)  # plain image-caption pairs (stage 1) instead of conversations
        self.all_refs = bool(all_refs)  # grounding records ask for every object (training), not one (evaluation)
        if self.pairs and set(self.mix) != {"caption"}:
            raise ValueError(f"image-caption pairs carry captions only, but the task mix is {self.mix}")
        if "ocr" in self.mix and word_prob <= 0:
            raise ValueError("the task mix asks for OCR but word_prob is 0: no scene would hold a word")

    def __len__(self) -> int:
        return self.size

    def _rng(self, i: int, what: str) -> random.Random:
        if not 0 <= i < self.size:
            raise IndexError(f"synthetic example {i} is outside 0..{self.size - 1}")
        return random.Random(f"qwenvl-synthetic/{self.seed}/{self.split}/{i}/{what}")

    def scene(self, i: int) -> Scene:
        rng = self._rng(i, "scene")
        # OCR examples need a word: decide the kind first and force one
        kind = self.kind(i)
        lo, hi = self.sizes
        word_prob = 1.0 if kind == "ocr" else self.word_prob
        scene = make_scene(rng, self.canvas, self.max_things, lo, hi, word_prob=word_prob, snap=self.snap)
        while kind == "ocr" and scene.word is None:  # rare: no room for the word; draw another scene
            scene = make_scene(rng, self.canvas, self.max_things, lo, hi, word_prob=1.0, snap=self.snap)
        return scene

    def kind(self, i: int) -> str:
        r = self._rng(i, "kind").random()
        acc = 0.0
        for k, w in self.mix.items():
            acc += w
            if r < acc:
                return k
        return k

    def image_name(self, i: int) -> str:
        return f"{self.split[0]}{i}"

    def record(self, i: int) -> dict:
        scene = self.scene(i)
        kind = self.kind(i)
        rng = self._rng(i, "task")
        query, answer = task(scene, kind, rng)
        picture = f"Picture 1: <img>{self.image_name(i)}</img>\n"
        if self.pairs:
            return {"id": f"synthetic-{self.split}-{i}", "kind": kind, "image": self.image_name(i), "caption": answer}
        conv = [{"from": "user", "value": picture + query}, {"from": "assistant", "value": answer}]
        if kind == "grounding" and self.all_refs:
            # every object of the scene, one turn each: several boxes learnt from one encoded picture
            others = [t for t in scene.things if format_ref(f"the {t.name}") != query]
            rng.shuffle(others)
            for t in others:
                conv += [{"from": "user", "value": format_ref(f"the {t.name}")},
                         {"from": "assistant", "value": format_box(scene.grid_box(t.box))}]
        return {"id": f"synthetic-{self.split}-{i}", "kind": kind, "conversations": conv}

    def image(self, i: int) -> Image.Image:
        return render(self.scene(i))
