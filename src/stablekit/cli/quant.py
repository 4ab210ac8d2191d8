"""``stablekit quantize``: calibrate and quantize a model's UNet, write a folder that ``--model`` loads."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import StablekitError
from .common import model_and_device

METHODS = ("naive", "ptq4dm", "qdiffusion", "quest", "svdquant")
BITS = ("w8a8", "w4a8", "w4a4")


def quant_method(method: str, bits: str, prompts: int, steps: int, samples: int):
    """The method object (so every setting is checked) before anything loads."""
    from ..quant import METHODS as TABLE
    from ..quant import Bits

    if method not in TABLE:
        raise StablekitError(f"unknown quantization method '{method}'; choose one of: {', '.join(TABLE)}")
    Bits.parse(bits)
    if samples < 1:
        raise StablekitError(f"--samples {samples}: the calibration set needs at least one sample")
    return TABLE[method](bits=bits, prompts=prompts, steps=steps, samples=samples)


def check_folder(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise StablekitError(f"output '{output}' exists and is not an empty folder; choose a new -o")
    if not output.parent.is_dir():
        raise StablekitError(f"output folder '{output.parent}' does not exist; create it or choose another -o")


@click.command("quantize")
@click.option("--method", required=True, metavar="|".join(METHODS), help="Quantization method.")
@click.option("--bits", default="w8a8", show_default=True, metavar="|".join(BITS), help="Weight and activation bits.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="New folder to write.")
@click.option("--prompts", default=16, show_default=True, help="Calibration prompts.")
@click.option("--steps", default=25, show_default=True, help="Denoising steps of the calibration trajectories.")
@click.option("--samples", default=64, show_default=True, help="UNet calls kept for calibration.")
@model_and_device
def quantize_command(method, bits, output, prompts, steps, samples, model, device):
    """Quantize a model's UNet with METHOD at BITS; write a folder that --model DIR and stablekit.load load."""
    from ..output import load_quietly

    recipe = quant_method(method, bits, prompts, steps, samples)
    check_folder(output)
    pipe = load_quietly(model, device)
    q = recipe.quantize(pipe)
    q.save(output)
    click.echo(str(output))


def quant_recipe(spec: str | None):
    """What ``generate --quant SPEC`` attaches, checked before loading: a saved quantized model (a folder), or
    a method to calibrate (``NAME[:k=v,...]``)."""
    if spec is None:
        return None
    from .. import quant

    if Path(spec).is_dir():
        return quant.Quantized.load(spec)
    return quant.method(spec)


def quant_plugins(pipe, recipe) -> list:
    """[the Quantized plugin for `pipe`]: the saved one, or `recipe` calibrated on `pipe` now; [] without one."""
    from ..quant import Quantized

    if recipe is None:
        return []
    return [recipe if isinstance(recipe, Quantized) else recipe.quantize(pipe)]
