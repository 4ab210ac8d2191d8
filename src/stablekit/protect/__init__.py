"""Image immunization: imperceptible perturbations that make diffusion mimicry and editing of an image fail.

    from stablekit.protect import protect
    protected = protect(pipe, image, method="sds")                  # PIL image, within 8/255
    protected = protect(pipe, image, method="diffusionguard", mask=face_mask, eps=16/255)

Methods (one module each; the docstrings give paper defaults and every deviation):

* ``encoder`` -- PhotoGuard's encoder attack (:mod:`.encoder_attack`): the VAE latent toward a
  target (a grey image's, ``target=``) or away from the clean one (``mode="away"``);
* ``semantic`` -- AdvDM / Mist's semantic attack (:mod:`.semantic_attack`): the denoiser's loss over
  random timesteps, back-propagated through the UNet (``mode="max"``, or ``"min"``);
* ``sds`` -- Diff-Protect's score distillation (:mod:`.score_distillation`, 2024): the same
  loss with the UNet run forward only; ``mode="min"`` (default, SDS(-)) or ``"max"`` (SDS(+));
* ``diffusionguard`` -- DiffusionGuard (:mod:`.diffusionguard`, 2025): the noise predicted at the
  earliest inpainting step, with mask augmentation; needs ``mask=`` (white: the region to protect).

Common options: ``eps`` -- the L-infinity budget in [0, 1] pixel units (8/255 default; 16/255 the
stronger setting most papers report; PhotoGuard's and DiffusionGuard's own numbers are on the [-1, 1]
scale, half as many grey levels), ``steps`` and ``step_size`` of the PGD (:mod:`.pgd`; defaults per
method, :data:`DEFAULTS`), ``mask`` (white: the only pixels that may change, for every method),
``eot`` (expectation over JPEG / resize / noise, :mod:`.eot`), ``dtype`` (the VAE and UNet run in
float32 or bfloat16 during the attack; the perturbation itself is float32), ``seed``. The result is
an 8-bit image whose every value lies within ``eps`` of the original's (exactly, for 8-bit inputs).
``min_psnr`` (dB, off by default) adds a floor on the PSNR: every PGD step also scales the perturbation
down to the root-mean-square ``10 ** (-min_psnr / 20)`` where it is above it, and the final rounding keeps
to it (:func:`.core.quantize`), so the floor holds exactly for 8-bit inputs. A perturbation that fills the
L-infinity ball has PSNR ``20 log10(1 / eps)`` (30.1 dB at 8/255); with ``min_psnr=35`` the budget is
spent on fewer values (not in the papers, which bound L-infinity alone).

:func:`objective` scores an image under a method's own objective; :func:`random_noise` is the
baseline of random signs of the same budget.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from PIL import Image

from ..errors import StablekitError
from ..latents import cast, to_tensor
from ..pipeline import frozen
from . import diffusionguard, encoder_attack, score_distillation, semantic_attack
from . import eot as eot_
from .core import parse_eps, parse_psnr, pixels, quantize, random_sign, region
from .pgd import Budget

METHODS = {
    "encoder": encoder_attack,
    "semantic": semantic_attack,
    "sds": score_distillation,
    "diffusionguard": diffusionguard,
}
DEFAULTS = {name: dict(module.DEFAULTS) for name, module in METHODS.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _module(method: str):
    if method not in METHODS:
        raise StablekitError(f"unknown protection method '{method}'; use one of {', '.join(METHODS)}")
    return METHODS[method]


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).replace("torch.", "") not in DTYPES:
        raise StablekitError(f"unknown dtype '{dtype}'; use {', '.join(DTYPES)}")
    return DTYPES[str(dtype).replace("torch.", "")]


def options(method: str, steps=None, step_size=None, mode=None, prompt=None) -> dict:
    """`method`'s settings: its :data:`DEFAULTS` with the given ones (not None) in place, checked."""
    _module(method)
    opts = dict(DEFAULTS[method])
    if isinstance(step_size, str):
        step_size = parse_eps(step_size, "step_size")
    for key, value in (("steps", steps), ("step_size", step_size), ("mode", mode), ("prompt", prompt)):
        if value is not None:
            opts[key] = value
    if int(opts["steps"]) != opts["steps"] or opts["steps"] < 0:
        raise StablekitError(f"steps {opts['steps']}: the number of PGD steps must be a whole number >= 0")
    if not opts["step_size"] > 0:
        raise StablekitError(f"step_size {opts['step_size']}: the PGD step must be > 0, e.g. 1/255")
    modes = getattr(METHODS[method], "MODES", ())
    if mode is not None and mode not in modes:
        raise StablekitError(
            f"the {method} method has no mode '{mode}'" + (f"; use {' or '.join(modes)}" if modes else "")
        )
    return opts


def _extra(method: str, extra: dict) -> dict:
    allowed = set(DEFAULTS[method]) - {"steps", "step_size", "mode", "prompt"}
    for key in extra:
        if key not in allowed:
            raise StablekitError(
                f"the {method} method has no option '{key}'"
                + (f"; its options: {', '.join(sorted(allowed))}" if allowed else "")
            )
    return extra


def protect(
    pipe,
    image,
    method: str = "sds",
    *,
    eps=8 / 255,
    steps: int | None = None,
    step_size: float | None = None,
    mask=None,
    eot=False,
    dtype=None,
    mode: str | None = None,
    prompt: str | None = None,
    target="gray",
    seed: int = 0,
    min_psnr: float | None = None,
    progress: bool = True,
    **extra,
) -> Image.Image:
    """`image` (path, PIL image, or tensor in [0, 1]; sides multiples of the VAE's factor) protected
    against mimicry and editing by `pipe`'s model, as an 8-bit PIL image within `eps` of it.

    `method`: ``encoder``, ``semantic``, ``sds`` or ``diffusionguard``; `steps`, `step_size` (pixel
    units), `mode` (encoder: toward/away; semantic, sds: max/min) and `prompt` default to the method's
    :data:`DEFAULTS`; `target` is the encoder attack's; `extra` options go to the method (diffusionguard:
    ``inference_steps``, ``shrink``). `eot`: False, True (JPEG 75, resize 0.5, noise 0.03), names, or
    ``{name: strength}``. `dtype`: the VAE's and UNet's during the attack (None: their own). `min_psnr`:
    a PSNR floor in dB (module docstring)."""
    module, eps, rms = _module(method), parse_eps(eps), parse_psnr(min_psnr)
    opts = dict(options(method, steps, step_size, mode, prompt), **_extra(method, extra))
    transforms, dtype = eot_.parse(eot), _dtype(dtype)
    x = pixels(pipe, image)
    budget = Budget(
        eps=eps,
        steps=opts.pop("steps"),
        step_size=opts.pop("step_size"),
        keep=region(mask, x),
        generator=torch.Generator().manual_seed(int(seed)),
        eot=transforms,
        rms=rms,
        progress=progress,
    )
    with ExitStack() as stack:
        for m in (pipe.vae, pipe.unet):
            stack.enter_context(cast(m, dtype))
        stack.enter_context(frozen(pipe.vae, pipe.unet))
        x_adv = module.attack(pipe, x, budget, target=target, **opts)
    return quantize(x, x_adv, eps, rms)


def objective(
    pipe,
    protected,
    original,
    method: str = "sds",
    *,
    mask=None,
    mode: str | None = None,
    prompt: str | None = None,
    target="gray",
    dtype=None,
    **extra,
) -> float:
    """`protected`'s score under `method`'s own objective (higher: a stronger protection), with fixed
    noise draws so that scores of different images compare; `original` is the clean image."""
    module = _module(method)
    opts = dict(options(method, None, None, mode, prompt), **_extra(method, extra))
    x, y = pixels(pipe, original), pixels(pipe, protected)
    kw = {k: v for k, v in opts.items() if k not in ("steps", "step_size", "shrink")}
    if method == "encoder":
        kw["target"] = target
    if method == "diffusionguard":
        kw["keep"] = region(mask, x)
    with ExitStack() as stack:
        for m in (pipe.vae, pipe.unet):
            stack.enter_context(cast(m, _dtype(dtype)))
        return module.objective(pipe, y, x, **kw)


def random_noise(image, eps=8 / 255, mask=None, seed: int = 0, min_psnr: float | None = None) -> Image.Image:
    """The baseline: `image` plus ``eps`` times a uniformly random sign per value (inside `mask`; scaled
    down to the `min_psnr` floor as :func:`protect` does), 8-bit."""
    eps, rms = parse_eps(eps), parse_psnr(min_psnr)
    if not isinstance(image, torch.Tensor):
        image = to_tensor(image)
    x = image.float().cpu().reshape(1, 3, *image.shape[-2:])
    keep = region(mask, x)
    x_rand = random_sign(x, eps, keep, torch.Generator().manual_seed(int(seed)), rms)
    return quantize(x, x_rand, eps, rms)


__all__ = ["protect", "objective", "random_noise", "options", "METHODS", "DEFAULTS"]
