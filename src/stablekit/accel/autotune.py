"""Choose DeepCache's interval and branch (PAPERS.md #5) for a pipeline, instead of tuning them by hand.

One calibration pass generates `prompts` without caching, keeping the final latents as the reference and
counting each UNet module's FLOPs (torch's ``FlopCounterMode``: convolutions and matmuls). That gives every
uniform ``(interval, branch)`` a predicted UNet speedup, ``S / (K + (S - K) * shallow)`` for K key steps of S,
where ``shallow`` is the share of the UNet's FLOPs still computed at cached steps.

* With `max_deviation`: candidates are checked fastest first, each by one cached generation per prompt, and
  the first whose final latents deviate from the reference by at most `max_deviation` (relative L2 norm,
  worst prompt) is chosen; ``interval=1`` (no caching, no deviation) is the last resort. Add
  `target_speedup` to consider only candidates predicted to reach it.
* With only `target_speedup`: for each branch, the smallest interval predicted to reach it is checked, and
  the least deviating is chosen.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import StablekitError
from ..plugins import use
from .caching import key_steps
from .deepcache import DeepCache, branches


@dataclass(frozen=True)
class Tuning:
    """A DeepCache setting with its predicted speedup and measured deviation; ``plugin()`` makes it."""

    interval: int
    branch: int
    speedup: float  # predicted, UNet only
    deviation: float | None = None  # measured: relative L2 distance of the final latents to uncached ones

    def plugin(self) -> DeepCache:
        return DeepCache(interval=self.interval, branch=self.branch)


def autotune(pipe, prompts, target_speedup: float | None = None, max_deviation: float | None = None,
             max_interval: int = 5, seed: int = 0, **call_kwargs) -> Tuning:
    """The DeepCache setting for `pipe` that meets the request; `call_kwargs` go to every pipeline call."""
    if target_speedup is None and max_deviation is None:
        raise StablekitError("say what to tune for: give target_speedup, max_deviation or both")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)

    def generate(plugin=None):
        with use(pipe, plugin) if plugin else contextlib.nullcontext():
            return [pipe(p, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                         **call_kwargs).images for p in prompts]

    with FlopCounterMode(display=False) as counter:
        reference = generate()
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root, steps = type(pipe.unet).__name__, pipe.num_timesteps
    candidates = [Tuning(1, 0, 1.0, 0.0)]  # no caching
    for branch in range(len(branches(pipe.unet))):
        deep = sum(flops.get(f"{root}.{name}", 0) for name in DeepCache(branch=branch).skipped_modules(pipe.unet))
        shallow = 1 - deep / flops[root]
        for interval in range(2, max_interval + 1):
            k = len(key_steps(steps, interval))
            candidates.append(Tuning(interval, branch, steps / (k + (steps - k) * shallow)))
    candidates = [c for c in candidates if c.speedup >= (target_speedup or 0)]
    if not candidates:
        raise StablekitError(f"no DeepCache setting up to interval {max_interval} is predicted to reach "
                             f"{target_speedup}x here; lower target_speedup or raise max_interval")

    def measured(c: Tuning) -> Tuning:
        outs = reference if c.interval == 1 else generate(c.plugin())
        return replace(c, deviation=max(float((o - r).norm() / r.norm()) for o, r in zip(outs, reference)))

    if max_deviation is None:
        slowest = {}
        for c in sorted(candidates, key=lambda c: c.speedup):
            slowest.setdefault(c.branch, c)
        return min(map(measured, slowest.values()), key=lambda c: c.deviation)
    for c in sorted(candidates, key=lambda c: -c.speedup):
        c = measured(c)
        if c.deviation <= max_deviation:
            return c
    raise StablekitError(f"no DeepCache setting reaching {target_speedup}x keeps the deviation within "
                         f"{max_deviation}; lower target_speedup or raise max_deviation")
