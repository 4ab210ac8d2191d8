"""Inversion of real images into a diffusion model's latent trajectory, and reconstruction from it.

One interface for every method::

    inv = invert(pipe, image, "a red star", method="edict", steps=50)
    traj = reconstruct(pipe, inv)           # traj[-1] is the image latent; decode(pipe, traj[-1])

Methods: ``ddim`` (DDIM inversion, the baseline; below), ``edict`` (:mod:`.edict`, EDICT 2023),
``nulltext`` (:mod:`.null_text`, null-text inversion 2023) and ``direct`` (:mod:`.direct_inversion`, Direct
Inversion 2024). Each can
start from a decoder-inverted latent (``decoder_steps``, see :func:`stablekit.latents.encode_image`).

Several images invert as one batch (``invert(pipe, [im1, im2], ["a red star", "a blue disc"])``):
one row per image through every unet call, each row exactly what inverting that image alone gives
up to the unet's batch arithmetic (null-text's early stop is the exception: it waits for every
image of the batch, see :mod:`.null_text`). A small unet at batch 1 is mostly overhead, so a batch
of 16 costs a few times less per image on a CPU.

**DDIM inversion** runs the deterministic DDIM update backwards, ``z[i] = (z[i+1] - B_i eps) / A_i``,
approximating the noise at ``z[i]`` by the prediction at ``z[i+1]`` (same timestep ``t_i``), with
classifier-free guidance `guidance` in both directions (1: conditional prediction only). The
approximation makes reconstruction inexact, badly so with guidance (the motivation of EDICT, null-text
inversion and Direct Inversion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StablekitError
from ..latents import Schedule, cast, decode, encode_image, encode_prompts, eps, load_image, psnr, tile, to_pil
from . import direct_inversion, edict, null_text

METHODS = ("ddim", "edict", "nulltext", "direct")
GUIDANCE = {"ddim": 7.5, "edict": 3.0, "nulltext": 7.5, "direct": 7.5}  # each paper's default


@dataclass
class Inversion:
    """What reconstruction and editing need. Trajectories are in denoising order, one row per step:
    ``latents[0]`` is the noise, ``latents[i + 1]`` follows denoising step ``i``, ``latents[-1]`` is
    the image latent; shape (steps + 1, images, C, h, w), float64 for EDICT, float32 otherwise."""

    method: str
    prompt: str | list[str]  # a list when several images were inverted together, one per image
    guidance: float
    schedule: Schedule
    latents: torch.Tensor
    coupled: torch.Tensor | None = None  # EDICT: the second sequence, y
    mix: float = 0.93  # EDICT: mixing weight p
    null_embeds: torch.Tensor | None = None  # null-text: unconditional embedding of each step (steps, images, L, D)
    offsets: torch.Tensor | None = None  # Direct Inversion: source-branch offset added after each step

    @property
    def prompts(self) -> list[str]:
        """One prompt per image."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def ddim_invert(pipe, sched: Schedule, z0: torch.Tensor, text: tuple[dict, dict], guidance: float) -> torch.Tensor:
    """DDIM inversion trajectory of the image latent `z0`, in denoising order (see module docstring)."""
    uncond, cond = text
    traj = [z0]
    for i in reversed(range(len(sched))):
        traj.append(sched.unstep(i, traj[-1], eps(pipe, sched, traj[-1], i, cond, uncond, guidance)))
    return torch.stack(traj[::-1])


@torch.no_grad()
def _invert(pipe, method, z0, text, sched, guidance, mix, inner_steps):
    if method == "edict":
        with cast(pipe.unet, torch.float64):
            xs, ys = edict.invert(pipe, sched, z0.double(), text, guidance, mix)
        return {"latents": xs, "coupled": ys, "mix": mix}
    pivot = ddim_invert(pipe, sched, z0, text, guidance if method == "ddim" else 1.0)
    if method == "nulltext":
        with torch.enable_grad():
            return {
                "latents": pivot,
                "null_embeds": null_text.optimise(pipe, sched, pivot, text, guidance, inner_steps),
            }
    if method == "direct":
        return {"latents": pivot, "offsets": direct_inversion.offsets(pipe, sched, pivot, text, guidance)}
    return {"latents": pivot}


def prompt_list(prompts, what: str = "prompt") -> list[str]:
    """A string as a one-item list, or a non-empty list of strings as a list."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise StablekitError(f"the {what} must be a string, or a non-empty list of strings for a list of images")
    return list(prompts)


def batch(images, prompts, what: str = "prompt") -> tuple[list, list[str]]:
    """(images, prompts) as equal-length lists: one image and a string, or a list of each."""
    if isinstance(prompts, str):
        return [images], [prompts]
    prompts = prompt_list(prompts, what)
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
        raise StablekitError(f"a list of {len(prompts)} {what}s needs a list of as many images")
    return list(images), prompts


def load_images(pipe, images: list) -> torch.Tensor:
    """:func:`stablekit.latents.load_image` of each image, as one (N, 3, H, W) batch; all of one size."""
    xs = [load_image(pipe, im) for im in images]
    if any(x.shape != xs[0].shape for x in xs):
        sizes = sorted({f"{x.shape[-1]}x{x.shape[-2]}" for x in xs})
        raise StablekitError(f"images inverted together must share one size, got {', '.join(sizes)}")
    return torch.cat(xs)


def invert(
    pipe,
    image,
    prompt: str | list[str],
    method: str = "direct",
    steps: int = 50,
    guidance: float | None = None,
    *,
    mix: float = 0.93,
    inner_steps: int = 10,
    decoder_steps: int = 0,
) -> Inversion:
    """Invert `image` (path, PIL image or tensor in [0, 1]) under `prompt` with `method` in :data:`METHODS`;
    or a list of images of one size, each under its own prompt of the list `prompt`, in one batch.

    `guidance` defaults to the method's paper (:data:`GUIDANCE`); `mix` is EDICT's p, `inner_steps`
    null-text's optimisation steps per diffusion step, `decoder_steps` > 0 turns on decoder inversion.
    """
    if method not in METHODS:
        raise StablekitError(f"unknown inversion method '{method}'; choose one of: {', '.join(METHODS)}")
    images, prompts = batch(image, prompt)
    if int(steps) < 1 or not 0 < mix <= 1:
        raise StablekitError(f"need steps >= 1 and 0 < mix <= 1 (got steps={steps}, mix={mix})")
    guidance = GUIDANCE[method] if guidance is None else float(guidance)
    z0 = encode_image(pipe, load_images(pipe, images), decoder_steps)
    sched = Schedule(pipe, int(steps))
    parts = _invert(pipe, method, z0, encode_prompts(pipe, prompts, z0), sched, guidance, mix, inner_steps)
    return Inversion(method, prompt if isinstance(prompt, str) else prompts, guidance, sched, **parts)


@torch.no_grad()
def denoise(pipe, inv: Inversion, text: tuple[dict, dict], on_step=None, start: int = 0) -> torch.Tensor:
    """Denoise from ``inv.latents[start]`` (and ``inv.coupled[start]``) through the remaining steps along
    the method's reconstruction path, one branch per image and prompt of `text` (from
    :func:`stablekit.latents.encode_prompts`), branch-major: the first branch (the images' own prompts, the one that
    gets Direct Inversion's offsets), then the next branch's prompts for the same images, and so on.
    ``on_step(i, latents)`` may change the latents after each step. Returns the trajectory
    (steps - start + 1, branches * images, C, h, w)."""
    (uncond, cond), sched = text, inv.schedule
    images, rows = inv.latents.shape[1], len(cond["encoder_hidden_states"])
    x = tile(inv.latents[start], rows)
    y = None if inv.coupled is None else tile(inv.coupled[start], rows)
    traj = [x]
    with cast(pipe.unet, torch.float64 if inv.latents.dtype == torch.float64 else None):
        for i in range(start, len(sched)):
            if inv.null_embeds is not None:
                uncond = {**uncond, "encoder_hidden_states": tile(inv.null_embeds[i], rows)}
            if y is not None:
                x, y = edict.step(pipe, sched, i, x, y, (uncond, cond), inv.guidance, inv.mix)
            else:
                x = sched.step(i, x, eps(pipe, sched, x, i, cond, uncond, inv.guidance))
            if inv.offsets is not None:
                x = torch.cat([(x[:images].double() + inv.offsets[i]).to(x.dtype), x[images:]])
            if on_step is not None:
                new = on_step(i, x)
                y, x = None if y is None else y + (new - x), new
            traj.append(x)
    return torch.stack(traj)


def reconstruct(pipe, inversion: Inversion) -> torch.Tensor:
    """Latent trajectory (steps + 1, images, C, h, w) regenerated from `inversion` under its own prompts."""
    if not isinstance(inversion, Inversion):
        raise StablekitError(f"expected an Inversion from stablekit.edit.invert, got {type(inversion).__name__}")
    return denoise(pipe, inversion, encode_prompts(pipe, inversion.prompts, inversion.latents[0]))


def reconstruct_image(pipe, image, prompt: str, method: str = "direct", **kw):
    """Invert `image`, reconstruct and decode it: ``(PIL image, PSNR in dB against the input)``."""
    reference = to_pil((load_image(pipe, image) + 1) / 2)
    out = decode(pipe, reconstruct(pipe, invert(pipe, image, prompt, method, **kw))[-1])
    return out, psnr(out, reference, data_range=255)
