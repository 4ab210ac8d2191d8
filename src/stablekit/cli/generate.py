"""``stablekit generate``: text to images, with any plugins of the catalogue attached."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import StablekitError
from ..registry import CATALOGUE, build, load_adapter
from .common import (
    check_output,
    dtype_option,
    given,
    model_and_device,
    output_paths,
    refuse,
    spm_multiplier_option,
)
from .quant import quant_plugins, quant_recipe

SCHEDULERS = CATALOGUE["scheduler"]
ACCELS = CATALOGUE["accel"]
GUARDS = CATALOGUE["guard"]
WATERMARKS = CATALOGUE["watermark"]


def _watermark_plugin(method: str | None, key_file: Path | None, wh: tuple[int, int] | None):
    """(the watermark plugin or None, the image size): the key's size unless --size agrees with it."""
    from ..provenance import Key, watermark

    if key_file is None:
        if method:
            raise StablekitError(
                f"--watermark {method} needs --key-file KEY; make one with `stablekit keygen {method} -o key.json`"
            )
        return None, wh
    key = Key.load(key_file)
    if method and key.method != method:
        raise StablekitError(
            f"key file '{key_file}' holds a {key.method} key, not {method}; "
            f"pass --watermark {key.method} or a {method} key"
        )
    plugin = watermark(key)
    size = plugin.image_size[::-1]
    if wh and wh != size:
        raise StablekitError(
            f"--size {wh[0]}x{wh[1]} but key file '{key_file}' is for {plugin.size_text()} images; "
            f"drop --size or make a key with --size {wh[0]}x{wh[1]}"
        )
    return plugin, size


@click.command("generate")
@click.argument("prompts", nargs=-1, metavar="PROMPT...")
@click.option(
    "-o",
    "--output",
    default="out.png",
    show_default=True,
    type=click.Path(path_type=Path),
    help="PNG file; several images become STEM-0.png, STEM-1.png, ... beside it.",
)
@click.option("--seed", default=0, show_default=True, help="Image i uses seed+i.")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: 25, or a student model's own].")
@click.option(
    "--guidance", type=float, default=None, help="Classifier-free guidance scale [default: 7.5, or a student's own]."
)
@click.option(
    "--guidance-rescale",
    type=float,
    default=None,
    help="Rescale of the guided prediction (0: off) [default: 0.7 for models whose schedule has zero "
    "terminal SNR, like the embedded default; else 0].",
)
@click.option("--size", default=None, metavar="WxH", help="Image size [default: the model's native size].")
@click.option("--n", default=1, show_default=True, help="Images per prompt.")
@click.option(
    "--scheduler",
    default=None,
    metavar="NAME[:k=v,...]",
    help=f"Sampler, one of {', '.join(SCHEDULERS)}; k=v override its config [default: the model's own].",
)
@click.option(
    "--accel",
    "accels",
    multiple=True,
    metavar="NAME[:k=v,...]",
    help=f"Attach an acceleration plugin, one of {', '.join(ACCELS)} (repeatable).",
)
@click.option(
    "--guard",
    "guards",
    multiple=True,
    metavar="NAME[:k=v,...]",
    help=f"Attach a safety guard or erasure, one of {', '.join(GUARDS)}, e.g. safree:concepts=[star] (repeatable).",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Concept-erasure file from `stablekit erase`, LoRA from `stablekit finetune`, memorization adapter, or "
    "SpeedUpNet adapter from `stablekit distill --method speedupnet` (4 steps, no guidance) (repeatable).",
)
@spm_multiplier_option
@click.option(
    "--watermark",
    "method",
    type=click.Choice(list(WATERMARKS)),
    default=None,
    help="Watermark the images with --key-file's key.",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Watermark key from `stablekit keygen`; alone it implies --watermark with the key's method.",
)
@click.option("--negative", default=None, help="Negative prompt.")
@click.option(
    "--quant",
    default=None,
    metavar="METHOD[:k=v,...]|DIR",
    help="Quantize the UNet for this run: a method (calibrated first, e.g. svdquant:bits=w4a4) or a folder "
    "from `stablekit quantize` made from --model.",
)
@dtype_option
@model_and_device
def generate(
    prompts,
    output,
    model,
    seed,
    steps,
    guidance,
    guidance_rescale,
    size,
    n,
    scheduler,
    accels,
    guards,
    adapters,
    spm_multiplier,
    method,
    key_file,
    negative,
    quant,
    dtype,
    device,
):
    """Generate images from PROMPT(s); print each written path."""
    from .. import use
    from ..accel import check_size
    from ..output import load_quietly, parse_size
    from ..pipeline import guidance_rescale as guidance_rescale_for
    from ..pipeline import recommended

    wh = parse_size(size)
    plugins = _generation_plugins(accels, guards, adapters, spm_multiplier)
    own = recommended(model) | {k: v for p in plugins for k, v in getattr(p, "recommended", {}).items()}
    steps = own.get("steps", 25) if steps is None else steps
    guidance = own.get("guidance", 7.5) if guidance is None else guidance
    _check_generate(prompts, output, steps, guidance, guidance_rescale, n)
    _check_unguided(guidance, plugins)
    mark, wh = _watermark_plugin(method, key_file, wh)
    recipe = quant_recipe(quant)
    pipe = load_quietly(model, device, scheduler=scheduler, dtype=dtype)
    plugins += quant_plugins(pipe, recipe)
    use(pipe, *plugins, *([mark] if mark else []))
    w, h = wh or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    check_size(pipe, w, h)
    jobs = [p for p in prompts for _ in range(n)]
    rescale = guidance_rescale_for(pipe) if guidance_rescale is None else guidance_rescale
    specs = {"accel": list(accels), "guard": list(guards), "adapter": [p.name for p in adapters]}
    specs["quant"] = [quant] if quant else []  # empty lists are left out of the metadata
    meta = dict(
        negative=negative,
        steps=steps,
        guidance=guidance,
        guidance_rescale=rescale,
        size=(w, h),
        scheduler=scheduler,
        model=model,
        specs=specs,
    )
    call = dict(negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=rescale)
    _write_images(pipe, jobs, output_paths(output, len(jobs)), seed, dict(height=h, width=w, **call), meta)


def _write_images(pipe, prompts: list[str], paths: list[Path], seed: int, call: dict, meta: dict) -> None:
    """Generate prompt i with seed+i, save it to path i with its metadata, and print the path."""
    import torch

    from ..output import generation_metadata, save_png

    for i, (prompt, path) in enumerate(zip(prompts, paths, strict=True)):
        pipe.set_progress_bar_config(disable=None, desc=f"image {i + 1}/{len(prompts)}")
        g = torch.Generator("cpu").manual_seed(seed + i)
        image = pipe(prompt, generator=g, **call).images[0]
        save_png(image, path, generation_metadata(pipe, prompt, seed + i, **meta))
        click.echo(str(path))


def _generation_plugins(accels, guards, adapters, spm_multiplier: float) -> list:
    """The plugins of `generate`'s --accel, --guard and --adapter options, built (so checked) before any loading."""
    from .. import safety

    plugins = [build(spec, ACCELS, "accel") for spec in accels]
    plugins += [build(spec, GUARDS, "guard") for spec in guards]
    plugins += [load_adapter(path, spm_multiplier) for path in adapters]
    if spm_multiplier != 1 and not any(isinstance(p, safety.SPM) for p in plugins):
        raise StablekitError("--spm-multiplier scales SPM membranes: give one with --adapter")
    return plugins


def _check_unguided(guidance: float, plugins: list) -> None:
    """Without guidance, --negative and --guidance-rescale do nothing, unless an adapter reads the negative prompt
    itself (SpeedUpNet)."""
    if guidance <= 1:
        keeps = any(getattr(p, "negative_without_guidance", False) for p in plugins)
        refuse(
            given(*(["guidance_rescale"] if keeps else ["negative", "guidance_rescale"])),
            f"at --guidance {guidance:g}: classifier-free guidance is off",
        )


def _check_generate(
    prompts, output: Path, steps: int, guidance: float, guidance_rescale: float | None, n: int
) -> None:
    if not any(p.strip() for p in prompts):
        raise StablekitError('no prompt given; write it after the command, e.g. stablekit generate "a red circle"')
    if steps <= 0:
        raise StablekitError(f"--steps {steps}: the number of denoising steps must be at least 1, e.g. --steps 25")
    if guidance < 0:
        raise StablekitError(f"--guidance {guidance}: guidance must be >= 0 (1 turns it off; 7.5 is usual)")
    if guidance_rescale is not None and not 0 <= guidance_rescale <= 1:
        raise StablekitError(f"--guidance-rescale {guidance_rescale}: must lie in [0, 1]")
    if n <= 0:
        raise StablekitError(f"--n {n}: the number of images per prompt must be at least 1")
    check_output(output)
