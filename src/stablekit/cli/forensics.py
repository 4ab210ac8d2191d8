"""``stablekit forensics``: is each image pristine, laundered through the VAE, or generated?"""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("forensics")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE...")
@click.option("--max-patches", default=16, show_default=True, help="64x64 patches scored per image (evenly spaced).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image.")
def forensics_command(images, max_patches, as_json):
    """Label each IMAGE pristine, laundered (passed through the default model's VAE) or generated."""
    from ..errors import StablekitError
    from ..latents import read_image
    from ..provenance.laundering import PATCH, classify

    if max_patches < 1:
        raise StablekitError(f"--max-patches {max_patches}: must be at least 1")
    pictures = [read_image(path) for path in images]
    for path, im in zip(images, pictures, strict=True):
        if min(im.size) < PATCH:
            raise StablekitError(f"image '{path}' is {im.width}x{im.height}; forensics needs at least {PATCH}x{PATCH}")
    found = [dict(image=str(p), **r) for p, r in zip(images, classify(pictures, max_patches=max_patches), strict=True)]
    if as_json:
        click.echo(json.dumps(found, indent=1))
        return
    for r in found:
        click.echo(
            f"{r['image']}: {r['label']} (p_synthetic {r['p_synthetic']:.3f}, p_generated {r['p_generated']:.3f})"
        )
