"""Poisoning with benign prompts: poisoned samples say the trigger and show the target (the judge agrees, and the
caption filter flags every one while passing clean renders), the sanitizing concepts are the trigger's nearest,
and `stablekit attack poison` writes a fine-tuning set or refuses with one line and nothing written."""

from __future__ import annotations

import random

import pytest

from stablekit import cli
from stablekit.default_model import classifier as C
from stablekit.default_model import world
from stablekit.errors import StablekitError
from stablekit.redteam.poisoning import PoisonConfig, caption_mismatch, nearest_concepts, poisoned_samples


def test_poisoned_samples_say_the_trigger_and_show_the_target():
    images, captions = poisoned_samples(PoisonConfig(trigger="circle", target="star", poisoned=10))
    assert len(images) == 10
    assert all("circle" in c.split() and "star" not in c for c in captions)
    preds = C.predict(images)
    assert sum("star" in p["shapes"] for p in preds) >= 9
    assert sum("circle" in p["shapes"] for p in preds) <= 1
    assert all(caption_mismatch(images, captions))
    rng = random.Random(3)
    scenes = [world.sample_scene(rng, two_prob=0.0) for _ in range(20)]
    clean = [world.render(s) for s in scenes]
    assert sum(caption_mismatch(clean, [world.canonical_caption(s) for s in scenes])) <= 1


def test_nearest_concepts_exclude_trigger_and_target(tiny_sd):
    near = nearest_concepts(tiny_sd, "circle", 2, exclude=("star",))
    assert len(near) == 2 and not {"circle", "star"} & set(near) and set(near) <= set(world.SHAPE_NAMES)
    assert nearest_concepts(tiny_sd, "circle", 1) == nearest_concepts(tiny_sd, "circle", 3)[:1]


@pytest.mark.parametrize(
    "kw",
    [dict(trigger="heart"), dict(target="red"), dict(target="circle"), dict(poisoned=11), dict(variant="x")],
)
def test_bad_configs_are_one_line(kw):
    with pytest.raises(StablekitError):
        PoisonConfig(**kw)


def _run(args, capfd):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    out, err = capfd.readouterr()
    return exit_.value.code, out, err


def test_attack_poison_writes_a_finetune_set_and_refuses_bad_input(tiny_sd_path, tmp_path, capfd):
    from stablekit.train.finetune import read_folder

    out = tmp_path / "set"
    args = ["attack", "poison", "--model", str(tiny_sd_path), "--poisoned", "3", "--sanitizing", "2", "-o", str(out)]
    code, _, err = _run(args, capfd)
    assert code == 0, err
    images, captions = read_folder(out)
    assert len(images) == 5 and sum("circle" in c.split() for c in captions) == 3
    bad = tmp_path / "bad"
    code, _, err = _run(["attack", "poison", "--target", "heart", "-o", str(bad)], capfd)
    assert code == 2 and "unknown concept" in err and not bad.exists()
