"""Projected gradient ascent in an L-infinity ball (Madry et al. 2018), the loop every protection runs.

Step i: draw an EOT transformation, take the gradient g of the method's ascent objective with respect
to the perturbation, step ``delta += step_i * sign(g)``, and project: ``|delta| <= eps`` per value,
zero outside the protected region, ``x + delta`` inside [0, 1], and with a PSNR floor (``rms``) scaled
down to its root-mean-square. ``step_i`` is constant, or decays linearly to 1% of `step_size` over the
run (PhotoGuard's schedule). A random start draws delta uniformly from the ball (advertorch's ``rand_init``,
PhotoGuard's start).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from . import eot as eot_
from .core import project


@dataclass(frozen=True)
class Budget:
    """What every protection's PGD runs under: the L-infinity budget `eps` and `steps` steps of `step_size`
    (pixel units), the region `keep` (1, 1, H, W) that may change, the `generator` of its random draws, the
    EOT transformations `eot`, the root-mean-square cap `rms` of a PSNR floor, and whether to show `progress`."""

    eps: float
    steps: int
    step_size: float
    keep: torch.Tensor
    generator: torch.Generator
    eot: dict[str, float] | None = None
    rms: float | None = None
    progress: bool = True


def pgd(
    x: torch.Tensor,
    objective: Callable[[torch.Tensor, int], torch.Tensor],
    budget: Budget,
    *,
    random_start: bool = False,
    decay: bool = False,
    desc: str = "protect",
) -> torch.Tensor:
    """`x` (1, 3, H, W) in [0, 1] plus the perturbation that ascends ``objective(x_adv, i)`` (a scalar whose
    gradient is the ascent direction) for `budget.steps` signed steps; returns the perturbed image (float)."""
    b = budget
    delta = torch.zeros_like(x)
    if random_start:
        delta = (torch.rand(x.shape, generator=b.generator) * 2 - 1).to(x) * b.eps
    delta = project(x, delta, b.eps, b.keep, b.rms)
    rng = np.random.default_rng([b.generator.initial_seed(), 0])  # EOT's own stream
    bar = tqdm(range(b.steps), desc=desc, disable=None if b.progress else True, leave=False)
    for i in bar:
        delta.requires_grad_(True)
        loss = objective(eot_.sample(x + delta, b.eot or {}, rng), i)
        (grad,) = torch.autograd.grad(loss, [delta])
        size = b.step_size * (1 - 0.99 * i / b.steps) if decay else b.step_size
        delta = project(x, delta.detach() + size * grad.sign(), b.eps, b.keep, b.rms)
        bar.set_postfix_str(f"objective {loss.item():.4g}", refresh=False)
    return x + delta
