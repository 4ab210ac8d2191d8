"""``stablekit keygen`` and ``stablekit detect``: watermark keys and detection."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from ..errors import StablekitError
from ..registry import CATALOGUE, parse
from .common import check_output, decoder_steps_option, model_and_device, model_option
from .defaults import FPR

WATERMARKS = CATALOGUE["watermark"]


@click.command("keygen")
@click.argument("method", metavar="METHOD[:k=v,...]")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="JSON key file to write; keep it private: it detects and forges the watermark.",
)
@model_option
@click.option(
    "--size", default=None, metavar="WxH", help="Size of the images to mark [default: the model's native size]."
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Derive the secret from this seed: reproducible but guessable, for tests only [default: a random secret].",
)
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
def keygen(method, output, model, size, seed, force):
    """Write a new watermark key for METHOD (tree-ring, gaussian-shading, seal, wouaf or safe-sd; k=v override its
    defaults)."""
    from ..output import load_quietly, parse_size, write_atomically
    from ..provenance import make_key

    name, _, params = parse(method, WATERMARKS, "watermark method", lambda cls: cls.default_params)
    wh = parse_size(size)
    check_output(output, "key.json")
    if output.exists() and not force:
        raise StablekitError(
            f"key file '{output}' exists; images marked with it need it to be detected: "
            "choose another -o, or pass --force"
        )
    w, h = wh or (None, None)
    key = make_key(load_quietly(model, "cpu"), name, height=h, width=w, seed=seed, **params)
    write_atomically(output, key.save, mode=0o600)
    click.echo(str(output))


@click.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE...")
@click.option(
    "--key-file",
    "key_files",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Key from `stablekit keygen` (repeatable: the best-matching one is reported).",
)
@click.option("--steps", default=50, show_default=True, help="Steps of the inversion to the initial noise.")
@click.option(
    "--inversion", type=click.Choice(["ddim", "edict"]), default="ddim", show_default=True, help="Inversion method."
)
@decoder_steps_option
@click.option("--fpr", default=FPR, show_default=True, help="False-positive rate of the decision.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image.")
@model_and_device
def detect_command(images, key_files, model, steps, inversion, decoder_steps, fpr, as_json, device):
    """Is each IMAGE watermarked with one of the keys? Print score, p-value, decision and message or key."""
    from ..latents import read_image
    from ..output import load_quietly
    from ..provenance import Key, detect, watermark
    from ..provenance.detection import latent_shape

    if steps <= 0:
        raise StablekitError(f"--steps {steps}: the number of inversion steps must be at least 1, e.g. --steps 50")
    if decoder_steps < 0:
        raise StablekitError(f"--decoder-steps {decoder_steps}: must be >= 0 (0 turns decoder inversion off)")
    if not 0 < fpr < 1:
        raise StablekitError(f"--fpr {fpr}: a false-positive rate lies between 0 and 1, e.g. --fpr 1e-6")
    keys = [Key.load(path) for path in key_files]
    marks = [watermark(key) for key in keys]
    for path, mark in zip(key_files, marks, strict=False):
        if (mark.name, mark.shape) != (marks[0].name, marks[0].shape):
            raise StablekitError(
                f"key files '{key_files[0]}' ({marks[0].name}, {marks[0].size_text()}) and '{path}' "
                f"({mark.name}, {mark.size_text()}) differ; give keys of one method and size"
            )
    pictures = [read_image(path) for path in images]
    for path, picture in zip(images, pictures, strict=False):
        if picture.size != marks[0].image_size[::-1]:
            raise StablekitError(
                f"image '{path}' is {picture.width}x{picture.height} but the key is for "
                f"{marks[0].size_text()} images; detect at the size it was generated"
            )
    pipe = load_quietly(model, device)
    shape = latent_shape(pipe, *marks[0].image_size)[0]
    if shape != marks[0].shape:
        raise StablekitError(
            f"key file '{key_files[0]}' was made for another model: its latents are "
            f"{marks[0].shape}, this model's {shape}; pass the key's --model"
        )
    found = []
    for path, picture in zip(images, pictures, strict=False):
        result = detect(pipe, picture, keys, steps=steps, inversion=inversion, decoder_steps=decoder_steps, fpr=fpr)
        key_file = str(key_files[result.user or 0])
        found.append(dict(image=str(path), key_file=key_file, **dataclasses.asdict(result)))
        if not as_json:
            extra = (f"; key file {key_file}" if result.user is not None else "") + (
                f"; message {result.message}" if result.message else ""
            )
            click.echo(f"{path}: {result}{extra}")
    if as_json:
        click.echo(json.dumps(found, indent=1))
