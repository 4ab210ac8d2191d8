"""The synthetic world the embedded default model is trained on.

Scenes of one or two flat shapes (5 shapes, 8 colours, 3 fill textures, random size, rotation
and position) on one of 4 backgrounds, drawn anti-aliased with PIL, each with a caption that
uses paraphrases ("crimson" for red, "five-pointed star" for star). Every scene is fully
described by a :class:`Scene`, so evaluation knows the exact attributes and object masks.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SS = 4  # supersampling factor for anti-aliasing

SHAPES = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "three-sided shape", "wedge"],
    "star": ["star", "five-pointed star", "starburst"],
    "cross": ["cross", "plus sign", "plus"],
}
COLORS = {
    "red": ((220, 30, 35), ["red", "crimson", "scarlet"]),
    "orange": ((245, 135, 20), ["orange", "tangerine", "amber"]),
    "yellow": ((240, 220, 30), ["yellow", "golden", "lemon"]),
    "green": ((35, 165, 60), ["green", "emerald", "grass-green"]),
    "blue": ((40, 85, 225), ["blue", "azure", "cobalt"]),
    "purple": ((135, 45, 185), ["purple", "violet", "lavender"]),
    "pink": ((250, 135, 195), ["pink", "rose", "salmon-pink"]),
    "white": ((245, 245, 245), ["white", "ivory", "snow-white"]),
}
BACKGROUNDS = {
    "gray": ((125, 125, 125), ["gray", "grey", "slate"]),
    "black": ((18, 18, 18), ["black", "jet-black", "dark"]),
    "beige": ((222, 204, 160), ["beige", "sand-coloured", "cream"]),
    "navy": ((22, 32, 88), ["navy", "dark blue", "midnight blue"]),
}
TEXTURES = {
    "solid": ["solid", "plain", ""],
    "striped": ["striped", "stripy", "banded"],
    "dotted": ["dotted", "spotted", "polka-dot"],
}
SHAPE_NAMES, COLOR_NAMES = list(SHAPES), list(COLORS)
BACKGROUND_NAMES, TEXTURE_NAMES = list(BACKGROUNDS), list(TEXTURES)


@dataclass
class Obj:
    shape: str
    color: str
    texture: str
    cx: float  # centre, pixels
    cy: float
    r: float  # outer radius, pixels
    angle: float  # degrees


@dataclass
class Scene:
    background: str
    objects: list[Obj] = field(default_factory=list)


def sample_scene(rng: random.Random, two_prob: float = 0.25) -> Scene:
    """Draw a random scene; one object, or two side by side with probability `two_prob`."""
    bg = rng.choice(BACKGROUND_NAMES)
    n = 2 if rng.random() < two_prob else 1
    objs = []
    for i in range(n):
        r = rng.uniform(11, 19) if n == 1 else rng.uniform(8, 12)
        if n == 1:
            cx, cy = rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1)
        else:  # first object in the left half, second in the right half
            cx = rng.uniform(r + 1, SIZE / 2 - 1) if i == 0 else rng.uniform(SIZE / 2 + 1, SIZE - r - 1)
            cy = rng.uniform(r + 1, SIZE - r - 1)
        objs.append(
            Obj(
                rng.choice(SHAPE_NAMES),
                rng.choice(COLOR_NAMES),
                rng.choice(TEXTURE_NAMES),
                cx,
                cy,
                r,
                rng.uniform(-15, 15),
            )
        )
    return Scene(bg, objs)


def _polygon(obj: Obj) -> list[tuple[float, float]] | None:
    """Outline of the shape in supersampled pixel coordinates (None for a circle)."""
    s, a0 = obj.r * _SS, math.radians(obj.angle)
    if obj.shape == "circle":
        return None
    if obj.shape == "square":
        pts = [
            (math.cos(a0 + math.pi / 4 + k * math.pi / 2), math.sin(a0 + math.pi / 4 + k * math.pi / 2))
            for k in range(4)
        ]
        pts = [(x * 0.92, y * 0.92) for x, y in pts]
    elif obj.shape == "triangle":
        pts = [
            (math.cos(a0 - math.pi / 2 + k * 2 * math.pi / 3), math.sin(a0 - math.pi / 2 + k * 2 * math.pi / 3))
            for k in range(3)
        ]
    elif obj.shape == "star":
        pts = [
            (
                (1.0 if k % 2 == 0 else 0.42) * math.cos(a0 - math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.42) * math.sin(a0 - math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    else:  # cross: a plus sign with arms of half-width 0.33
        w = 0.33
        base = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
        ca, sa = math.cos(a0), math.sin(a0)
        pts = [(x * ca - y * sa, x * sa + y * ca) for x, y in base]
    return [(obj.cx * _SS + x * s, obj.cy * _SS + y * s) for x, y in pts]


def object_mask(obj: Obj, size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage mask of one object in [0, 1], shape (size, size)."""
    big = Image.new("L", (size * _SS, size * _SS), 0)
    d = ImageDraw.Draw(big)
    poly = _polygon(obj)
    if poly is None:
        c, r = obj.cx * _SS, obj.r * _SS
        d.ellipse([c - r, obj.cy * _SS - r, c + r, obj.cy * _SS + r], fill=255)
    else:
        d.polygon(poly, fill=255)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _fill(obj: Obj) -> np.ndarray:
    """The object's fill colour field (SIZE, SIZE, 3): plain, stripes or dots of a darker shade."""
    base = np.array(COLORS[obj.color][0], dtype=np.float32)
    dark = base * 0.5
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if obj.texture == "striped":
        sel = np.floor((yy - obj.cy) / 3.0) % 2 == 0
    elif obj.texture == "dotted":
        sel = ~((((xx - obj.cx) % 6) - 3) ** 2 + (((yy - obj.cy) % 6) - 3) ** 2 <= 2.0)
    else:
        sel = np.ones((SIZE, SIZE), bool)
    return np.where(sel[..., None], base, dark)


def render(scene: Scene, noise_rng: np.random.Generator | None = None) -> Image.Image:
    """Draw the scene as a SIZE x SIZE RGB image, with faint sensor noise if a generator is given."""
    img = np.broadcast_to(np.array(BACKGROUNDS[scene.background][0], np.float32), (SIZE, SIZE, 3)).copy()
    for obj in scene.objects:
        m = object_mask(obj)[..., None]
        img = img * (1 - m) + _fill(obj) * m
    if noise_rng is not None:
        img = img + noise_rng.normal(0, 3.0, img.shape)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def _pos_phrase(obj: Obj) -> str:
    h = "left" if obj.cx < SIZE / 3 else "right" if obj.cx > 2 * SIZE / 3 else ""
    v = "top" if obj.cy < SIZE / 3 else "bottom" if obj.cy > 2 * SIZE / 3 else ""
    if not h and not v:
        return " in the center"
    return " in the " + " ".join(w for w in (v, h) if w)


def _obj_words(obj: Obj, rng: random.Random) -> str:
    tex = rng.choice(TEXTURES[obj.texture])
    words = [tex, rng.choice(COLORS[obj.color][1]), rng.choice(SHAPES[obj.shape])]
    return " ".join(w for w in words if w)


def caption(scene: Scene, rng: random.Random) -> str:
    """A natural-language caption with paraphrases; position is mentioned half of the time."""
    bg = rng.choice(BACKGROUNDS[scene.background][1])
    objs = [_obj_words(o, rng) for o in scene.objects]
    if len(objs) == 1:
        pos = _pos_phrase(scene.objects[0]) if rng.random() < 0.5 else ""
        art = "an" if objs[0][0] in "aeiou" else "a"
        templates = [
            f"{art} {objs[0]} on a {bg} background{pos}",
            f"{objs[0]} against a {bg} backdrop{pos}",
            f"a picture of {art} {objs[0]}{pos}, {bg} background",
            f"{bg} background with {art} {objs[0]}{pos}",
        ]
    else:
        a, b = objs
        side = rng.random() < 0.5
        a2 = f"{a} on the left" if side else a
        b2 = f"{b} on the right" if side else b
        templates = [
            f"a {a2} and a {b2} on a {bg} background",
            f"{a2} and {b2} against a {bg} backdrop",
            f"{bg} background with a {a2} and a {b2}",
        ]
    return rng.choice(templates)


def canonical_caption(scene: Scene) -> str:
    """The plain, paraphrase-free caption of a scene (used for evaluation prompts)."""
    objs = [
        " ".join(w for w in (("" if o.texture == "solid" else o.texture), o.color, o.shape) if w)
        for o in scene.objects
    ]
    return (
        " and a ".join(f"a {o}" if i == 0 else o for i, o in enumerate(objs)) + f" on a {scene.background} background"
    )


def labels(scene: Scene) -> dict[str, int | list[int]]:
    """Class indices for the attribute classifier (first object for the single-label heads)."""
    return {
        "background": BACKGROUND_NAMES.index(scene.background),
        "shape": [SHAPE_NAMES.index(o.shape) for o in scene.objects],
        "color": [COLOR_NAMES.index(o.color) for o in scene.objects],
        "texture": [TEXTURE_NAMES.index(o.texture) for o in scene.objects],
    }


def dataset(n: int, seed: int, two_prob: float = 0.25):
    """`n` (image, caption, scene) triples, reproducible from `seed`."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    for _ in range(n):
        sc = sample_scene(rng, two_prob)
        yield render(sc, nrng), caption(sc, rng), sc
