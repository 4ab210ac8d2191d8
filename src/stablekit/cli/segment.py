"""``stablekit segment``: the foreground mask of an image from the diffusion model's features (DiffDIS)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import check_output, model_and_device


@click.command("segment")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the mask PNG.")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Foreground probability cut.")
@model_and_device
def segment_command(image: Path, output: Path, threshold: float, model, device):
    """Write IMAGE's foreground mask (white on black) to --output; print the written path."""
    from PIL import Image

    from .. import __version__
    from ..latents import to_tensor
    from ..output import save_png
    from ..pipeline import load
    from ..restore.diffdis import check_image, segment
    from ..restore.super_resolution import open_image

    check_output(output)
    if not 0 < threshold < 1:
        raise click.UsageError(f"--threshold must be in (0, 1), not {threshold}")
    picture = open_image(image)
    check_image(picture)
    pipe = load(model, device=device)
    prob = segment(pipe, to_tensor(picture.convert("RGB"))[None])
    mask = Image.fromarray(((prob[0, 0] > threshold).numpy() * 255).astype("uint8"), mode="L")
    save_png(mask, output, {"stablekit": __version__, "segment": "diffdis", "source": image.name})
    click.echo(str(output))
