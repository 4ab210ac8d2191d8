"""``stablekit memorization``: detect memorized prompts, and write adapters that remove memorized images."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import StablekitError
from .common import check_output, model_and_device

REFERENCE_SEED = 2026  # the world captions that memorized prompts are contrasted with


@click.group("memorization")
def memorization():
    """Detect memorized prompts; remove memorized images with an adapter."""


@memorization.command("detect")
@click.argument("prompts", nargs=-1, metavar="PROMPT...")
@click.option("--steps", default=1, show_default=True, help="First denoising steps measured.")
@click.option(
    "--start",
    default=0,
    show_default=True,
    help="First measured step, from 0 (1 skips a zero-terminal-SNR model's first step, as the embedded model's).",
)
@click.option("--generations", default=1, show_default=True, help="Seeds averaged per prompt.")
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Decision threshold on the score [default: the one fixed for the embedded model on held-out captions].",
)
@click.option("--seed", default=0, show_default=True)
@model_and_device
def detect_command(prompts, steps, start, generations, threshold, seed, model, device):
    """Score each PROMPT by its text-conditional noise magnitude; print score, decision and prompt."""
    from .. import memorization as M
    from ..output import load_quietly

    if not prompts or not all(p.strip() for p in prompts):
        raise StablekitError(
            'no prompt given (or an empty one); e.g. stablekit memorization detect "the zorvex emblem"'
        )
    if steps < 1 or generations < 1 or start < 0:
        raise StablekitError("--steps and --generations must be at least 1, --start at least 0")
    if threshold is None and model is not None:
        raise StablekitError("--threshold is needed with --model: the shipped one is the embedded model's")
    if threshold is None:
        M.shipped_threshold(steps, start)  # a missing one is refused before loading
    pipe = load_quietly(model, device)
    pipe.set_progress_bar_config(disable=True)
    for d in M.detect(pipe, list(prompts), threshold, steps=steps, start=start, generations=generations, seed=seed):
        click.echo(f"{d.score:.4f}\t{'memorized' if d.memorized else 'not memorized'}\t{d.prompt}")


@memorization.command("mitigate")
@click.option(
    "--method",
    required=True,
    type=click.Choice(["subspace", "nemo", "memcontrol"]),
    help="subspace: prune the feed-forward neurons memorized prompts share (a 2024 paper); "
    "nemo: prune their cross-attention value neurons (NeMo, NeurIPS 2024); "
    "memcontrol: search which parameters to fine-tune, then fine-tune them (MemControl, 2024).",
)
@click.option(
    "--memorized",
    "memorized_prompts",
    multiple=True,
    help="A memorized prompt (repeatable) [default: the embedded model's memorized captions].",
)
@click.option(
    "--reference",
    "reference_prompts",
    multiple=True,
    help="A non-memorized prompt to contrast with (repeatable) [default: 100 of the embedded model's world captions].",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="safetensors file to write.")
@model_and_device
def mitigate(method, memorized_prompts, reference_prompts, output, model, device):
    """Locate where the model stores memorized images and write the adapter that prunes it (`generate --adapter`)."""
    from .. import memorization as M
    from ..output import load_quietly, write_atomically

    check_output(output, "adapter.safetensors")
    if model is not None and not (memorized_prompts and reference_prompts):
        raise StablekitError("with --model, give the --memorized prompts and the --reference prompts")
    if any(not p.strip() for p in memorized_prompts + reference_prompts):
        raise StablekitError("--memorized and --reference prompts must not be empty")
    mem = list(memorized_prompts) or [c for c, _ in M.ground_truth.memorized()]
    ref = list(reference_prompts) or [c for c, _ in M.ground_truth.heldout(100, REFERENCE_SEED)]
    if len(ref) < (4 if method == "memcontrol" else 2):
        raise StablekitError(f"give at least {4 if method == 'memcontrol' else 2} --reference prompts")
    pipe = load_quietly(model, device, dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    make = {"subspace": M.prune, "nemo": M.localize, "memcontrol": M.memcontrol}[method]
    edit = make(pipe, mem, ref)
    write_atomically(output, edit.save)
    click.echo(str(output))
