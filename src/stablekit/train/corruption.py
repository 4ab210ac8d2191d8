"""Slight condition corruption: Gaussian perturbation of the text embeddings during training (the paper's
condition embedding perturbation, CEP).

Paper: "Slight Corruption in Pre-training Data Makes Better Diffusion Models" (Chen et al., 2024), reference code
https://github.com/Hhhhhhao/Slight-Corruption-Pre-training. The paper shows that a few per cent of mismatched
captions in pre-training improve quality and diversity, and proposes CEP: add noise of a small scale to the
condition embedding of every training sample. Here each selected caption's token embeddings get Gaussian noise
of standard deviation ``gamma`` times the embedding's RMS.

Defaults: `share` = 1.0 (CEP perturbs every sample), `gamma` = 0.1.

Deviations:
  1. the noise is scaled by each caption embedding's RMS, so `gamma` is relative to the text encoder's scale
     (MiniLM's token embeddings are not unit-scaled like the paper's class embeddings);
  2. `share` < 1 perturbs only that share of the batch, the embedding-space analogue of the paper's corrupted
     share of the data (the paper's data corruption swaps captions; this recipe does not);
  3. the dropped (empty) captions of classifier-free guidance are perturbed like any other.
"""

from dataclasses import dataclass

import torch

from ..errors import StablekitError
from .base import Recipe, register


def perturb(cond: torch.Tensor, share: float, gamma: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(perturbed `cond`, which rows): a `share` of the rows, drawn from `gen`, get Gaussian noise of `gamma` times
    their RMS."""
    rows = torch.rand(len(cond), generator=gen) < share
    rms = cond.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    noise = torch.randn(cond.shape, generator=gen) * gamma * rms
    return torch.where(rows[:, None, None], cond + noise, cond), rows


@register
class Corruption(Recipe):
    name = "corruption"
    paper = "Slight Corruption in Pre-training Data Makes Better Diffusion Models (2024)"

    @dataclass(frozen=True)
    class Config:
        share: float = 1.0
        gamma: float = 0.1

        def __post_init__(self):
            if not 0 < self.share <= 1 or not self.gamma > 0:
                raise StablekitError(f"share={self.share}, gamma={self.gamma}: need 0 < share <= 1 and gamma > 0")

    def condition(self, cond, gen):
        return perturb(cond, self.config.share, self.config.gamma, gen)[0]
