"""DiffusionGuard (Choi et al., "DiffusionGuard: A Robust Defense Against Malicious Diffusion-based Image
Editing", ICLR 2025; reference code choi403/DiffusionGuard): protection against inpainting, where an
editor keeps the sensitive region (a face) and repaints everything around it.

``mask`` is white over the region to protect -- the part the editor keeps; the editor's inpainting
mask is its complement. The perturbation lives inside the protected region only (outside it the
inpainting would discard it). Objective, ascended by PGD: the norm of the noise the UNet predicts at
the *earliest* denoising step (the first timestep of a ``inference_steps = 4``-step schedule), from
pure noise, given the inpainting inputs -- ``||eps_theta([n, 1 - k, E(x' * k)], t_0, c)||_2`` for an
inpainting UNet (9 input channels: noise, the inpainting mask, the latents of the image with the
repainted part blanked), k the protected region, n ~ N(0, I), c the empty prompt. A wrong first step sends the
whole inpainting astray. Mask augmentation: every step trains against a randomly shrunk protected
region, so the protection holds for masks the editor draws differently.

Implemented: the objective above with a fresh noise and a fresh augmented mask per step, the
gradient restricted to the augmented region (as the paper's ``grad * (1 - mask)``), no random start,
constant step. Paper defaults (``config/diffusionguard.yaml``): eps 16/255 and step 1/255 on the
[-1, 1] scale, i.e. **8/255 and 0.5/255 in pixel units**, 800 steps, 4 inference steps, batch 1.
Ours: eps 8/255, step 0.5/255, 800 steps, 4 inference steps.

Deviations:
* plain text-to-image UNets (4 input channels, like the embedded default model) have no mask inputs:
  diffusers' inpainting pipeline then blends the known region, noised to the current level with the
  same noise, into the latents after every step, so the UNet sees
  ``k * (sqrt(a) E(x') + sqrt(1 - a) n) + (1 - k) * n`` (k at latent size). The pipeline first
  blends after its first step, so we take that input at the second timestep of the 4-step schedule,
  the earliest one whose UNet input holds the image (with a zero-terminal-SNR schedule, like the
  embedded model's, the first timestep has no image signal at all); the objective, the norm of the
  predicted noise, is unchanged;
* mask augmentation: the paper perturbs the region's contour points with OpenCV (random offsets
  smoothed along the contour, repeated up to 15 times, kept inside the original region). Ours drops
  pixels whose distance to the region's border is below ``r * u(p)``, r uniform in
  [0, ``shrink`` * R] (R the radius of a disc of the region's area, ``shrink`` 0.5) and u a random
  field in [0, 1] smoothed over 0.1 R pixels: a random, smoothly varying shrink that stays inside the
  region (no OpenCV needed);
* the encoder's mean latent instead of a sample from it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..errors import StablekitError
from ..latents import Schedule
from .core import Denoiser, encode
from .pgd import Budget, pgd

DEFAULTS = dict(steps=800, step_size=0.5 / 255, prompt="", inference_steps=4, shrink=0.5)


def shrink_mask(
    keep: np.ndarray, rng: np.random.Generator, shrink: float = 0.5, smoothness: float = 0.1
) -> np.ndarray:
    """A random shrink of the boolean region `keep` (H, W), never empty, always inside `keep`."""
    radius = math.sqrt(keep.sum() / math.pi)
    depth = rng.uniform(0, shrink * radius)
    field = ndimage.gaussian_filter(rng.uniform(size=keep.shape), sigma=max(smoothness * radius, 0.5))
    field = (field - field.min()) / max(field.max() - field.min(), 1e-12)
    out = keep & (ndimage.distance_transform_edt(keep) > depth * field)
    return out if out.any() else keep


def _check(pipe, keep: torch.Tensor):
    if bool(keep.all()):
        raise StablekitError(
            "diffusionguard needs mask=: white over the region to protect (what an inpainting "
            "editor keeps), black where it would repaint"
        )
    if pipe.unet.config.in_channels not in (4, 9):
        raise StablekitError(
            f"diffusionguard needs a UNet with 4 (text-to-image) or 9 (inpainting) input channels, "
            f"not {pipe.unet.config.in_channels}"
        )


class _Objective:
    """The noise-prediction norm at the earliest step for the protected region `keep` (1, 1, H, W)."""

    def __init__(self, pipe, x: torch.Tensor, prompt: str, inference_steps: int):
        self.pipe, self.x = pipe, x
        with torch.no_grad():
            z = encode(pipe, x)
        self.latent_shape = z.shape[1:]
        self.latent_size = z.shape[-2:]
        self.denoiser = Denoiser(pipe, prompt, z)
        first = 0 if pipe.unet.config.in_channels == 9 else min(1, inference_steps - 1)  # see the deviations
        self.t = Schedule(pipe, inference_steps).timesteps[first : first + 1].to(x.device)
        self.sigma = float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))

    def __call__(self, x_adv: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(keep, size=self.latent_size, mode="nearest")
        n = len(noise)
        if self.pipe.unet.config.in_channels == 9:  # an inpainting UNet: [noise, mask, masked-image latents]
            masked = encode(self.pipe, (x_adv - 0.5) * keep + 0.5)  # x' outside the kept region -> 0 in [-1, 1]
            extra = torch.cat([1 - m, masked], dim=1).expand(n, -1, -1, -1)
            eps = self.denoiser(noise * self.sigma, self.t.expand(n), extra)
        else:  # a text-to-image UNet, as diffusers' inpainting pipeline blends its known region
            z0 = encode(self.pipe, self.x + (x_adv - self.x) * keep)
            z_t = m * self.denoiser.noised(z0, self.t, noise) + (1 - m) * noise
            eps = self.denoiser(z_t, self.t.expand(n))
        return eps.flatten(1).norm(dim=1).mean()


def objective(
    pipe,
    x_adv: torch.Tensor,
    x: torch.Tensor,
    keep: torch.Tensor,
    prompt: str = "",
    inference_steps: int = 4,
    samples: int = 8,
    seed: int = 1234,
) -> float:
    """The noise-prediction norm at the earliest step, averaged over `samples` fixed noises, with the
    un-augmented region (higher is a stronger protection)."""
    _check(pipe, keep)
    with torch.no_grad():
        f = _Objective(pipe, x, prompt, inference_steps)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((samples, *f.latent_shape), generator=g).to(x)
        return f(x_adv, keep, noise).item()


def attack(
    pipe, x: torch.Tensor, budget: Budget, *, prompt: str = "", inference_steps: int = 4, shrink: float = 0.5, **_
) -> torch.Tensor:
    keep, generator = budget.keep, budget.generator
    _check(pipe, keep)
    f = _Objective(pipe, x, prompt, inference_steps)
    rng = np.random.default_rng([generator.initial_seed(), 1])  # the mask augmentation's own stream
    region = keep[0, 0].bool().cpu().numpy()

    def loss(x_adv, i):
        k = keep
        if shrink > 0:
            k = torch.from_numpy(shrink_mask(region, rng, shrink)).to(keep)[None, None]
        noise = torch.randn((1, *f.latent_shape), generator=generator).to(x)
        return f(x_adv, k, noise)

    return pgd(x, loss, budget, desc="protect (diffusionguard)")
