"""``stablekit restore``: super-resolution of an image with a diffusion model."""

from __future__ import annotations

from pathlib import Path

import click

from .common import check_output


@click.command("restore")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the PNG.")
@click.option(
    "--method",
    type=click.Choice(["resshift", "diffusion", "obc"]),
    default="resshift",
    show_default=True,
    help="resshift: residual shifting in 4 steps; diffusion: the plain conditional diffusion baseline (50 steps); "
    "obc: ResShift's deterministic chain from its optimal boundary condition (4 steps).",
)
@click.option("--scale", type=int, default=4, show_default=True, help="Upscaling factor.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler's noise.")
def restore_command(image: Path, output: Path, method: str, scale: int, seed: int):
    """Upscale IMAGE by --scale with a diffusion super-resolution model; print the written path."""
    from .. import __version__
    from ..output import save_png
    from ..restore.super_resolution import check_image, open_image, super_resolve_image

    check_output(output)
    picture = open_image(image)
    check_image(picture, scale)
    result = super_resolve_image(picture, method=method, scale=scale, seed=seed)
    meta = {"stablekit": __version__, "restore": method, "scale": scale, "seed": seed, "source": image.name}
    save_png(result, output, meta)
    click.echo(str(output))
