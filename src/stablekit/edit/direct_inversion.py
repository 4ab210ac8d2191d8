"""Direct Inversion, "Boosting Diffusion-based Editing with 3 Lines of Code" (Ju et al., 2024;
reference code cure-lab/PnPInversion).

Pivot: DDIM inversion at guidance 1, ``z*[0..T]``. For each denoising step ``i`` the offset
``d_i = z*[i + 1] - step_i(z*[i], guided eps at w)`` is what the guided step misses. During editing
the source branch adds ``d_i`` after its step ``i`` (so it walks the pivot exactly, by construction)
and the target branch, generated alongside from the same ``z*[0]``, gets no offset: the branches are
disentangled, with no optimisation at all.

Paper defaults, kept: pivot at guidance 1, offsets at guidance 7.5, 50 DDIM steps, offsets on the
source branch only. Offsets are kept in float64: adding one to a float32 step that reproduces the
inversion's bit for bit gives the pivot bit for bit (in float32 the sum rounds, and a model that
amplifies errors from step to step, like a random one at guidance 7.5, magnifies that rounding).
Deviation: none in the inversion; the paper pairs it with attention control
(prompt-to-prompt etc.), which here is an optional controller of :func:`stablekit.edit.edit`.
"""

from __future__ import annotations

import torch

from ..latents import Schedule, eps


def offsets(pipe, sched: Schedule, pivot: torch.Tensor, text, guidance: float) -> torch.Tensor:
    """Per-step source-branch offsets (steps, images, C, h, w; float64) between `pivot` and guided DDIM steps
    from it."""
    uncond, cond = text
    steps = [sched.step(i, pivot[i], eps(pipe, sched, pivot[i], i, cond, uncond, guidance)) for i in range(len(sched))]
    return torch.stack([pivot[i + 1].double() - s.double() for i, s in enumerate(steps)])
