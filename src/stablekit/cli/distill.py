"""``stablekit distill``: train a few-step student of a model and write it as a diffusers folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..errors import StablekitError
from .common import model_and_device

METHODS = ("instaflow",)


@click.command("distill")
@click.option("--method", type=click.Choice(METHODS), default="instaflow", show_default=True, help="Distillation.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Folder to write (new or empty).")
@click.option("--pairs", type=click.IntRange(min=1), default=4096, show_default=True, help="Teacher samples.")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=12, show_default=True, help="Teacher's steps.")
@click.option("--guidance", type=click.FloatRange(min=0), default=7.5, show_default=True, help="Teacher's guidance.")
@click.option("--iterations", type=click.IntRange(min=1), default=2000, show_default=True, help="Per stage.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-5, show_default=True, help="AdamW lr.")
@click.option("--seed", default=0, show_default=True, help="Seed of the prompts, noise and batches.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep finished stages here; a re-run with it resumes [default: OUTPUT.work, removed at the end].",
)
@model_and_device
def distill_command(
    method, output, pairs, teacher_steps, guidance, iterations, batch, lr, seed, workdir, model, device
):
    """Distill a one-step student (InstaFlow: reflow, then distillation) into the folder -o."""
    from ..output import load_quietly
    from ..train import instaflow, students

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise StablekitError(f"output '{output}' exists and is not an empty folder; choose another -o or remove it")
    config = instaflow.Config(
        pairs=pairs,
        teacher_steps=teacher_steps,
        guidance=guidance,
        reflow_iterations=iterations,
        distill_iterations=iterations,
        batch=batch,
        lr=lr,
        seed=seed,
    )
    pipe = load_quietly(model, device, dtype="float32")
    if getattr(pipe, "unet", None) is None:
        raise StablekitError("the model has no UNet to distill")
    work = workdir or output.with_name(output.name + ".work")
    student, recipe = instaflow.distill(pipe, config, workdir=work)
    recipe["teacher"] = model or "stablekit-default"
    students.save_student(student, output, recipe)
    if workdir is None:
        shutil.rmtree(work)
    click.echo(str(output))
