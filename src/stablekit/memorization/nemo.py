"""NeMo-style memorization neurons in the cross-attention value layers: a localisation baseline.

"Finding NeMo: Localizing Neurons Responsible For Memorization in Diffusion Models" (Hintersdorf et al., NeurIPS
2024; reference code ml-research/localizing_memorization_in_diffusion_models).

    edit = localize(pipe, memorized_prompts, other_prompts)   # a NeuronPruning adapter (rows of to_v)

Implemented: a neuron is an output feature of a cross-attention value projection (``to_v``); its activation for a
prompt is the mean absolute value over the prompt's token positions of ``to_v(prompt embedding)``, which depends
on the text only, so no denoising step runs. Each memorized prompt's activations are z-scored against the
non-memorized prompts' mean and standard deviation; its out-of-distribution neurons (``|z| >= z``, at most
`per_prompt` per layer, the largest first) are located, and the adapter deactivates the union over the memorized
prompts (rows of ``to_v`` zeroed, :class:`~.pruning.NeuronPruning`).

Defaults and deviations: NeMo's initial selection is this per-prompt out-of-distribution test; its refinement
(keeping only neurons whose deactivation is needed to stop the memorized generation, checked on the denoising
difference of the first steps) is not implemented, so more neurons than NeMo's are pruned. The threshold
``z=3`` and ``per_prompt=4`` are our choices (NeMo adapts its threshold per prompt).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers.models.attention_processor import Attention

from ..errors import StablekitError
from .pruning import NeuronPruning, contrast


def value_weights(unet) -> dict[str, torch.nn.Parameter]:
    """``{"unet.<module>.to_v.weight": weight}`` of every text cross-attention."""
    return {
        f"unet.{name}.to_v.weight": m.to_v.weight
        for name, m in unet.named_modules()
        if isinstance(m, Attention) and m.is_cross_attention
    }


@torch.no_grad()
def value_activations(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``{weight name: (len(prompts), neurons)}``: mean absolute value-projection output over token positions."""
    emb = pipe.encode_prompt(list(prompts), pipe._execution_device, 1, False)[0]
    return {n: (emb.to(w) @ w.T).abs().mean(1).float().cpu() for n, w in value_weights(pipe.unet).items()}


@dataclass(frozen=True)
class NeMoConfig:
    """The out-of-distribution z-score threshold and the most neurons located per prompt and layer."""

    z: float = 3.0
    per_prompt: int = 4

    def __post_init__(self):
        if not self.z > 0 or self.per_prompt < 1:
            raise StablekitError("NeMo: z must be > 0 and per_prompt >= 1")


def out_of_distribution(z: torch.Tensor, cfg: NeMoConfig) -> list[int]:
    """The union over memorized prompts (rows of `z`) of each one's top `per_prompt` neurons with |z| >= cfg.z."""
    found = set()
    for row in z.abs():
        top = row.argsort(descending=True)[: cfg.per_prompt]
        found |= {int(j) for j in top if row[j] >= cfg.z}
    return sorted(found)


def localize(pipe, memorized: list[str], others: list[str], **params) -> NeuronPruning:
    """The value-layer memorization neurons of `memorized` against `others`, as a pruning adapter."""
    cfg = NeMoConfig(**params)
    if len(memorized) < 1 or len(others) < 2:
        raise StablekitError("locating needs at least one memorized prompt and two others")
    mem, oth = value_activations(pipe, memorized), value_activations(pipe, others)
    found = {n: out_of_distribution(contrast(mem[n], oth[n]), cfg) for n in mem}
    neurons = {n: idx for n, idx in found.items() if idx}
    if not neurons:
        raise StablekitError("no out-of-distribution value neurons found: lower z")
    return NeuronPruning.make(pipe, "nemo", neurons, "out", asdict(cfg))
