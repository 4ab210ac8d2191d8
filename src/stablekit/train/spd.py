"""Shortest path diffusion: each spatial frequency of the latent corrupted on its own schedule, the one the paper
derives as the shortest path (in the Fisher metric) from the data distribution to white noise.

Paper: "Image generation with shortest path diffusion" (Das et al., ICML 2023), reference code
https://github.com/mtkresearch/shortest-path-diffusion. The data are modelled as Gaussian with a power spectrum
``S(f) = c1 / (c2 + |f|) ** m`` over integer frequencies; the shortest path gives frequency f the cumulative
signal fraction ``alpha_bar_f(tau) = (1 - S(f) ** tau) / (1 - S(f))``, with ``tau = (T - 1 - t) / T`` running
from 1 (the data) to 0 (noise) over the timesteps t, as in the reference. A latent is noised in the orthonormal
2-D Fourier domain, ``X_t = sqrt(alpha_bar_f) X_0 + sqrt(1 - alpha_bar_f) E`` with ``E`` the transform of white
noise, so high frequencies (low power) lose their signal-to-noise ratio first and low ones keep it longest (the
paper's "sharpening" plus "noise deblurring"). :class:`ShortestPathScheduler` samples such a model with the
reference's deterministic (DDIM) update, frequency by frequency; ``stablekit.load`` puts it on a trained folder.

Defaults: the reference's ``c1 = 1.59, c2 = 0.0086, m = 2``, T = 1000.

Deviations:
  1. the spectrum is applied to the 16x16 VAE latent's frequencies (the paper corrupts 64x64 pixels, fitting the
     constants to CIFAR/ImageNet pixels), with the reference's constants unchanged;
  2. the network predicts the velocity ``v = sqrt(alpha_bar) E - sqrt(1 - alpha_bar) X_0`` per frequency with an
     unweighted squared error (the reference predicts the noise), so that both ends of the schedule are stable
     and the shared loop's parameterization is kept; no Min-SNR weighting, as the SNR differs per frequency;
  3. T = 1000 training timesteps (the reference uses 4000); sampling uses "trailing" timesteps like the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from ..errors import StablekitError
from .base import Recipe, register


def spectrum(size: int, c1: float, c2: float, m: float) -> torch.Tensor:
    """(size, size) float64: the assumed power ``c1 / (c2 + |f|) ** m`` at each integer frequency of the FFT grid."""
    f = torch.fft.fftfreq(size, d=1.0 / size, dtype=torch.float64)
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    return c1 / (c2 + radius) ** m


def coefficients(t: torch.Tensor, size: int, c1: float, c2: float, m: float, steps: int = 1000):
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)), each (B, 1, size, size) float32, at timesteps `t` (B,) in
    [-1, steps - 1]: ``tau = (steps - 1 - t) / steps``, so t = -1 is the clean data and t = steps - 1 pure noise."""
    s = spectrum(size, c1, c2, m)
    tau = ((steps - 1 - t.double()) / steps).clamp(0.0, 1.0)[:, None, None, None]
    near_one = (s - 1).abs() < 1e-9
    ab = torch.where(near_one, tau, (1 - s**tau) / torch.where(near_one, torch.full_like(s, 2.0), 1 - s))
    ab = ab.clamp(0.0, 1.0)
    return ab.sqrt().float(), (1 - ab).sqrt().float()


def fourier(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fft2(x, dim=(-2, -1), norm="ortho")


def spatial(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifft2(x, dim=(-2, -1), norm="ortho").real


class ShortestPathScheduler(SchedulerMixin, ConfigMixin):
    """The deterministic (DDIM) sampler of a shortest path diffusion model that predicts the per-frequency velocity:
    from ``X_t`` and ``V``, ``X_0 = a X_t - s V`` and ``E = s X_t + a V``, then ``X_prev = a' X_0 + s' E``."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, c1: float = 1.59, c2: float = 0.0086, m: float = 2.0):
        self.init_noise_sigma = 1.0
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self.num_inference_steps = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        n = self.config.num_train_timesteps
        ts = torch.arange(n, 0, -n / num_inference_steps).round().long() - 1
        self.timesteps = ts.to(device)
        self.num_inference_steps = num_inference_steps

    def _ab(self, t: int, sample: torch.Tensor):
        c = self.config
        a, s = coefficients(torch.tensor([int(t)]), sample.shape[-1], c.c1, c.c2, c.m, c.num_train_timesteps)
        return a.to(sample.device), s.to(sample.device)

    def step(self, model_output, timestep, sample, return_dict: bool = True, **kwargs):
        i = (self.timesteps == timestep).nonzero()[0].item()
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        a, s = self._ab(timestep, sample)
        a2, s2 = self._ab(prev, sample)
        x, v = fourier(sample.float()), fourier(model_output.float())
        x0, eps = a * x - s * v, s * x + a * v
        out = spatial(a2 * x0 + s2 * eps).to(sample.dtype)
        return SchedulerOutput(prev_sample=out) if return_dict else (out,)


@register
class ShortestPath(Recipe):
    name = "spd"
    paper = "Image generation with shortest path diffusion (2023)"

    @dataclass(frozen=True)
    class Config:
        c1: float = 1.59
        c2: float = 0.0086
        m: float = 2.0

        def __post_init__(self):
            if not (self.c1 > 0 and self.c2 > 0 and self.m > 0):
                raise StablekitError(f"c1={self.c1}, c2={self.c2}, m={self.m}: all must be > 0")

    def loss(self, unet, x0, noise, t, cond, sched, snr, gen):
        c = self.config
        a, s = coefficients(t, x0.shape[-1], c.c1, c.c2, c.m)
        x, e = fourier(x0), fourier(noise)
        pred = unet(spatial(a * x + s * e), t, cond).sample
        return (pred.float() - spatial(a * e - s * x)).pow(2).mean()

    def sampler(self, scheduler):
        return ShortestPathScheduler(c1=self.config.c1, c2=self.config.c2, m=self.config.m)
