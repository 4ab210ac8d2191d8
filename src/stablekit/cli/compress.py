"""``stablekit compress``: a smaller UNet of a model (layers removed, retrained by distillation) as a model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..errors import StablekitError
from .common import given, model_and_device, refuse

METHODS = ("laptop", "koala", "ldpruner")


@click.command("compress")
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="laptop",
    show_default=True,
    help="laptop (LAPTOP-Diff: layers pruned by the one-shot output-loss criterion, normalised feature "
    "distillation), koala (KOALA's hand-designed smaller UNet, self-attention distillation) or ldpruner "
    "(LD-Pruner: operators pruned by their effect on the latents' statistics, short retraining).",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The model folder to write.")
@click.option(
    "--ratio",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="laptop, ldpruner: share of the UNet's multiply-accumulates to remove.",
)
@click.option("--images", type=click.IntRange(min=1), default=2048, show_default=True, help="World renders.")
@click.option("--iterations", type=click.IntRange(min=1), default=400, show_default=True, help="Retraining steps.")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Training batch.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True, help="AdamW lr.")
@click.option("--seed", default=0, show_default=True, help="Seed of the renders, noise and batches.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep finished stages (layer scores, retrained weights) here; a re-run resumes [default: OUTPUT.work, "
    "removed at the end].",
)
@model_and_device
def compress_command(method, output, model, device, ratio, workdir, **retrain):
    """Compress a model's UNet by removing layers and distilling; print the folder written."""
    from ..output import load_quietly
    from ..train import compress, koala, laptop_diff, ld_pruner

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise StablekitError(f"output '{output}' exists and is not an empty folder; choose another -o or remove it")
    if method == "koala":
        refuse(given("ratio"), "to --method koala: its smaller UNet is a fixed design")
    settings = compress.Retrain(**retrain)
    config = {
        "laptop": lambda: laptop_diff.Config(ratio=ratio, retrain=settings),
        "koala": lambda: koala.Config(retrain=settings),
        "ldpruner": lambda: ld_pruner.Config(ratio=ratio, retrain=settings),
    }[method]()
    pipe = load_quietly(model, device, dtype="float32")
    compress.check_teacher(pipe)
    work = workdir or output.with_name(output.name + ".work")
    module = {"laptop": laptop_diff, "koala": koala, "ldpruner": ld_pruner}[method]
    student, recipe = module.distill(pipe, config, workdir=work)
    recipe["teacher"] = model or "stablekit-default"
    compress.save(pipe, student, output, recipe)
    if workdir is None:
        shutil.rmtree(work)
    click.echo(str(output))
