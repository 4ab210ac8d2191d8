"""AdvDM's semantic attack through the denoiser (Liang et al., "Adversarial Example Does Good: Preventing
Painting Imitation from Diffusion Models via Adversarial Examples", ICML 2023; the semantic loss of Mist,
Liang & Wu 2023; a baseline of Diff-Protect, 2024): perturb the pixels to maximise the
denoiser's training loss, so the model cannot "understand" the image and its SDEdit / fine-tuning
outputs fall apart.

Objective (Monte-Carlo, one sample per PGD step): ``L(x') = mean((eps_theta(z_t, t, c) - eps)^2)``,
``z = E(x')`` (encoder mean), ``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps``, ``t ~ U{0..T-1}`` over all
training timesteps, ``eps ~ N(0, I)``, c the prompt ("a photo", no guidance). The gradient is
back-propagated through the UNet and the encoder. ``mode="max"`` (AdvDM, the default) ascends L;
``mode="min"`` descends it (Diff-Protect's AdvDM(-)).

Implemented as in Diff-Protect's ``mode='advdm'`` (advertorch's LinfPGDAttack): uniform random start,
constant step. Paper defaults: eps 16/255, step 1/255 (both already in [0, 1] pixel units: the code
doubles them for its [-1, 1] tensors), 100 steps, t uniform over [0, 1000). Ours: eps 8/255,
step 1/255, 100 steps.

Deviations: the encoder's mean latent instead of a sample from it; the loss averaged over latent
elements (the same sign of gradient as LDM's); v-prediction models are converted to noise prediction.
"""

from __future__ import annotations

import torch

from ..errors import StablekitError
from .core import Denoiser, encode
from .pgd import Budget, pgd

DEFAULTS = dict(steps=100, step_size=1 / 255, mode="max", prompt="a photo")
MODES = ("max", "min")


def draws(denoiser: Denoiser, z: torch.Tensor, n: int, generator: torch.Generator):
    """`n` (timestep, noise) pairs: t uniform over all training timesteps, noise standard normal."""
    t = torch.randint(0, denoiser.timesteps, (n,), generator=generator).to(z.device)
    noise = torch.randn((n, *z.shape[1:]), generator=generator).to(z)
    return t, noise


def semantic_loss(denoiser: Denoiser, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return ((denoiser(denoiser.noised(z, t, noise), t) - noise) ** 2).mean()


def objective(
    pipe,
    x_adv: torch.Tensor,
    x: torch.Tensor,
    mode: str = "max",
    prompt: str = "a photo",
    samples: int = 16,
    seed: int = 1234,
) -> float:
    """The semantic loss at `x_adv` over `samples` fixed (t, noise) draws (common to every image scored
    with the same seed), signed so that higher is a stronger protection for `mode`."""
    with torch.no_grad():
        z = encode(pipe, x_adv)
        d = Denoiser(pipe, prompt, z)
        t, noise = draws(d, z, samples, torch.Generator().manual_seed(seed))
        loss = semantic_loss(d, z.expand(samples, *z.shape[1:]), t, noise).item()
    return loss if mode == "max" else -loss


def check_mode(mode: str, name: str):
    if mode not in MODES:
        raise StablekitError(f"the {name} attack's mode is one of {', '.join(MODES)}, not '{mode}'")


def attack(pipe, x: torch.Tensor, budget: Budget, *, mode: str = "max", prompt: str = "a photo", **_) -> torch.Tensor:
    check_mode(mode, "semantic")
    with torch.no_grad():
        denoiser = Denoiser(pipe, prompt, encode(pipe, x))
    sign = 1.0 if mode == "max" else -1.0

    def loss(x_adv, i):
        z = encode(pipe, x_adv)
        t, noise = draws(denoiser, z, 1, budget.generator)
        return sign * semantic_loss(denoiser, z, t, noise)

    return pgd(x, loss, budget, random_start=True, desc=f"protect (semantic, {mode})")
