"""EDICT: Exact Diffusion Inversion via Coupled Transformations (Wallace et al., 2023;
reference code salesforce/EDICT).

Two coupled sequences x, y, both starting at the image latent. Denoising step ``i`` (DDIM
coefficients ``A_i, B_i``, guided noise ``e``)::

    x' = A x + B e(y)         y' = A y + B e(x')         (leapfrog: on odd steps y goes first)
    x'' = p x' + (1 - p) y'   y'' = p y' + (1 - p) x''   (mixing layers)

Every line is an affine map of one sequence given the other, so it is solved exactly backwards:
inversion undoes mixing then the updates in reverse order, evaluating the unet on exactly the
inputs the forward pass will see. Reconstruction is therefore exact up to float rounding for any
model, weights, prompt and guidance. Everything runs in float64 (the unet is cast while it runs, as
in the paper's code) because the inverse mixing amplifies rounding by up to 1/p per step.

Paper defaults: p = 0.93, 50 DDIM steps, guidance 3, leapfrog on; editing regenerates the last 80%
of the schedule (:data:`EDIT_STRENGTH`). Inversion always runs the whole schedule and stores both
trajectories, so an edit starts from ``(x, y)`` at step ``round(0.2 * steps)`` of them: exactly what
inverting only 80% gives, and one inversion serves any strength. Deviations: the image latent is
the encoder's mean (the paper's code samples the posterior); the x sequence is the output.
"""

from __future__ import annotations

import torch

from ..latents import Schedule, eps

EDIT_STRENGTH = 0.8  # fraction of the schedule an edit regenerates (the paper's default)


def _noise(pipe, sched, text, guidance):
    uncond, cond = text
    return lambda z, i: eps(pipe, sched, z, i, cond, uncond, guidance)


def step(pipe, sched: Schedule, i: int, x, y, text, guidance: float, p: float):
    """Denoising step `i` of the coupled pair (x, y)."""
    e = _noise(pipe, sched, text, guidance)
    a, b = (x, y) if i % 2 == 0 else (y, x)
    a = sched.step(i, a, e(b, i))
    b = sched.step(i, b, e(a, i))
    x, y = (a, b) if i % 2 == 0 else (b, a)
    x = p * x + (1 - p) * y
    return x, p * y + (1 - p) * x


def unstep(pipe, sched: Schedule, i: int, x, y, text, guidance: float, p: float):
    """The exact inverse of :func:`step`."""
    e = _noise(pipe, sched, text, guidance)
    y = (y - (1 - p) * x) / p
    x = (x - (1 - p) * y) / p
    a, b = (x, y) if i % 2 == 0 else (y, x)
    b = sched.unstep(i, b, e(a, i))
    a = sched.unstep(i, a, e(b, i))
    return (a, b) if i % 2 == 0 else (b, a)


def invert(pipe, sched: Schedule, z0: torch.Tensor, text, guidance: float, p: float):
    """x and y trajectories (steps + 1, images, C, h, w) in denoising order from the image latent `z0`."""
    xs, ys = [z0], [z0]
    for i in reversed(range(len(sched))):
        x, y = unstep(pipe, sched, i, xs[-1], ys[-1], text, guidance, p)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs[::-1]), torch.stack(ys[::-1])
