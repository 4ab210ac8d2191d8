"""The plain diffusion super-resolution baseline: a denoising diffusion model conditioned on the upsampled
low-resolution image, started from pure noise.

Paper: "Image Super-Resolution via Iterative Refinement" (SR3; Saharia et al., 2021), the baseline ResShift
compares its step count against; no official reference code.

Implemented: DDPM training (noise prediction, 1000 steps, linear betas 1e-4 .. 0.02, diffusers' ``DDPMScheduler``)
of the shared network (:mod:`.sr_net`) on the noisy state stacked with the bicubic-upsampled condition; sampling
with diffusers' ``DDIMScheduler`` (eta 0), 50 steps by default.

Deviations:
1. The same small UNet, data and training budget as the shipped ResShift network (a like-for-like baseline), not
   SR3's large network trained for a million steps.
2. Sampled with DDIM's 50 steps rather than SR3's 100 to 2000 ancestral steps, the "50-step SR diffusion"
   ResShift is compared to.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import StablekitError
from . import sr_net


@dataclass(frozen=True)
class SRDiffusionConfig:
    """DDPM training schedule (`train_steps`, linear betas `beta_start` .. `beta_end`) and DDIM sampling `steps`."""

    train_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    steps: int = 50

    def __post_init__(self):
        if not 1 <= self.steps <= self.train_steps:
            raise StablekitError(f"steps must be in 1 .. {self.train_steps}, not {self.steps}")

    def schedulers(self):
        from diffusers import DDIMScheduler, DDPMScheduler

        common = dict(num_train_timesteps=self.train_steps, beta_start=self.beta_start, beta_end=self.beta_end)
        ddim = DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True)
        return DDPMScheduler(**common), ddim


class SRDiffusion:
    """Conditional DDPM for super-resolution around a noise-predicting network (images in [-1, 1])."""

    def __init__(self, config: SRDiffusionConfig = SRDiffusionConfig()):
        self.config = config
        self.train_scheduler, self.scheduler = config.schedulers()

    def loss(self, net, x0: torch.Tensor, y0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, self.config.train_steps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = self.train_scheduler.add_noise(x0, noise, t)
        return (net(torch.cat([x_t, y0], dim=1), t).sample - noise).pow(2).mean()

    @torch.no_grad()
    def sample(self, net, y0: torch.Tensor, g: torch.Generator | None = None, x_T: torch.Tensor | None = None):
        """DDIM (eta 0: the diffusion ODE) from pure noise drawn from `g`, or from the boundary condition `x_T`
        (shaped like `y0`): `config.steps` network calls."""
        self.scheduler.set_timesteps(self.config.steps)
        x = torch.randn(y0.shape, generator=g) if x_T is None else x_T
        x = x.to(y0.device, y0.dtype)
        for t in self.scheduler.timesteps:
            eps = net(torch.cat([x, y0], dim=1), t.expand(len(y0)).to(y0.device)).sample
            x = self.scheduler.step(eps, t, x).prev_sample
        return x

    def recipe(self) -> dict:
        return {"method": "sr_diffusion"} | asdict(self.config)


def super_resolve(lr: torch.Tensor, net=None, config: SRDiffusionConfig = SRDiffusionConfig(), seed: int = 0):
    """(B, 3, h, w) low-resolution images in [0, 1] -> (B, 3, 4h, 4w) by the baseline with the shipped network
    (or `net`), and the number of network calls."""
    net = net if net is not None else sr_net.load_net(sr_net.WEIGHTS / "sr_diffusion_x4.safetensors")
    y0 = sr_net.upsample(lr) * 2 - 1
    out = SRDiffusion(config).sample(net, y0, torch.Generator().manual_seed(seed))
    return ((out + 1) / 2).clamp(0, 1), config.steps
