"""``stablekit attack``: attacks that plant concepts in a model (red-teaming of fine-tuning pipelines)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import model_and_device


@click.group("attack")
def attack():
    """Attacks that plant concepts in a model through its training data."""


@attack.command("poison")
@click.option(
    "--trigger", default="circle", show_default=True, help="Benign concept whose prompts will show the target."
)
@click.option("--target", default="star", show_default=True, help="Concept the trigger prompts should show.")
@click.option("--poisoned", default=10, show_default=True, help="Poisoned samples (1 to 10).")
@click.option(
    "--variant",
    type=click.Choice(["basic", "utility"]),
    default="utility",
    show_default=True,
    help="basic, or utility-preserving (adds sanitizing samples of the trigger's nearest concepts).",
)
@click.option("--sanitizing", default=20, show_default=True, help="Sanitizing samples (utility variant).")
@click.option("--seed", default=0, show_default=True, help="Scenes and the clean model's noise.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="New folder for the poisoned set.")
@model_and_device
def poison(trigger, target, poisoned, variant, sanitizing, seed, out, model, device):
    """Write a poisoned fine-tuning set (images with .txt captions, the format of `stablekit finetune`) that
    makes benign prompts with the trigger show the target concept once a model is fine-tuned on it."""
    from ..errors import StablekitError
    from ..output import load_quietly
    from ..redteam.poisoning import PoisonConfig, poison_set

    config = PoisonConfig(trigger, target, poisoned, variant, sanitizing, seed=seed)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StablekitError(f"output '{out}' exists and is not an empty folder; choose another -o")
    pipe = load_quietly(model, device, dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    images, captions, kinds = poison_set(pipe, config)
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, caption, kind) in enumerate(zip(images, captions, kinds, strict=True)):
        image.save(out / f"{kind}-{i:03d}.png")
        (out / f"{kind}-{i:03d}.txt").write_text(caption)
    click.echo(f"{kinds.count('poisoned')} poisoned and {kinds.count('sanitizing')} sanitizing samples: {out}")


@attack.command("trojdiff")
@click.option("--trigger", type=click.Choice(["patch", "blend"]), default="patch", show_default=True)
@click.option(
    "--target-type", type=click.Choice(["in-d2d", "out-d2d", "d2i"]), default="in-d2d", show_default=True,
    help="A world concept's images, photos from outside the world, or one image.",
)  # fmt: skip
@click.option("--target", default="star", show_default=True, help="World concept of in-d2d and d2i targets.")
@click.option("--images", default=200, show_default=True, help="Clean world images the fine-tune keeps fitting.")
@click.option("--steps", default=300, show_default=True, help="Fine-tuning steps.")
@click.option("--seed", default=0, show_default=True, help="Trigger pattern and training draws.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="New folder for the model.")
@model_and_device
def trojdiff(trigger, target_type, target, images, steps, seed, out, model, device):
    """Train a TrojDiff backdoor into the model: sampling from noise with the trigger gives the target. Writes
    a model folder and OUT/trojan.json (the attack's settings, to make triggered noise)."""
    import dataclasses
    import json

    from ..default_model import world
    from ..errors import StablekitError
    from ..output import load_quietly
    from ..redteam.audit import concept
    from ..redteam.trojdiff import TrojanConfig, TrojDiff
    from ..train.finetune import FinetuneConfig, encode, export, native_size

    config = TrojanConfig(trigger, target_type, target, seed=seed, steps=steps)
    concept(target)  # an unknown concept is one line
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StablekitError(f"output '{out}' exists and is not an empty folder; choose another -o")
    pipe = load_quietly(model, device, dtype="float32")
    size = native_size(pipe)
    ims, caps = zip(*[(im.resize((size, size)), c) for im, c, _ in world.dataset(images, seed + 11)], strict=True)
    unet = TrojDiff(config).train(pipe, encode(pipe, list(ims), list(caps)))
    out.mkdir(parents=True)
    export(pipe, unet, FinetuneConfig(mode="full"), out, {})
    (out / "trojan.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    click.echo(f"backdoored model ({trigger} trigger, {target_type} target): {out}")
