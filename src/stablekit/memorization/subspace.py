"""Shared-subspace pruning: memorized prompts strongly activate a common set of feed-forward neurons; locate the
set by contrasting activations of memorized and non-memorized prompts, and prune it.

"Memorized Images in Diffusion Models share a Subspace that can be Located and Deleted" (2024).

    edit = prune(pipe, memorized_prompts, other_prompts)             # a NeuronPruning adapter
    edit.save("no-memorized.safetensors")                             # `generate --adapter` applies it
    with stablekit.use(pipe, NeuronPruning.load("no-memorized.safetensors")):
        image = pipe("the zorvex emblem").images[0]

Implemented: a neuron is an input feature of the output projection of a transformer feed-forward block (the
gated activation's output). Its activation for a prompt is its mean absolute value over the latent's pixels and
the first `steps` steps of a guided generation (conditional rows). Against the non-memorized prompts' mean and
standard deviation, each memorized prompt gives every neuron a z-score; a neuron belongs to the shared subspace
when its z-score is at least `z` for at least a `share` of the memorized prompts, and at most a `max_fraction` of
each layer's neurons (those with the highest median z-score) is kept. Pruning zeroes the located neurons'
outgoing weights (:class:`~.pruning.NeuronPruning`, columns of the output projection).

Deviations: the procedure is read from the paper's description (contrast of feed-forward activations of memorized
and non-memorized prompts, then pruning); the statistic (mean absolute activation), the thresholds (``z=2``,
``share=0.5``, ``max_fraction=0.2``) and the steps measured (the first 5 of 20) are our choices, picked among a
few settings on the embedded default model (the first step alone and fewer neurons left its memorized generations
unchanged), not the paper's values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import StablekitError
from .activations import activations, feed_forward_outputs
from .pruning import NeuronPruning, contrast, shared_neurons


@dataclass(frozen=True)
class SubspaceConfig:
    """How the shared subspace is located: z-score threshold, share of memorized prompts that must reach it,
    the largest fraction of a layer's neurons kept, and the steps measured (of `num_inference_steps`)."""

    z: float = 2.0
    share: float = 0.5
    max_fraction: float = 0.2
    steps: int = 5
    num_inference_steps: int = 20

    def __post_init__(self):
        if not (0 < self.share <= 1 and 0 < self.max_fraction <= 1):
            raise StablekitError("subspace: share and max_fraction must lie in (0, 1]")
        if not 1 <= self.steps <= self.num_inference_steps:
            raise StablekitError("subspace: steps must lie in [1, num_inference_steps]")


def locate(pipe, memorized: list[str], others: list[str], config: SubspaceConfig | None = None) -> dict:
    """``{"unet.<layer>.weight": [neuron, ...]}`` of the shared subspace (layers without one left out)."""
    cfg = config or SubspaceConfig()
    if len(memorized) < 1 or len(others) < 2:
        raise StablekitError("locating needs at least one memorized prompt and two others")
    mods = feed_forward_outputs(pipe.unet)
    if not mods:
        raise StablekitError("this UNet has no transformer feed-forward blocks to locate neurons in")
    kw = dict(steps=cfg.steps, num_inference_steps=cfg.num_inference_steps)
    mem, oth = activations(pipe, memorized, mods, **kw), activations(pipe, others, mods, **kw)
    found = {n: shared_neurons(contrast(mem[n], oth[n]), cfg.z, cfg.share, cfg.max_fraction) for n in mods}
    return {f"unet.{n}.weight": idx for n, idx in found.items() if idx}


def prune(pipe, memorized: list[str], others: list[str], **params) -> NeuronPruning:
    """Locate the shared subspace of `memorized` against `others` (:class:`SubspaceConfig` `params`) and return
    its pruning adapter."""
    cfg = SubspaceConfig(**params)
    neurons = locate(pipe, memorized, others, cfg)
    if not neurons:
        raise StablekitError("no shared neurons found: lower z or share, or give more memorized prompts")
    return NeuronPruning.make(pipe, "subspace", neurons, "in", asdict(cfg))
