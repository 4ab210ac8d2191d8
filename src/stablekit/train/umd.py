"""Unified masked diffusion (UMD): a masked auto-encoding step without noise added to the diffusion schedule, and
masked-plus-noised inputs at every other step, so one network learns both to denoise and to fill in patches.

Paper: "Unified Auto-Encoding with Masked Diffusion" (Hansen-Estruch et al., 2024), reference code
https://github.com/philippe-eecs/small-vision. With probability `no_noise_prob` a training image takes the
noise-free step: `mask_ratio_no_noise` of its patches are hidden and the network reconstructs the clean latent
on the hidden patches (a masked auto-encoder's loss). Otherwise it is noised as usual at a uniform timestep and
`mask_ratio` of its patches are hidden; the network predicts the teacher's velocity target everywhere. Generation
uses unmasked inputs; the learned representation (the UNet's own features of a clean, unmasked latent) is read
by a linear probe (``stablekit bench training``).

Defaults: the reference configuration's ``no_noise_prob = 0.5``, ``mask_ratio_no_noise = 0.75``,
``mask_ratio = 0.375``; patches of 2x2 latent cells (8x8 pixels, the reference's patch 4 on 64x64 pixels
covers 4x4).

Deviations:
  1. a UNet has no tokens to drop: hidden patches are set to zero in its input (the reference's ViT encoder
     skips them), so masking saves no compute;
  2. the noise-free step is fed at timestep 0 of the schedule (the reference adds a step before its first);
     the teacher's "trailing" samplers never query timestep 0, so sampling is unaffected;
  3. the noised steps keep the teacher's Min-SNR-5 weighted velocity loss on all patches, hidden or not;
  4. a latent diffusion model's VAE latents are masked, as in the reference's latent-diffusion runs, at the
     stated patch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StablekitError
from .base import Recipe, register


def patch_keep(shape: tuple, patch: int, ratio: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, 1, H, W) floats, 1 where a latent cell is kept: for image i, round(`ratio[i]` * patches) of its
    `patch`x`patch` patches, drawn uniformly from `gen`, are hidden (0)."""
    b, _, h, w = shape
    n = (h // patch) * (w // patch)
    rank = torch.rand(b, n, generator=gen).argsort(dim=1).argsort(dim=1)
    hidden = rank < (ratio * n).round()[:, None]
    keep = (~hidden).float().view(b, 1, h // patch, w // patch)
    return keep.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)


@register
class UnifiedMasked(Recipe):
    name = "umd"
    paper = "Unified Auto-Encoding with Masked Diffusion (2024)"

    @dataclass(frozen=True)
    class Config:
        no_noise_prob: float = 0.5
        mask_ratio_no_noise: float = 0.75
        mask_ratio: float = 0.375
        patch: int = 2

        def __post_init__(self):
            if not 0 <= self.no_noise_prob < 1:
                raise StablekitError(f"no_noise_prob={self.no_noise_prob}: need 0 <= no_noise_prob < 1")
            for k in ("mask_ratio_no_noise", "mask_ratio"):
                if not 0 <= getattr(self, k) < 1:
                    raise StablekitError(f"{k}={getattr(self, k)}: need 0 <= {k} < 1")
            if self.patch not in (1, 2, 4, 8):
                raise StablekitError(f"patch={self.patch}: choose 1, 2, 4 or 8 latent cells")

    def loss(self, unet, x0, noise, t, cond, sched, snr, gen):
        c = self.config
        clean = torch.rand(len(x0), generator=gen) < c.no_noise_prob
        ratio = torch.where(clean, c.mask_ratio_no_noise, c.mask_ratio)
        keep = patch_keep(x0.shape, c.patch, ratio, gen)
        rows = clean[:, None, None, None]
        x_in = torch.where(rows, x0, sched.add_noise(x0, noise, t)) * keep
        t_in = torch.where(clean, torch.zeros_like(t), t)
        pred = unet(x_in, t_in, cond).sample.float()
        w = snr[t].clamp(1.0, 5.0) / (snr[t] + 1)
        noised = w * (pred - sched.get_velocity(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        hidden = (1 - keep).expand_as(x0)
        masked = ((pred - x0).pow(2) * hidden).sum(dim=(1, 2, 3)) / hidden.sum(dim=(1, 2, 3)).clamp(min=1)
        return torch.where(clean, masked, noised).mean()
