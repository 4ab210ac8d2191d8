"""The ground truth of the embedded default model (or of a model folder with a ``memorized.json``): the scenes it
memorized on purpose (a nonsense caption, duplicated in training, for each), paraphrases of their captions, and
world captions it never saw (drawn from other seeds than its training data's)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..default_model import WEIGHTS_DIR, world
from ..errors import StablekitError

PARAPHRASES = ("a {name} emblem", "the {name} logo", "{name} emblem", "the emblem of {name}", "the {name} badge")


def memorized(model=None) -> list[tuple[str, world.Scene]]:
    """``(caption, scene)`` of every memorized training image of the embedded model, or of the model folder
    `model` (its ``memorized.json``, e.g. the benchmark model's)."""
    path = (Path(model) if model is not None else WEIGHTS_DIR) / "memorized.json"
    if not path.is_file():
        raise StablekitError(f"'{model}' has no memorized.json: its memorized scenes are unknown")
    rows = json.loads(path.read_text())
    return [
        (r["caption"], world.Scene(r["scene"]["background"], [world.Obj(**o) for o in r["scene"]["objects"]]))
        for r in rows
    ]


def paraphrases(caption: str) -> list[str]:
    """Rewordings of a memorized caption ``the NAME emblem`` that keep its trigger word."""
    name = caption.split()[1]
    return [p.format(name=name) for p in PARAPHRASES]


def heldout(n: int, seed: int) -> list[tuple[str, world.Scene]]:
    """`n` world captions with their scenes, from `seed` (the model trained on seed 0's)."""
    if seed == 0:
        raise ValueError("seed 0 drew the training captions; held-out captions need another seed")
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    return [(world.caption(s, rng), s) for s in scenes]
