"""``stablekit edit`` and ``stablekit invert``: real-image inversion and editing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import __version__
from ..errors import StablekitError
from .common import check_output, decoder_steps_option, given, model_and_device, refuse
from .defaults import DECODERS, DEFAULT_MODEL, EDIT_GUIDANCE, EDIT_STEPS
from .defaults import INVERSION_GUIDANCE as GUIDANCE

if TYPE_CHECKING:
    from ..edit import PromptToPrompt


def read_image(path):
    from ..latents import read_image

    return read_image(path)


def load_quietly(model, device):
    from ..output import load_quietly

    return load_quietly(model, device)


def edit(*args, **kwargs):
    from ..edit import edit

    return edit(*args, **kwargs)


def save_png(image, path, meta):
    from ..output import save_png

    save_png(image, path, meta)


def _check_inversion(steps: int, guidance: float | None, decoder_steps: int, output: Path) -> None:
    if steps <= 0:
        raise StablekitError(f"--steps {steps}: the number of inversion steps must be at least 1, e.g. --steps 50")
    if guidance is not None and guidance < 0:
        raise StablekitError(f"--guidance {guidance}: guidance must be >= 0 (1 turns it off)")
    if decoder_steps < 0:
        raise StablekitError(f"--decoder-steps {decoder_steps}: must be >= 0 (0 turns decoder inversion off)")
    check_output(output)


def parse_weights(weights: tuple[str, ...]) -> dict[str, float]:
    """``("word=2.5", ...)`` -> ``{"word": 2.5, ...}``."""
    out = {}
    for item in weights:
        word, _, scale = item.rpartition("=")
        try:
            value = float(scale)
        except ValueError:
            value = None
        if not word.strip() or value is None:
            raise StablekitError(f"--weight '{item}' is not WORD=SCALE; write it like --weight red=2")
        out[word.strip()] = value
    return out


def _controller(
    name: str | None, weights: tuple[str, ...], blend: tuple[str, ...], method: str
) -> PromptToPrompt | None:
    if name is None:
        if weights or blend:
            raise StablekitError("--weight and --blend need a --controller (replace, refine or reweight)")
        return None
    if name == "reweight" and not weights:
        raise StablekitError("--controller reweight needs at least one --weight WORD=SCALE, e.g. --weight red=2")
    from ..edit import PromptToPrompt, UnifiedAttentionControl

    kind = UnifiedAttentionControl if method == "infedit" else PromptToPrompt
    return kind("replace" if name == "replace" else "refine", weights=parse_weights(weights), blend=blend)


def _inversion_options(
    guidance: dict[str, float],
    steps: int | None = 50,
    method_help: str = "Inversion method.",
    steps_help: str = "DDIM steps of the inversion.",
):
    """--method (a key of `guidance`, the methods' default guidance), --steps (default `steps`), --guidance,
    --decoder-steps, --model and --device."""

    def decorate(f):
        for option in reversed(
            [
                click.option(
                    "--method",
                    type=click.Choice(list(guidance)),
                    default="direct",
                    show_default=True,
                    help=method_help,
                ),
                click.option("--steps", type=int, default=steps, show_default=steps is not None, help=steps_help),
                click.option(
                    "--guidance",
                    type=float,
                    default=None,
                    help="Classifier-free guidance [default: the method's paper's, "
                    + ", ".join(f"{m} {g:g}" for m, g in guidance.items())
                    + "].",
                ),
                decoder_steps_option,
                model_and_device,
            ]
        ):
            f = option(f)
        return f

    return decorate


@click.command("edit")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--source", default=None, help="Prompt that describes IMAGE (required but with pixelman).")
@click.option("--target", default=None, help="Prompt that describes the edited image (required but with pixelman).")
@click.option(
    "--controller",
    type=click.Choice(["replace", "refine", "reweight"]),
    default=None,
    help="Prompt-to-prompt attention control (with --method infedit, InfEdit's unified attention control): "
    "replace (word swap), refine (added words), reweight (refine with --weight) [default: none].",
)
@click.option("--weight", "weights", multiple=True, metavar="WORD=SCALE", help="Scale a target word's attention.")
@click.option("--blend", multiple=True, metavar="WORD", help="Local blend: edit only where WORD attends.")
@click.option(
    "--strength",
    type=float,
    default=None,
    help="Fraction of the schedule the edit regenerates [default: edict 0.8 (its paper), the other inversions 1].",
)
@click.option(
    "-o", "--output", default="edit.png", show_default=True, type=click.Path(path_type=Path), help="PNG file to write."
)
@click.option(
    "--decoder",
    type=click.Choice(DECODERS),
    default="vae",
    show_default=True,
    help="Decoder of the result: the model's VAE, or the asymmetric decoder, which keeps IMAGE's pixels outside "
    "the edited region (--mask, or where the edit changed the latents).",
)
@click.option(
    "--mask",
    type=click.Path(path_type=Path),
    default=None,
    help="pixelman: the object's mask; with --decoder asymmetric: the region the edit may change (white, a PNG).",
)
@click.option("--move", default="0,0", show_default=True, metavar="DX,DY", help="pixelman: move the object (pixels).")
@click.option("--resize", type=float, default=1.0, show_default=True, help="pixelman: scale the object.")
@_inversion_options(
    {**EDIT_GUIDANCE, "pixelman": 1.0},
    None,
    "Editing method: an inversion, infedit (none needed; --guidance is the target branch's, the source's is 1), or "
    "pixelman (move or resize the object of --mask; --source, if given, describes the image).",
    f"Diffusion steps [default: the method's paper's, 50, infedit {EDIT_STEPS['infedit']}].",
)
def edit_command(
    image,
    source,
    target,
    controller,
    weights,
    blend,
    strength,
    output,
    method,
    steps,
    guidance,
    decoder_steps,
    model,
    device,
    decoder,
    mask,
    **pixelman_options,
):
    """Edit IMAGE from --source to --target, or move/resize the object of --mask (pixelman); print the written path."""
    if method == "pixelman":
        return pixelman_edit(image, source, output, steps, guidance, model, device, decoder, mask, **pixelman_options)
    _check_prompts(source, target, method, decoder, mask)
    steps = EDIT_STEPS[method] if steps is None else steps
    _check_inversion(steps, guidance, decoder_steps, output)
    plugin = _controller(controller, weights, blend, method)
    picture = read_image(image)
    region = _edit_region(mask, picture)
    pipe = load_quietly(model, device)
    if plugin is not None:
        plugin.prepare(pipe.tokenizer, source, target)  # fail before the inversion, not after it
    kw = dict(strength=strength, decoder=decoder, decoder_steps=decoder_steps)
    out = edit(
        pipe, picture, source, target, method, controller=plugin, steps=steps, guidance=guidance, mask=region, **kw
    )
    meta = dict(source=source, target=target, method=method, strength=strength or "", controller=controller or "")
    meta |= dict(weights=",".join(weights), blend=",".join(blend), steps=steps, decoder_steps=decoder_steps)
    meta |= dict(guidance=EDIT_GUIDANCE[method] if guidance is None else guidance, mask=str(mask or ""))
    save_png(out, output, meta | dict(decoder=decoder, model=model or DEFAULT_MODEL, stablekit=__version__))
    click.echo(str(output))


def _check_prompts(source: str | None, target: str | None, method: str, decoder: str, mask) -> None:
    refuse(given("move", "resize"), "to an edit by prompts (they are pixelman's)")
    if mask is not None and decoder != "asymmetric":
        raise StablekitError("--mask of an edit by prompts needs --decoder asymmetric (it marks the region to change)")
    if source is None or target is None:
        raise StablekitError(f"--method {method} needs --source and --target prompts")


def _edit_region(mask, picture):
    """The --mask image of an edit by prompts, its size checked against IMAGE's before any model loads."""
    if mask is None:
        return None
    from ..edit.asymmetric_decoder import pixel_mask

    region = read_image(mask)
    pixel_mask(region, (picture.height, picture.width))
    return region


def parse_move(move: str) -> tuple[float, float]:
    """``"dx,dy"`` -> ``(dx, dy)``."""
    parts = move.split(",")
    try:
        dx, dy = (float(v) for v in parts)
    except ValueError:
        raise StablekitError(f"--move '{move}' is not DX,DY; write it like --move 12,-4") from None
    return dx, dy


def pixelman_edit(image, prompt, output, steps, guidance, model, device, decoder, mask, move, resize):
    """``edit --method pixelman``: check everything, then move/resize the object and write the PNG."""
    from ..edit.pixelman import STEPS, PixelManConfig, object_mask, pixelman

    refuse(given("target", "controller", "weights", "blend", "strength", "decoder_steps"), "to pixelman")
    if mask is None:
        raise StablekitError("--method pixelman needs --mask, an image of the object to move (white on black)")
    steps = STEPS if steps is None else steps
    config = PixelManConfig(
        move=parse_move(move), scale=resize, steps=steps, guidance=guidance or 1.0, decoder=decoder
    )
    check_output(output)
    picture = read_image(image)
    object_mask(read_image(mask), (picture.height, picture.width))  # the size is checked before loading a model
    pipe = load_quietly(model, device)
    out, _, _ = pixelman(pipe, picture, read_image(mask), prompt or "", config)
    meta = dict(method="pixelman", move=move, resize=resize, steps=steps, source=prompt or "", decoder=decoder)
    meta["stablekit"] = __version__
    save_png(out, output, meta | dict(model=model or DEFAULT_MODEL))
    click.echo(str(output))


@click.command("invert")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt that describes IMAGE.")
@click.option(
    "--reconstruct",
    is_flag=True,
    help="Regenerate IMAGE from its inversion, write it to -o and print its PSNR against IMAGE.",
)
@click.option(
    "-o",
    "--output",
    default="reconstruction.png",
    show_default=True,
    type=click.Path(path_type=Path),
    help="PNG file to write.",
)
@_inversion_options(GUIDANCE)
def invert_command(image, prompt, reconstruct, output, method, steps, guidance, decoder_steps, model, device):
    """Invert IMAGE under --prompt; with --reconstruct, write the reconstruction and print its PSNR."""
    if not reconstruct:
        raise StablekitError("stablekit invert writes reconstructions only: add --reconstruct")
    _check_inversion(steps, guidance, decoder_steps, output)
    picture = read_image(image)
    pipe = load_quietly(model, device)
    from ..edit import reconstruct_image

    out, db = reconstruct_image(
        pipe, picture, prompt, method, steps=steps, guidance=guidance, decoder_steps=decoder_steps
    )
    guidance = GUIDANCE[method] if guidance is None else guidance
    save_png(
        out,
        output,
        dict(
            prompt=prompt,
            method=method,
            steps=steps,
            guidance=guidance,
            decoder_steps=decoder_steps,
            psnr_db=f"{db:.2f}",
            model=model or DEFAULT_MODEL,
            stablekit=__version__,
        ),
    )
    click.echo(str(output))
    click.echo(f"reconstruction PSNR: {db:.2f} dB")
