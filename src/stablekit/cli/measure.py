"""``stablekit cs``: compressed sensing, measure an image at a sampling ratio and reconstruct it with the model."""

from __future__ import annotations

from pathlib import Path

import click

from .common import check_output, model_and_device
from .defaults import CS


@click.command("cs")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the PNG.")
@click.option("--ratio", type=float, default=0.1, show_default=True, help="Measured numbers per pixel value.")
@click.option(
    "--operator",
    type=click.Choice(["gaussian", "pixels"]),
    default="gaussian",
    show_default=True,
    help="gaussian: random orthonormal measurements of 8x8 cells; pixels: random 2x2-pixel cells.",
)
@click.option("--active", is_flag=True, help="Choose the pixel cells during sampling (Active Diffusion Subsampling).")
@click.option("--steps", type=int, default=CS["steps"], show_default=True, help="Sampling steps.")
@click.option("--particles", type=int, default=CS["particles"], show_default=True, help="Posterior samples averaged.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the measurements and the noise.")
@model_and_device
def cs_command(image, output, ratio, operator, active, steps, particles, seed, model, device):
    """Measure IMAGE with random linear measurements at --ratio and reconstruct it; print the written path."""
    from .. import __version__
    from ..output import save_png
    from ..pipeline import load
    from ..restore.compressed_sensing import CSConfig, check_request, sense_image
    from ..restore.super_resolution import open_image

    check_output(output)
    config = CSConfig(steps=steps, particles=particles, seed=seed)
    picture = open_image(image)
    check_request(picture, ratio, operator, active, config)
    pipe = load(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    result, measured, calls = sense_image(pipe, picture, ratio, operator, active, config)
    meta = {"stablekit": __version__, "cs": operator, "active": active, "ratio": measured, "seed": seed}
    save_png(result, output, meta | {"source": image.name, "network_calls": calls})
    click.echo(str(output))
