"""ResShift: super-resolution by shifting the residual between the low- and high-resolution images.

Paper: "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual Shifting" (Yue, Wang and Loy,
2023); reference code https://github.com/zsyOAOA/ResShift.

Implemented: the residual-shifting Markov chain. With ``e0 = y0 - x0`` (the upsampled low-resolution image minus
the high-resolution one) and an increasing schedule ``eta_1 < ... < eta_T`` (``eta_T`` close to 1),

    q(x_t | x0, y0)      = N(x0 + eta_t e0, kappa^2 eta_t I)
    q(x_t | x_{t-1}, y0) = N(x_{t-1} + alpha_t e0, kappa^2 alpha_t I),        alpha_t = eta_t - eta_{t-1}
    q(x_{t-1} | x_t, x0) = N(eta_{t-1}/eta_t x_t + alpha_t/eta_t x0, kappa^2 eta_{t-1}/eta_t alpha_t I)

so the chain starts from ``x_T = y0 + kappa sqrt(eta_T) noise`` (no pure noise) and takes T network calls. The
schedule is the paper's: ``sqrt(eta_t) = sqrt(eta_1) b0^beta_t`` with ``beta_t = ((t-1)/(T-1))^p (T-1)`` and
``b0`` chosen so that ``sqrt(eta_T)`` is ``etas_end``; ``sqrt(eta_1) = min(min_noise_level / kappa,
min_noise_level)``. The network predicts x0 from the scaled state ``x_t / sqrt(kappa^2 eta_t + 1)``, the step
index and the condition y0, trained with the mean squared error on x0 at uniformly drawn steps.

Defaults: the reference's 4-step configuration (``realsr_swinunet_realesrgan256_journal.yaml``): T = 4,
kappa = 2, p = 0.3, min_noise_level = 0.2, etas_end = 0.99, x0 prediction, normalised input.

Deviations:
1. Pixel space (images in [-1, 1]) instead of a VQGAN's latent space: the embedded world's 64x64 images are small
   enough, and the embedded model's VAE is not trained for SR.
2. A small convolutional UNet (:mod:`.sr_net`) instead of the Swin-UNet, trained for minutes on the embedded
   world's scenes and a few photos with bicubic degradation, with the mean squared error only (the 4-step
   configuration adds an LPIPS term; no LPIPS network is available offline).
3. The network's output is added to y0 to give x0 (it predicts the high-frequency residual ``x0 - y0``, which is
   zero at initialisation); the reference network outputs x0 itself. This is the same prediction target
   reparametrised, and trains in far fewer steps.
4. No EMA of the weights, Adam at a constant learning rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import StablekitError
from . import sr_net


@dataclass(frozen=True)
class ResShiftConfig:
    """The chain: `steps` (T), `kappa` (noise scale), `power` (p), `min_noise_level`, `etas_end` (sqrt(eta_T))."""

    steps: int = 4
    kappa: float = 2.0
    power: float = 0.3
    min_noise_level: float = 0.2
    etas_end: float = 0.99

    def __post_init__(self):
        if self.steps < 2:
            raise StablekitError(f"ResShift needs at least 2 steps, not {self.steps}")
        if self.kappa <= 0 or self.power <= 0:
            raise StablekitError(f"kappa and power must be > 0 (got {self.kappa}, {self.power})")
        if not 0 < min(self.min_noise_level, self.min_noise_level / self.kappa) < self.etas_end < 1:
            raise StablekitError("the schedule needs 0 < sqrt(eta_1) < etas_end < 1")

    def etas(self) -> torch.Tensor:
        """eta_1 .. eta_T (float64)."""
        start = min(self.min_noise_level / self.kappa, self.min_noise_level)
        t = self.steps
        base = math.exp(math.log(self.etas_end / start) / (t - 1))
        beta = torch.linspace(0, 1, t, dtype=torch.float64) ** self.power * (t - 1)
        return (start * base**beta) ** 2


class ResShift:
    """The residual-shifting chain of `config` around a network that predicts x0 (images in [-1, 1])."""

    def __init__(self, config: ResShiftConfig = ResShiftConfig()):
        self.config = config
        self.etas = config.etas()
        self.etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), self.etas[:-1]])

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x0, y0) at step indices `t` (0 .. T-1 for eta_1 .. eta_T)."""
        eta = self._at(self.etas, t, x0)
        return x0 + eta * (y0 - x0) + self.config.kappa * eta.sqrt() * noise

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0); at the first step the mean is x0 and the variance 0."""
        eta, prev = self._at(self.etas, t, x_t), self._at(self.etas_prev, t, x_t)
        alpha = eta - prev
        mean = prev / eta * x_t + alpha / eta * x0
        return mean, self.config.kappa**2 * prev / eta * alpha

    def predict_x0(self, net, x_t: torch.Tensor, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's x0 from the normalised state, the step index and the condition: y0 plus its output."""
        scale = (self.config.kappa**2 * self._at(self.etas, t, x_t) + 1).sqrt()
        return y0 + net(torch.cat([x_t / scale, y0], dim=1), t).sample

    def loss(self, net, x0: torch.Tensor, y0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The training loss: mean squared error of the predicted x0 at uniformly drawn steps."""
        t = torch.randint(0, self.config.steps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return (self.predict_x0(net, self.q_sample(x0, y0, t, noise), y0, t) - x0).pow(2).mean()

    @torch.no_grad()
    def sample(self, net, y0: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        """Run the chain from x_T = y0 + kappa sqrt(eta_T) noise down to x0: T network calls."""
        last = self.config.steps - 1
        x = y0 + self.config.kappa * self.etas[last].sqrt().item() * randn_like(y0, g)
        for i in range(last, -1, -1):
            t = torch.full((len(y0),), i, dtype=torch.long, device=y0.device)
            mean, var = self.posterior(x, self.predict_x0(net, x, y0, t).clamp(-1, 1), t)
            x = mean + var.sqrt() * randn_like(y0, g) if i > 0 else mean
        return x

    @torch.no_grad()
    def sample_ode(self, net, y0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The deterministic chain from x_T = y0 + kappa sqrt(eta_T) `noise`: each step keeps the noise its state
        implies, ``x_{t-1} = x0 + eta_{t-1} (y0 - x0) + kappa sqrt(eta_{t-1}) eps`` (DDIM's eta = 0 for this
        chain), so the result is a function of `noise` alone; T network calls."""
        etas, kappa = self.etas.tolist(), self.config.kappa
        x = y0 + kappa * etas[-1] ** 0.5 * noise.to(y0)
        for i in range(self.config.steps - 1, -1, -1):
            t = torch.full((len(y0),), i, dtype=torch.long, device=y0.device)
            x0 = self.predict_x0(net, x, y0, t).clamp(-1, 1)
            if i == 0:
                return x0
            eps = (x - x0 - etas[i] * (y0 - x0)) / (kappa * etas[i] ** 0.5)
            x = x0 + etas[i - 1] * (y0 - x0) + kappa * etas[i - 1] ** 0.5 * eps
        return x

    def recipe(self) -> dict:
        return {"method": "resshift"} | asdict(self.config)


def randn_like(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `x`, drawn on the CPU from `g` (device-independent results)."""
    return torch.randn(x.shape, generator=g).to(x.device, x.dtype)


def super_resolve(lr: torch.Tensor, net=None, config: ResShiftConfig = ResShiftConfig(), seed: int = 0):
    """(B, 3, h, w) low-resolution images in [0, 1] -> (B, 3, 4h, 4w) by ResShift with the shipped network
    (or `net`), and the number of network calls."""
    net = net if net is not None else sr_net.load_net(sr_net.WEIGHTS / "resshift_x4.safetensors")
    y0 = sr_net.upsample(lr) * 2 - 1
    out = ResShift(config).sample(net, y0, torch.Generator().manual_seed(seed))
    return ((out + 1) / 2).clamp(0, 1), config.steps
