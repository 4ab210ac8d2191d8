"""Inversion of real images into a diffusion model's latent trajectory, and reconstruction from it.

One interface for every method::

    inv = invert(pipe, image, "a red star", method="edict", steps=50)
    traj = reconstruct(pipe, inv)           # traj[-1] is the image latent; decode(pipe, traj[-1])

Methods: ``ddim`` (DDIM inversion, the baseline; below), ``edict`` (:mod:`.edict`, PAPERS.md #24),
``nulltext`` (:mod:`.null_text`, #42) and ``direct`` (:mod:`.direct_inversion`, #38). Each can
start from a decoder-inverted latent (``decoder_steps``, see :func:`.core.encode_image`).

**DDIM inversion** runs the deterministic DDIM update backwards, ``z[i] = (z[i+1] - B_i eps) / A_i``,
approximating the noise at ``z[i]`` by the prediction at ``z[i+1]`` (same timestep ``t_i``), with
classifier-free guidance `guidance` in both directions (1: conditional prediction only). The
approximation makes reconstruction inexact, badly so with guidance (the motivation of #24, #42, #38).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import StablekitError
from ..eval.metrics import psnr
from . import direct_inversion, edict, null_text
from .core import Schedule, cast, decode, encode_image, encode_prompts, eps, load_image

METHODS = ("ddim", "edict", "nulltext", "direct")
GUIDANCE = {"ddim": 7.5, "edict": 3.0, "nulltext": 7.5, "direct": 7.5}  # each paper's default


@dataclass
class Inversion:
    """What reconstruction and editing need. Trajectories are in denoising order, one row per step:
    ``latents[0]`` is the noise, ``latents[i + 1]`` follows denoising step ``i``, ``latents[-1]`` is
    the image latent; shape (steps + 1, 1, C, h, w), float64 for EDICT, float32 otherwise."""

    method: str
    prompt: str
    guidance: float
    schedule: Schedule
    latents: torch.Tensor
    coupled: torch.Tensor | None = None  # EDICT: the second sequence, y
    mix: float = 0.93  # EDICT: mixing weight p
    null_embeds: torch.Tensor | None = None  # null-text: unconditional embedding of each step (steps, 1, L, D)
    offsets: torch.Tensor | None = None  # Direct Inversion: source-branch offset added after each step


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
            return {"latents": pivot, "null_embeds": null_text.optimise(pipe, sched, pivot, text, guidance, inner_steps)}
    if method == "direct":
        return {"latents": pivot, "offsets": direct_inversion.offsets(pipe, sched, pivot, text, guidance)}
    return {"latents": pivot}


def invert(pipe, image, prompt: str, method: str = "direct", steps: int = 50, guidance: float | None = None, *,
           mix: float = 0.93, inner_steps: int = 10, decoder_steps: int = 0) -> Inversion:
    """Invert `image` (path, PIL image or tensor in [0, 1]) under `prompt` with `method` in :data:`METHODS`.

    `guidance` defaults to the method's paper (:data:`GUIDANCE`); `mix` is EDICT's p, `inner_steps`
    null-text's optimisation steps per diffusion step, `decoder_steps` > 0 turns on decoder inversion.
    """
    if method not in METHODS:
        raise StablekitError(f"unknown inversion method '{method}'; choose one of: {', '.join(METHODS)}")
    if not isinstance(prompt, str):
        raise StablekitError(f"the prompt must be a string, got {type(prompt).__name__}")
    if int(steps) < 1 or not 0 < mix <= 1:
        raise StablekitError(f"need steps >= 1 and 0 < mix <= 1 (got steps={steps}, mix={mix})")
    guidance = GUIDANCE[method] if guidance is None else float(guidance)
    x = load_image(pipe, image)
    z0 = encode_image(pipe, x, decoder_steps)
    sched = Schedule(pipe, int(steps))
    parts = _invert(pipe, method, z0, encode_prompts(pipe, [prompt], z0), sched, guidance, mix, inner_steps)
    return Inversion(method, prompt, guidance, sched, **parts)


@torch.no_grad()
def denoise(pipe, inv: Inversion, text: tuple[dict, dict], on_step=None) -> torch.Tensor:
    """Denoise from ``inv.latents[0]`` along the method's reconstruction path, one branch per prompt
    of `text` (from :func:`.core.encode_prompts`; branch 0 is the source, the one that gets Direct
    Inversion's offsets). ``on_step(i, latents)`` may change the latents after each step.
    Returns the trajectory (steps + 1, branches, C, h, w)."""
    (uncond, cond), sched = text, inv.schedule
    n = len(cond["encoder_hidden_states"])
    x = inv.latents[0].expand(n, -1, -1, -1)
    y = None if inv.coupled is None else inv.coupled[0].expand(n, -1, -1, -1)
    traj = [x]
    with cast(pipe.unet, torch.float64 if inv.latents.dtype == torch.float64 else None):
        for i in range(len(sched)):
            if inv.null_embeds is not None:
                uncond = {**uncond, "encoder_hidden_states": inv.null_embeds[i].expand(n, -1, -1)}
            if y is not None:
                x, y = edict.step(pipe, sched, i, x, y, (uncond, cond), inv.guidance, inv.mix)
            else:
                x = sched.step(i, x, eps(pipe, sched, x, i, cond, uncond, inv.guidance))
            if inv.offsets is not None:
                x = torch.cat([(x[:1].double() + inv.offsets[i]).to(x.dtype), x[1:]])
            if on_step is not None:
                new = on_step(i, x)
                y, x = None if y is None else y + (new - x), new
            traj.append(x)
    return torch.stack(traj)


def reconstruct(pipe, inversion: Inversion) -> torch.Tensor:
    """Latent trajectory (steps + 1, 1, C, h, w) regenerated from `inversion` under its own prompt."""
    if not isinstance(inversion, Inversion):
        raise StablekitError(f"expected an Inversion from stablekit.edit.invert, got {type(inversion).__name__}")
    return denoise(pipe, inversion, encode_prompts(pipe, [inversion.prompt], inversion.latents[0]))


def reconstruct_image(pipe, image, prompt: str, method: str = "direct", **kw):
    """Invert `image`, reconstruct and decode it: ``(PIL image, PSNR in dB against the input)``."""
    x = (load_image(pipe, image)[0].permute(1, 2, 0).cpu() + 1) * 127.5
    out = decode(pipe, reconstruct(pipe, invert(pipe, image, prompt, method, **kw))[-1])
    return out, psnr(np.asarray(out), x.round(), data_range=255)
