"""What the protections share: pixels in [0, 1], the budget, the protected region, differentiable
encoding, the denoiser's noise prediction at any training timestep, and the final uint8 image.

Every budget here is in [0, 1] pixel units: ``eps = 8/255`` lets each channel of each pixel move by
at most 8 grey levels. (PhotoGuard and DiffusionGuard state theirs on the [-1, 1] scale the VAE
reads, where the same number is half as many grey levels; Mist and Diff-Protect convert theirs.)
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from ..errors import StablekitError
from ..latents import encode_prompts, load_image, read_image, to_pil, tree_map


def parse_eps(value, name: str = "eps") -> float:
    """A budget from a number or text (``"8/255"``, ``"0.03"``), checked to lie in (0, 1]."""
    text = str(value).strip()
    try:
        eps = float(Fraction(text)) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError, TypeError):
        raise StablekitError(f"{name} '{text}' is not a number; write it like 8/255 or 0.03") from None
    if not (0 < eps <= 1) or not math.isfinite(eps):
        raise StablekitError(
            f"{name} {text} is outside (0, 1]: budgets are in [0, 1] pixel units, e.g. 8/255 or 16/255"
        )
    return eps


def pixels(pipe, image) -> torch.Tensor:
    """`image` (path, PIL image or tensor in [0, 1]) as (1, 3, H, W) float32 in [0, 1] on the pipeline's device."""
    return (load_image(pipe, image) + 1) / 2


def region(mask, x: torch.Tensor) -> torch.Tensor:
    """The pixels a protection may change, (1, 1, H, W) of 0/1 like `x`: all of them for None, else where
    `mask` (path, PIL image, array or tensor, same size as the image) is at least half white."""
    if mask is None:
        return torch.ones_like(x[:, :1])
    if isinstance(mask, (str, Path)):
        mask = read_image(mask)
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255)
    else:
        m = torch.as_tensor(np.asarray(mask.detach().cpu() if torch.is_tensor(mask) else mask), dtype=torch.float32)
        m = m.squeeze()
        if m.ndim == 3:  # (3, H, W) or (H, W, 3): any channel
            m = m.amax(0) if m.shape[0] in (1, 3) else m.amax(-1)
        if m.max() > 1:
            m = m / 255
    h, w = x.shape[-2:]
    if tuple(m.shape) != (h, w):
        size = f"{m.shape[-1]}x{m.shape[-2]}" if m.ndim == 2 else f"of shape {tuple(m.shape)}"
        raise StablekitError(f"mask is {size} but the image is {w}x{h}; give a mask of the image's size")
    m = (m >= 0.5).float()
    if not m.any():
        raise StablekitError("mask selects no pixel: white marks the region to protect")
    return m[None, None].to(x.device)


def parse_psnr(value, name: str = "min_psnr") -> float | None:
    """The largest root-mean-square perturbation (pixel units) that keeps PSNR >= `value` dB (None: no floor)."""
    if value is None:
        return None
    try:
        db = float(value)
    except (TypeError, ValueError):
        raise StablekitError(f"{name} '{value}' is not a number; give decibels, e.g. 35") from None
    if not 0 < db < 100:
        raise StablekitError(f"{name} {value} is outside (0, 100) dB; e.g. 35 keeps the perturbation invisible")
    return 10 ** (-db / 20)


def project(x: torch.Tensor, delta: torch.Tensor, eps: float, keep: torch.Tensor, rms: float | None = None):
    """`delta` moved into the budget: inside [-eps, eps], zero outside the region, x + delta inside [0, 1], and
    with `rms` (a PSNR floor, :func:`parse_psnr`) scaled down to that root-mean-square if above it (scaling
    toward 0 keeps the other constraints)."""
    delta = (x + delta.clamp(-eps, eps) * keep).clamp(0, 1) - x
    if rms is not None:
        delta = delta * (rms / delta.pow(2).mean().sqrt().clamp_min(rms)).item()
    return delta


def quantize(x: torch.Tensor, x_adv: torch.Tensor, eps: float, rms: float | None = None) -> Image.Image:
    """`x_adv` as an 8-bit image, each value rounded to the nearest grey level that stays within `eps` of `x`
    (so the budget holds exactly after rounding whenever `x` itself came from 8-bit pixels). With `rms` (a PSNR
    floor), if rounding lifts the root-mean-square change above it, the perturbation is first scaled by the
    largest factor (bisection, 1/1024 resolution) whose rounding keeps to it; factor 0 gives `x` itself."""
    x, v = x.detach().double().cpu()[0] * 255, x_adv.detach().double().cpu()[0] * 255
    lo, hi = torch.ceil(x - eps * 255 - 1e-6), torch.floor(x + eps * 255 + 1e-6)
    lo, hi = torch.minimum(lo, hi).clamp(0, 255), torch.maximum(lo, hi).clamp(0, 255)

    def rounded(scale: float) -> torch.Tensor:
        return torch.minimum(torch.maximum((x + scale * (v - x)).round(), lo), hi)

    def fits(q: torch.Tensor) -> bool:
        return rms is None or (q - x).pow(2).mean().sqrt().item() <= rms * 255 + 1e-9

    q = rounded(1.0)
    if not fits(q):
        low, high = 0.0, 1.0
        for _ in range(10):
            mid = (low + high) / 2
            low, high = (mid, high) if fits(rounded(mid)) else (low, mid)
        q = rounded(low)
    return to_pil(q / 255)


def random_sign(
    x: torch.Tensor, eps: float, keep: torch.Tensor, generator: torch.Generator, rms: float | None = None
) -> torch.Tensor:
    """The baseline of the same budget: ``x + eps * s``, s a uniformly random sign per value, in the region.
    With a PSNR floor `rms` below `eps`, the magnitudes are whole grey levels instead, ``floor(255 rms)`` or
    one more, as many of each as makes their root-mean-square at most `rms` and nearest to it, so that the
    baseline keeps the floor after 8-bit rounding without losing more of it than the attacks do."""
    s = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1
    if rms is None or rms >= eps:
        return x + project(x, eps * s, eps, keep)
    r, n = rms * 255, x.numel()
    low = math.floor(r)
    more = int(n * (r * r - low * low) / (2 * low + 1))  # values one level up
    levels = torch.full((n,), float(low))
    levels[torch.randperm(n, generator=generator)[:more]] += 1
    return x + project(x, s * levels.view(x.shape).to(x) / 255, eps, keep, rms)


def encode(pipe, x: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latent (the encoder's mean) of pixels `x` in [0, 1], differentiable, float32."""
    vae = pipe.vae
    return vae.encode((x * 2 - 1).to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor


class Denoiser:
    """The pipeline's noise prediction at any training timestep, conditioned on one prompt (no guidance)."""

    def __init__(self, pipe, prompt: str, latent: torch.Tensor):
        config = pipe.scheduler.config
        self.pipe, self.prediction = pipe, config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise StablekitError(f"protection supports epsilon and v-prediction models, not '{self.prediction}'")
        self.alphas = DDIMScheduler.from_config(config).alphas_cumprod.double().to(latent.device)
        self.cond = encode_prompts(pipe, [prompt], latent)[1]

    @property
    def timesteps(self) -> int:
        return len(self.alphas)

    def noised(self, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``z_t = sqrt(a_t) z + sqrt(1 - a_t) noise`` (one t per row)."""
        a = self.alphas[t].float().view(-1, *[1] * (z.ndim - 1))
        return a.sqrt() * z + (1 - a).sqrt() * noise

    def __call__(self, z_t: torch.Tensor, t: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise (float32) for latents `z_t` at timesteps `t`; `extra` channels (an inpainting
        UNet's mask and masked-image latents) are concatenated to the input."""
        unet, n = self.pipe.unet, len(z_t)
        cond = tree_map(lambda v: v.to(unet.dtype).expand(n, *v.shape[1:]), self.cond)
        inp = z_t if extra is None else torch.cat([z_t, extra], dim=1)
        out = unet(inp.to(unet.dtype), t, **cond, return_dict=False)[0].float()
        if self.prediction == "v_prediction":
            a = self.alphas[t].float().view(-1, 1, 1, 1)
            out = a.sqrt() * out + (1 - a).sqrt() * z_t
        return out
