"""Per-neuron activation statistics of chosen UNet layers over the first steps of generations: what the
localisation methods (:mod:`.subspace`, :mod:`.nemo`) contrast between memorized and other prompts."""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention import FeedForward

from ..errors import StablekitError
from ..plugins import Plugin, use


def feed_forward_outputs(unet) -> dict[str, torch.nn.Linear]:
    """``{"<module name>": linear}``: the output projection of every transformer feed-forward block; its input
    features are the block's neurons (after the gated activation)."""
    return {
        f"{name}.net.{len(m.net) - 1}": m.net[-1] for name, m in unet.named_modules() if isinstance(m, FeedForward)
    }


class _InputHook(ModelHook):
    def __init__(self, plugin: ActivationRecorder, name: str):
        super().__init__()
        self.plugin, self.name = plugin, name

    def pre_forward(self, module, *args, **kwargs):
        p = self.plugin
        if p.call.step < p.steps:
            x = (args[0] if args else kwargs["input"]).detach().float()
            x = p.call.halves(x)[1]  # the conditional rows
            p.sums[self.name] = p.sums.get(self.name, 0) + x.abs().flatten(1, -2).mean(1).cpu()
        return args, kwargs


class ActivationRecorder(Plugin):
    """Sums, per image row and over the first `steps` steps of a call, the mean absolute input of each module in
    `modules` over its tokens (or pixels): ``sums[name]`` is ``(rows, features)``."""

    name = "activation-recorder"

    def __init__(self, modules: dict[str, torch.nn.Module], steps: int = 1):
        super().__init__()
        self.modules, self.steps, self.sums = modules, steps, {}

    def attach(self, pipe):
        for name, m in self.modules.items():
            self.add_hook(m, _InputHook(self, name))

    def reset(self, call):
        super().reset(call)
        self.sums = {}


@torch.no_grad()
def activations(
    pipe,
    prompts: list[str],
    modules: dict[str, torch.nn.Module],
    steps: int = 1,
    num_inference_steps: int = 20,
    guidance: float = 7.5,
    seed: int = 0,
    batch: int = 32,
) -> dict[str, torch.Tensor]:
    """``{name: (len(prompts), features)}``: each module's mean absolute input per feature, averaged over the
    first `steps` steps of a generation of each prompt (prompt i with seed ``seed * 100_000 + i``)."""
    if not prompts:
        raise StablekitError("no prompts to record activations for")
    rec, out = ActivationRecorder(modules, steps), {}
    with use(pipe, rec):
        for k in range(0, len(prompts), batch):
            part = prompts[k : k + batch]
            gens = [torch.Generator("cpu").manual_seed(seed * 100_000 + k + i) for i in range(len(part))]
            pipe(
                part,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="latent",
                callback_on_step_end=stop_after(steps),
            )
            for name, s in rec.sums.items():
                out.setdefault(name, []).append(s / steps)
    pipe._interrupt = False
    return {name: torch.cat(parts) for name, parts in out.items()}


def stop_after(steps: int):
    """A ``callback_on_step_end`` that makes the pipeline skip every step after the first `steps`."""

    def callback(pipe, i, t, kwargs):
        pipe._interrupt = i + 1 >= steps
        return kwargs

    return callback
