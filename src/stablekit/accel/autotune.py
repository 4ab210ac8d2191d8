"""Choose a feature-caching schedule for a pipeline and a target, instead of tuning it by hand: DeepCache's
interval and branch (DeepCache), encoder propagation's interval or the paper's key steps (Faster Diffusion), feature
inheritance's interval (A-SDM).

One calibration pass generates `prompts` without caching, keeping the final latents as the reference and
counting each UNet module's FLOPs (torch's ``FlopCounterMode``: convolutions and matmuls). That gives every
candidate a predicted UNet speedup, ``S / (K + (S - K) * shallow)`` for K key steps of S, where ``shallow``
is the share of the UNet's FLOPs still computed at cached steps (everything but the modules it skips).

* With `max_deviation`: candidates are checked fastest first, each by one cached generation per prompt, and
  the first whose final latents deviate from the reference by at most `max_deviation` (relative L2 norm,
  worst prompt) is chosen; no caching (no deviation) is the last resort. Add `target_speedup` to consider
  only candidates predicted to reach it.
* With only `target_speedup`: for each method and variant (a DeepCache branch, ...), the smallest interval
  predicted to reach it is checked, and the least deviating is chosen.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import StablekitError
from ..plugins import use
from ..registry import CATALOGUE, build
from .deepcache import branches


@dataclass(frozen=True)
class Tuning:
    """A caching setting (an ``--accel`` spec) with its predicted speedup and measured deviation; ``plugin()``
    makes it (None for no caching)."""

    spec: str | None
    speedup: float  # predicted, UNet only
    deviation: float | None = None  # measured: relative L2 distance of the final latents to uncached ones

    def plugin(self):
        return None if self.spec is None else build(self.spec, CATALOGUE["accel"], "accel")


METHODS = ("deepcache", "encoder-propagation", "feature-inheritance")


def _specs(method: str, unet, max_interval: int) -> list[tuple[str, str]]:
    """(variant, spec) of the candidates of `method`: each variant's intervals 2..max_interval, smallest first."""
    if method == "deepcache":
        return [
            (f"branch {b}", f"deepcache:interval={i},branch={b}")
            for b in range(len(branches(unet)))
            for i in range(2, max_interval + 1)
        ]
    if method == "encoder-propagation":
        return [("paper", "encoder-propagation")] + [
            ("uniform", f"encoder-propagation:interval={i}") for i in range(2, max_interval + 1)
        ]
    if method == "feature-inheritance":
        return [("default", f"feature-inheritance:interval={i}") for i in range(2, max_interval + 1)]
    raise StablekitError(f"unknown caching method '{method}' for autotune; choose from: {', '.join(METHODS)}")


def autotune(
    pipe,
    prompts,
    target_speedup: float | None = None,
    max_deviation: float | None = None,
    max_interval: int = 5,
    seed: int = 0,
    methods=METHODS,
    **call_kwargs,
) -> Tuning:
    """The caching setting among `methods` for `pipe` that meets the request; `call_kwargs` go to every
    pipeline call."""
    if target_speedup is None and max_deviation is None:
        raise StablekitError("say what to tune for: give target_speedup, max_deviation or both")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    methods = [methods] if isinstance(methods, str) else methods
    variants = [(m, v, spec) for m in methods for v, spec in _specs(m, pipe.unet, max_interval)]

    def generate(plugin=None):
        with use(pipe, plugin) if plugin else contextlib.nullcontext():
            return [
                pipe(p, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **call_kwargs).images
                for p in prompts
            ]

    with FlopCounterMode(display=False) as counter:
        reference = generate()
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    candidates, group = _predicted(pipe, flops, variants)
    candidates = [c for c in candidates if c.speedup >= (target_speedup or 0)]
    if not candidates:
        raise StablekitError(
            f"no caching setting up to interval {max_interval} is predicted to reach "
            f"{target_speedup}x here; lower target_speedup or raise max_interval"
        )

    def measured(c: Tuning) -> Tuning:
        outs = reference if c.spec is None else generate(c.plugin())
        return replace(
            c, deviation=max(float((o - r).norm() / r.norm()) for o, r in zip(outs, reference, strict=False))
        )

    return _choose(candidates, group, measured, target_speedup, max_deviation)


def _predicted(pipe, flops: dict, variants: list[tuple[str, str, str]]) -> tuple[list[Tuning], dict]:
    """(no caching, then each of the (method, variant, spec) `variants` with its speedup predicted from the
    uncached run's `flops` per module; each setting's (method, variant) group)."""
    root = type(pipe.unet).__name__
    steps = pipe.num_timesteps
    candidates = [Tuning(None, 1.0, 0.0)]  # no caching
    group = {None: None}
    for method, variant, spec in variants:
        plugin = build(spec, CATALOGUE["accel"], "accel")
        deep = sum(flops.get(f"{root}.{name}", 0) for name in plugin.skipped_modules(pipe.unet))
        k = len(plugin.full_steps(steps))
        candidates.append(Tuning(spec, steps / (k + (steps - k) * (1 - deep / flops[root]))))
        group[spec] = (method, variant)
    return candidates, group


def _choose(candidates: list[Tuning], group: dict, measured, target_speedup, max_deviation) -> Tuning:
    """Without `max_deviation`: the least deviating of each group's slowest candidate. With it: the fastest
    candidate whose `measured` deviation stays within it."""
    if max_deviation is None:
        slowest = {}
        for c in sorted(candidates, key=lambda c: c.speedup):
            slowest.setdefault(group[c.spec], c)
        return min(map(measured, slowest.values()), key=lambda c: c.deviation)
    for c in sorted(candidates, key=lambda c: -c.speedup):
        c = measured(c)
        if c.deviation <= max_deviation:
            return c
    raise StablekitError(
        f"no caching setting reaching {target_speedup}x keeps the deviation within "
        f"{max_deviation}; lower target_speedup or raise max_deviation"
    )
