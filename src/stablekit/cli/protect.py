"""``stablekit protect``: immunize an image against diffusion mimicry and editing."""

from __future__ import annotations

from pathlib import Path

import click

from .. import __version__
from ..errors import StablekitError
from .common import check_output, given, model_and_device, refuse
from .defaults import DEFAULT_MODEL, EOT, PROTECTIONS


@click.command("protect")
@click.argument("image", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    default="protected.png",
    show_default=True,
    type=click.Path(path_type=Path),
    help="PNG file to write (lossless: JPEG would erase much of the protection).",
)
@click.option(
    "--method",
    type=click.Choice(list(PROTECTIONS)),
    default="sds",
    show_default=True,
    help="encoder (PhotoGuard), semantic (AdvDM), sds (Diff-Protect score distillation), diffusionguard "
    "(against inpainting; needs --mask).",
)
@click.option(
    "--mask",
    type=click.Path(path_type=Path),
    default=None,
    help="Image of IMAGE's size, white over the region to protect: only those pixels change.",
)
@click.option(
    "--eps", default="8/255", show_default=True, help="L-infinity budget in [0, 1] pixel units, e.g. 8/255 or 16/255."
)
@click.option(
    "--min-psnr",
    type=float,
    default=None,
    help="Also keep PSNR >= this many dB (e.g. 35; 8/255 filling the ball gives 30.1) [default: no floor].",
)
@click.option(
    "--steps",
    type=int,
    default=None,
    help="PGD steps [default: the method's, " + ", ".join(f"{m} {d['steps']}" for m, d in PROTECTIONS.items()) + "].",
)
@click.option("--step-size", default=None, help="PGD step in pixel units, e.g. 1/255 [default: the method's].")
@click.option(
    "--mode",
    default=None,
    help="encoder: toward|away; semantic, sds: max|min [default: the method's, "
    + ", ".join(f"{m} {d['mode']}" for m, d in PROTECTIONS.items() if "mode" in d)
    + "].",
)
@click.option("--prompt", default=None, help="Prompt of the denoiser's loss [default: the method's].")
@click.option(
    "--eot",
    multiple=True,
    type=click.Choice([*EOT, "all"]),
    help="Optimise through this transformation too, drawn at random per step (repeatable).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default=None,
    help="Precision of the VAE and UNet during the attack [default: the model's].",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random start, timesteps and noise.")
@model_and_device
def protect_command(
    image, output, method, mask, eps, min_psnr, steps, step_size, mode, prompt, eot, dtype, seed, model, device
):
    """Protect IMAGE against diffusion mimicry and editing; print the written path."""
    from ..latents import read_image
    from ..output import load_quietly, save_png
    from ..protect import DEFAULTS as PROTECT_DEFAULTS
    from ..protect import options as protect_options
    from ..protect import parse_eps, parse_psnr, protect

    budget = parse_eps(eps, "--eps")
    parse_psnr(min_psnr, "--min-psnr")
    step = None if step_size is None else parse_eps(step_size, "--step-size")
    if steps is not None and steps < 1:
        raise StablekitError(f"--steps {steps}: the number of PGD steps must be at least 1, e.g. --steps 100")
    if "prompt" not in PROTECT_DEFAULTS[method]:
        refuse(given("prompt"), f"to --method {method}: it uses no prompt")
    settings = protect_options(method, steps, step, mode, prompt)
    check_output(output)
    picture = read_image(image)
    region = _read_mask(mask, image, picture, method)
    pipe = load_quietly(model, device)
    out = protect(
        pipe,
        picture,
        method,
        eps=budget,
        steps=settings["steps"],
        step_size=settings["step_size"],
        mask=region,
        eot=list(eot),
        dtype=dtype,
        mode=mode,
        prompt=prompt,
        seed=seed,
        min_psnr=min_psnr,
    )
    save_png(
        out,
        output,
        dict(
            method=method,
            eps=f"{budget:.6g}",
            min_psnr=min_psnr or "",
            steps=settings["steps"],
            step_size=f"{settings['step_size']:.6g}",
            mode=settings.get("mode", ""),
            eot=",".join(eot),
            seed=seed,
            model=model or DEFAULT_MODEL,
            stablekit=__version__,
        ),
    )
    click.echo(str(output))


def _read_mask(mask: Path | None, image: Path, picture, method: str):
    """The --mask image (None without one), of `picture`'s size; diffusionguard needs one."""
    from ..latents import read_image

    if mask is None:
        if method == "diffusionguard":
            raise StablekitError(
                "--method diffusionguard needs --mask MASK: white over the region to protect "
                "(what an inpainting editor keeps)"
            )
        return None
    region = read_image(mask)
    if region.size != picture.size:
        raise StablekitError(
            f"mask '{mask}' is {region.width}x{region.height} but image '{image}' is "
            f"{picture.width}x{picture.height}; give a mask of the image's size"
        )
    return region
