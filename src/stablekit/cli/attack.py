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
