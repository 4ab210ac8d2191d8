"""Diff-Protect's score-distillation attack (Xue et al., "Toward Effective Protection against
Diffusion-based Mimicry through Score Distillation", ICLR 2024; reference code xavihart/Diff-Protect).

The semantic loss of :mod:`.semantic_attack` has gradient ``2 (eps_theta - eps)^T d eps_theta/d z_t
sqrt(a_t) dz/dx``. Score distillation (Poole et al. 2022) drops the UNet Jacobian: the gradient is
``(eps_theta(z_t, t, c) - eps)^T dz/dx``, so the UNet runs forward only, under ``torch.no_grad``, and
the backward pass goes through the encoder alone -- the paper's finding that the encoder is the weak
point, and its halving of time and memory. ``mode="min"`` (the default, the paper's SDS(-),
``g_mode='-'`` in its config) descends along it, *minimising* the semantic loss, which the paper
finds the more effective protection; ``mode="max"`` (SDS(+)) ascends.

Implemented as ``pgd_sds`` of Diff-Protect: one (t, noise) draw per step, t uniform over all
training timesteps, prompt "a photo", no random start, constant step, unweighted residual. Paper
defaults: eps 16/255, step 1/255 (pixel units; its code doubles both for [-1, 1] tensors), 100 steps.
Ours: eps 8/255, step 1/255, 100 steps.

Deviations: the encoder's mean latent instead of a sample from it; the target-image term of its
SDST variant and its Diff-PGD option are not implemented.
"""

from __future__ import annotations

import torch

from . import semantic_attack
from .core import Denoiser, encode
from .pgd import Budget, pgd

DEFAULTS = dict(steps=100, step_size=1 / 255, mode="min", prompt="a photo")
MODES = semantic_attack.MODES


def objective(pipe, x_adv: torch.Tensor, x: torch.Tensor, mode: str = "min", **kw) -> float:
    """The semantic loss it approximates (:func:`.semantic_attack.objective`, same `prompt`, `samples` and
    `seed`), signed for `mode`."""
    return semantic_attack.objective(pipe, x_adv, x, mode=mode, **kw)


def attack(pipe, x: torch.Tensor, budget: Budget, *, mode: str = "min", prompt: str = "a photo", **_) -> torch.Tensor:
    semantic_attack.check_mode(mode, "sds")
    with torch.no_grad():
        denoiser = Denoiser(pipe, prompt, encode(pipe, x))
    sign = 1.0 if mode == "max" else -1.0

    def surrogate(x_adv, i):
        z = encode(pipe, x_adv)  # the only backward pass: through the encoder
        with torch.no_grad():
            t, noise = semantic_attack.draws(denoiser, z, 1, budget.generator)
            residual = denoiser(denoiser.noised(z.detach(), t, noise), t) - noise
        return sign * (z * residual).sum()  # its gradient is the SDS gradient residual^T dz/dx

    return pgd(x, surrogate, budget, desc=f"protect (sds, {mode})")
