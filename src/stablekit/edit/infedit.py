"""InfEdit: "Inversion-Free Image Editing with Natural Language" (Xu et al., 2024;
reference code sled-group/InfEdit).

**DDCM virtual inversion.** With the largest variance, ``sigma_i^2 = 1 - alpha_{i+1}`` (the paper's
special schedule; the code's eta = 1), the DDIM step loses its direction term and becomes multi-step
consistency sampling: the x0 estimate re-noised with fresh noise,
``z_{i+1} = sqrt(alpha_{i+1}) x0 + sqrt(1 - alpha_{i+1}) noise_i``. For the source image the x0 is
known, ``z0``, so the source branch is re-noised from ``z0`` at every step and nothing is inverted.
The noise it holds is known too, ``e_cons = (z_src - sqrt(alpha) z0) / sqrt(1 - alpha)``; the
model's prediction ``e_src`` misses it by an error that the other branches share, so their x0 is::

    x0 = (z - sqrt(1 - alpha) (e - e_src + e_cons)) / sqrt(alpha) = z0 + f(z, e) - f(z_src, e_src)

with ``f(z, e) = (z - sqrt(1 - alpha) e) / sqrt(alpha)`` the one-step x0 prediction, and every
branch is re-noised with the same fresh noise. The source branch's x0 is ``z0`` at every step, bit
for bit; a branch with the source's prompt and guidance is the source branch (up to the unet's
batch arithmetic). The result is the target's x0 estimate after the last step.

**Unified attention control** (:class:`UnifiedAttentionControl`) adds a layout branch (the source
prompt at source guidance) and runs ``[source, layout, target]``:

* self-attention, every layer, both guidance halves: for the first ``self_replace_steps`` of the
  steps the target attends with the source's queries and keys over its own values (the source's
  attention maps) and the layout branch with the source's queries, keys and values (it stays the
  source); afterwards the target attends with its own and the layout branch with the target's
  queries over the source's keys and values (mutual self-attention: the source's content in the
  target's layout);
* cross-attention, conditional half: for the first ``cross_replace_steps`` the target's maps of the
  tokens it shares with the source are the layout branch's (prompt-to-prompt's replace or refine
  token maps and re-weighting, :mod:`.prompt_to_prompt`);
* local blend (``blend`` words): after each step the target outside the words' mask (prompt-to-prompt's
  mask) is set to the layout branch.

Without a controller only the DDCM branches [source, target] run; a
:class:`.prompt_to_prompt.PromptToPrompt` controller sees those two.

Paper defaults (the official code's PIE-Bench script; its demo: 15 steps, target guidance 2,
self-attention 0.3, thresholds 0.6), kept: 12 steps, source guidance 1, target guidance 2.3, eta 1,
cross-attention control for 0.7 and self-attention's first phase for 0.7 of the steps, refine
mode, blend threshold 0.55.

Deviations:

* no consistency model, no LCMScheduler: the paper samples an LCM (Dreamshaper v7) on
  LCMScheduler's timesteps (999 down to about 100) and returns the x0 estimate there; here the
  timesteps and alphas are DDIM's from the pipeline's own scheduler config
  (:class:`stablekit.latents.Schedule`), down to its smallest timestep. The DDCM step is exact algebra for
  any model and so is the source branch. What changes without a consistency model is ``f``: an
  LCM's is its consistency function, sharp at every step; an ordinary model's is the posterior
  mean, blurry at high noise. The sampler is then ancestral sampling at the largest variance,
  carrying only ``z0 + f - f_src`` from step to step (the blur of the two estimates partly
  cancels) and only the last steps' estimates are sharp. The paper's 12 steps are kept, not
  tuned for such models;
* the branches start at ``sqrt(alpha_0) z0 + sqrt(1 - alpha_0) noise`` (the DDCM forward sample);
  the code's default starts them from pure noise. eta < 1 (the code has it; its scripts run 1)
  is not offered. Noise comes from a CPU generator seeded with `seed`, not the global RNG;
* token alignment is prompt-to-prompt's: the code's refinement also gives each unmatched target
  token the map of the most similar unmatched source token (by text-encoder embedding), so a
  swapped word takes its predecessor's map: use ``mode="replace"`` for equal-length swaps;
* local blend: one word list and prompt-to-prompt's mask (summed maps, max-pooled, source and
  target words, constant threshold), from the first step to the last. The code has a second,
  source-side list whose region is restored from the source, raises the target threshold to
  ``0.15 / sqrt(alpha)`` at high noise, takes the mask from the replaced maps, skips the first
  step and discards the last blend (it returns the x0 estimate from before it);
* the first self-attention phase lasts while ``step < int(fraction * steps)`` (the code:
  ``(step + 1) / steps < fraction``; one step apart when ``fraction * steps`` is a whole number).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StablekitError
from ..latents import Schedule, eps, tile
from .prompt_to_prompt import PromptToPrompt, PromptToPromptConfig, _Scores

STEPS, GUIDANCE, SOURCE_GUIDANCE = 12, 2.3, 1.0


def _noised(alpha: float, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise


def step(sched: Schedule, i: int, z: torch.Tensor, e: torch.Tensor, z0: torch.Tensor, noise: torch.Tensor):
    """DDCM step `i` of branches `z` (branch-major, one row per image of `z0` in each branch; the first
    branch is the source) with guided noise predictions `e`: each branch's x0 estimate re-noised with its
    image's `noise`, shared by the branches, or after the last step the x0 estimates themselves."""
    a, n = sched.alphas[i].item(), len(z)
    src, e_src = tile(z[: len(z0)], n), tile(e[: len(z0)], n)
    x0 = tile(z0, n) + (z - src - (1 - a) ** 0.5 * (e - e_src)) / a**0.5
    return x0 if i == len(sched) - 1 else _noised(sched.alphas[i + 1].item(), x0, tile(noise, n))


@torch.no_grad()
def sample(
    pipe, sched: Schedule, z0: torch.Tensor, text, guidance: list[float], generator: torch.Generator, on_step=None
) -> torch.Tensor:
    """DDCM trajectory (steps + 1, branches * images, C, h, w) from the image latents `z0` (one row per
    image), one branch per prompt of `text` for each image (from :func:`stablekit.latents.encode_prompts`,
    branch-major; the first branch is the source) at guidance ``guidance[branch]``.
    ``on_step(i, latents)`` may change the latents after each step. The last row holds the x0 estimates."""
    uncond, cond = text
    n = len(cond["encoder_hidden_states"])
    scale = (
        1.0
        if all(g == 1 for g in guidance)
        else torch.tensor(guidance).to(z0).repeat_interleave(len(z0)).view(-1, 1, 1, 1)
    )

    def fresh():
        return torch.randn(z0.shape, generator=generator).to(z0)

    z = tile(_noised(sched.alphas[0].item(), z0, fresh()), n)
    traj = [z]
    for i in range(len(sched)):
        z = step(sched, i, z, eps(pipe, sched, z, i, cond, uncond, scale), z0, fresh())
        if on_step is not None:
            z = on_step(i, z)
        traj.append(z)
    return torch.stack(traj)


# For the [source, layout, target] branches: whose queries, keys and values each one's self-attention uses.
_FIRST = ([0, 0, 0], [0, 0, 0], [0, 0, 2])  # the target with the source's maps; the layout branch is the source
_MUTUAL = ([0, 2, 2], [0, 0, 2], [0, 0, 2])  # the layout branch: target queries on source keys and values


def _gather(projection, branches: list[int], halves: int):
    """`projection` whose output rows (halves, 3 branches, images) are taken from `branches`."""

    def project(x):
        y = projection(x)
        return y[torch.arange(len(y), device=y.device).view(halves, 3, -1)[:, branches].flatten()]

    return project


class _Rows(_Scores):
    """Stands in for an ``Attention`` module inside ``AttnProcessor``: its query, key and value
    projections take their batch rows from the branches in `rows`."""

    def __init__(self, attn, rows, halves: int):
        super().__init__(attn, lambda p: p)
        for name, branches in zip(("to_q", "to_k", "to_v"), rows, strict=False):
            setattr(self, name, _gather(getattr(attn, name), branches, halves))


@dataclass(frozen=True)
class UnifiedAttentionControlConfig(PromptToPromptConfig):
    """:class:`.prompt_to_prompt.PromptToPromptConfig` with the paper's defaults."""

    mode: str = "refine"
    cross_replace_steps: float = 0.7
    self_replace_steps: float = 0.7
    threshold: float = 0.55


class UnifiedAttentionControl(PromptToPrompt):
    """InfEdit's unified attention control of the [source, layout, target] branches (see the module
    docstring), for :func:`stablekit.edit.edit` with ``method="infedit"``. The arguments are
    :class:`.prompt_to_prompt.PromptToPrompt`'s; the defaults are the paper's."""

    name = "unified-attention-control"
    branches = 3
    usage = "unified attention control drives InfEdit's three branches: use stablekit.edit.edit(..., method='infedit')"

    Config = UnifiedAttentionControlConfig

    def _pairs(self, prompts) -> tuple[list[str], list[str]]:
        source, layout, target = self._branches(prompts)
        if source != layout:
            raise StablekitError(self.usage)
        return source, target

    def _touches(self, queries: int, cross: bool) -> bool:
        return not cross or super()._touches(queries, cross)

    def _stand_in(self, attn, cross: bool):
        if cross:
            return super()._stand_in(attn, cross)
        rows = _FIRST if self._until(self.config.self_replace_steps) else _MUTUAL
        return _Rows(attn, rows, 2 if self.call.do_cfg else 1)
