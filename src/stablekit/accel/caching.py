"""What the feature-caching methods share: the key-step schedules and the hooks that skip modules.

DeepCache, encoder propagation (Faster Diffusion) and feature inheritance (A-SDM) differ only in *which* UNet
modules they skip and *at which steps*. :class:`StepCache` holds everything else. A hook on the UNet decides
once per model call whether this is a key step (every module runs and its output is stored) or a cached step
(the chosen modules return their stored output without running), then runs the call through the plugin's
``model_call`` (where encoder propagation batches decoders). The step is the counted ``call.step``,
never looked up from the timestep value, so any scheduler works (second-order ones count each model call).
Stored outputs keep the whole batch, so the ``[uncond, cond]`` halves of guidance stay paired; each model call
within a step has its own slot, for pipelines that run extra UNet passes per step.
"""

from __future__ import annotations

import math

import torch
from diffusers.hooks import ModelHook

from ..errors import StablekitError
from ..plugins import Plugin, settle


def key_steps(
    num_steps: int,
    interval: int = 1,
    schedule="uniform",
    *,
    center: float = 0.3,
    power: float = 1.4,
    reference_steps: int | None = None,
) -> list[int]:
    """The 0-based steps at which the full network runs, sorted; step 0 always does.

    ``schedule`` is ``"uniform"`` (every `interval`-th step), ``"quadratic"`` (``ceil(num_steps / interval)``
    key steps, densest around ``center * num_steps`` and spread as ``|u| ** power`` away from it: DeepCache's
    non-uniform 1:N), or a sequence of key steps written for a run of `reference_steps` (default `num_steps`)
    steps, scaled proportionally (``k * num_steps // reference_steps``) to this run.
    """
    if interval < 1:
        raise StablekitError(f"cache interval must be at least 1, got {interval}")
    if not 0 <= center <= 1:
        raise StablekitError(f"center is a fraction of the steps, between 0 and 1; got {center}")
    if isinstance(schedule, str) and schedule not in ("uniform", "quadratic"):
        raise StablekitError(f"unknown schedule '{schedule}'; use 'uniform', 'quadratic' or a list of key steps")
    if not isinstance(schedule, str):
        ref = reference_steps or num_steps
        steps = {k * num_steps // ref for k in schedule if 0 <= k < ref}
    elif schedule == "quadratic" and interval > 1:
        steps = _quadratic(num_steps, math.ceil(num_steps / interval), center * num_steps, power)
    else:
        steps = set(range(0, num_steps, interval))
    return sorted(steps | {0})


def _quadratic(n: int, k: int, c: float, power: float) -> set[int]:
    # like the reference code, lower the power until the k positions land on k distinct steps
    while power > 1:
        a, b = -(c ** (1 / power)), (n - c) ** (1 / power)
        us = [a + (b - a) * i / k for i in range(k)]
        steps = {min(n - 1, max(0, int(c + math.copysign(abs(u) ** power, u)))) for u in us}
        if len(steps) == k:
            return steps
        power -= 0.02
    raise StablekitError(f"cannot place {k} quadratic key steps in {n} steps; use a larger interval")


class _StepHook(ModelHook):
    """On the UNet: decide once per model call whether this is a key step, then let the plugin run the call."""

    def __init__(self, plugin: StepCache):
        super().__init__()
        self.plugin = plugin

    def new_forward(self, module, *args, **kwargs):
        self.plugin._begin_model_call()
        return self.plugin.model_call(self.fn_ref.original_forward, args, kwargs)


def _batch(args, kwargs) -> int | None:
    """The first dimension of a module call's first tensor argument."""
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    return None if first is None else first.shape[0]


class _ReplayHook(ModelHook):
    """On a skipped module: run and store at key steps, return the stored output otherwise. A call whose batch
    differs from the stored one's (a stacked plugin that adds rows at some steps only) runs and stores anew."""

    def __init__(self, plugin: StepCache, name: str):
        super().__init__()
        self.plugin, self.name = plugin, name

    def new_forward(self, module, *args, **kwargs):
        store = self.plugin.cache.setdefault(self.plugin.slot, {})
        batch = _batch(args, kwargs)
        if self.plugin.full or store.get(self.name, (None, None))[0] != batch:
            store[self.name] = (batch, self.fn_ref.original_forward(*args, **kwargs))
        return store[self.name][1]


class KeySteps:
    """What the caching configs share: their key steps. A config with fields ``interval``, ``schedule``,
    ``center`` and ``power`` (as :func:`key_steps` takes them) calls :meth:`_check` in ``__post_init__``."""

    def steps(self, num_steps: int) -> list[int]:
        """The key steps of a run of `num_steps` steps."""
        return key_steps(num_steps, self.interval, self.schedule, center=self.center, power=self.power)

    def _check(self) -> None:
        if not isinstance(self.schedule, str):
            settle(self, schedule=tuple(self.schedule))
        self.steps(1)  # validates the schedule


class StepCache(Plugin):
    """Base of the caching plugins: key steps from the config's ``steps(num_steps)`` (a :class:`KeySteps`);
    subclasses say which modules to skip."""

    exclusive = ("UNet feature cache",)
    replay_hook = _ReplayHook  # the hook put on each skipped module

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self.pipe = None
        self._clear()

    def skipped_modules(self, unet) -> dict:
        """``{name: module}`` of the UNet modules that cached steps skip."""
        raise NotImplementedError

    def full_steps(self, num_steps: int) -> list[int]:
        """The key steps of a run of `num_steps` steps."""
        return self.config.steps(num_steps)

    def _clear(self):
        self.cache, self.full, self.slot, self._keys, self._step = {}, True, 0, None, None

    def attach(self, pipe):
        self.pipe = pipe
        modules = self.skipped_modules(pipe.unet)
        self.add_hook(pipe.unet, _StepHook(self))
        for name, module in modules.items():
            self.add_hook(module, self.replay_hook(self, name))

    def detach(self, pipe):
        self.pipe = None
        self._clear()

    def reset(self, call):
        super().reset(call)
        self._clear()

    def model_call(self, forward, args: tuple, kwargs: dict):
        """Run one UNet call (`forward` is the UNet's own); subclasses may run it differently."""
        return forward(*args, **kwargs)

    def _steps_run(self) -> int | None:
        # diffusers pipelines set num_timesteps to the steps this call runs (img2img runs only the last
        # strength * N of the scheduler's N timesteps, which is what call.num_steps counts)
        return getattr(self.pipe, "num_timesteps", None) or self.call.num_steps

    def _begin_model_call(self):
        step = self.call.step
        if self._step is None:  # first model call of this pipeline call
            n = self._steps_run()
            self._keys = set(self.full_steps(n)) if n else None
        self.slot = self.slot + 1 if step == self._step else 0
        self._step = step
        self.full = self._keys is None or step in self._keys or self.slot not in self.cache
