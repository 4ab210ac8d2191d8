"""Robust representation consistency: the UNet's own representation of a noised latent is trained to agree with
that of a temporally adjacent, less noised point of the same trajectory and to differ from the other images of
the batch (instance discrimination, a contrastive denoising objective).

Paper: "Robust Representation Consistency Model via Contrastive Denoising" (Lei et al., ICLR 2025), reference
code https://github.com/jiachenlei/rRCM. For each image, one noise sample and two timesteps t and t - `gap` give
two points of one diffusion trajectory; the online branch (the UNet's middle block features at the noisier
point, through a projector and a predictor) must pick out the target branch's projection of the adjacent point
among the batch's (InfoNCE at temperature `temperature`); the target branch takes no gradient. The claim tested
by ``stablekit bench training``: a classifier on these representations, fed a noised input once, certifies
more accuracy under randomized smoothing than denoising with a diffusion model and then classifying.

Defaults: `gap` = 50 timesteps, `temperature` = 0.2, `weight` = 0.5, a 256-wide projector and predictor to 128
dimensions.

Deviations:
  1. the contrastive loss is added to the teacher's velocity loss (weight `weight`), so the model still
     generates and is compared with the other recipes on equal terms; the paper's pre-training is the
     representation objective alone (with a consistency term), followed by supervised fine-tuning;
  2. the target branch is the online UNet under stop-gradient, not an EMA copy, and negatives are the batch's
     other images only (no queue); the UNet's middle block, averaged over space, is the representation;
  3. both points share the caption (or its dropped empty version) of classifier-free guidance training;
  4. the noise is added to VAE latents (the paper's smoothing noise is in pixel space); `gap`, `temperature`,
     `weight` and the head widths are our choices for this scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..default_model import train as teacher
from ..errors import StablekitError
from .base import Recipe, register
from .features import encoder_features


def info_nce(online: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each online row picking its own target row among the batch's, cosine similarity over
    `temperature`."""
    logits = F.normalize(online, dim=1) @ F.normalize(target, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(online)))


def head(width: int, hidden: int, out: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, out))


@register
class RobustConsistency(Recipe):
    name = "rrcm"
    paper = "Robust Representation Consistency Model via Contrastive Denoising (2025)"

    @dataclass(frozen=True)
    class Config:
        gap: int = 50
        temperature: float = 0.2
        weight: float = 0.5

        def __post_init__(self):
            if not 1 <= self.gap < 1000:
                raise StablekitError(f"gap={self.gap}: need 1 <= gap < 1000 timesteps")
            if not self.temperature > 0 or not self.weight > 0:
                raise StablekitError(f"temperature={self.temperature}, weight={self.weight}: both must be > 0")

    def prepare(self, unet):
        width = unet.config.block_out_channels[-1]
        self.module = torch.nn.ModuleDict({"projector": head(width, 256, 128), "predictor": head(128, 256, 128)})
        self.features = {}
        unet.mid_block.register_forward_hook(lambda m, args, out: self.features.__setitem__("online", out))
        return self.module

    def loss(self, unet, x0, noise, t, cond, sched, snr, gen):
        v = teacher.v_loss(unet, x0, noise, t, cond, sched, snr)  # its forward leaves the mid block's output
        online = self.module["predictor"](self.module["projector"](self.features.pop("online").mean(dim=(2, 3))))
        t2 = (t - self.config.gap).clamp(min=0)
        with torch.no_grad():
            target = self.module["projector"](encoder_features(unet, sched.add_noise(x0, noise, t2), t2, cond))
        return v + self.config.weight * info_nce(online, target, self.config.temperature)
