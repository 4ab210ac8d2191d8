"""LD-Pruner: structured pruning scored in the latent space, task-agnostically, then a short retraining.

Paper: Castells, Song, Kim, Choi, Kim, Kim, Choi, Lee, "LD-Pruner: Efficient Pruning of Latent Diffusion Models
using Task-Agnostic Insights" (CVPR Workshops 2024); no reference repository is public.

What is implemented:
1. **Operator importance in the latent space.** The full model draws latents for a set of training prompts from
   fixed noise with its own sampler (guidance included). For each removable operator (:mod:`.slim_unet`: a ResNet
   or transformer block) the model without that operator draws the same latents, and the operator's score is the
   distance between the two sets' statistics: ``|| mean_full - mean_pruned ||_2 + || std_full - std_pruned ||_2``,
   the mean and standard deviation taken over the samples at every latent coordinate. Nothing task-specific
   (no decoder, no classifier, no reference images) enters the score.
2. **Structured pruning.** Operators are removed in order of increasing score until the removed operators' cost
   reaches the budget.
3. **Short retraining.** The pruned UNet, initialised from the teacher, is retrained with the task loss and the
   output loss against the teacher (no feature terms).

Paper defaults and our deviations:
1. The paper's operators also include single convolutions and attention sub-layers, some pruned by shrinking
   rather than removal; ours are the UNet's residual blocks, whose removal keeps every shape valid.
2. The paper's budget is a number of operators chosen for the target speed-up; ours is a share of the UNet's
   multiply-accumulates per call (default 0.5).
3. Scores come from `prompts` (32) world prompts sampled in `steps` (10) steps at guidance 7.5, a few minutes on
   one CPU core; retraining budgets are the embedded model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..pipeline import guidance_rescale
from .compress import Retrain, cached_json, layer_savings, retrain, summary, unet_macs
from .slim_unet import SlimUNet2DConditionModel
from .students import Stages, sample_pairs, world_prompts


@dataclass(frozen=True)
class Config:
    ratio: float = 0.5
    prompts: int = 32
    steps: int = 10
    guidance: float = 7.5
    retrain: Retrain = field(default_factory=Retrain)

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio (the share of MACs to remove) must be in (0, 1), got {self.ratio}")
        if self.prompts < 2 or self.steps < 1 or self.guidance < 0:
            raise ValueError("need at least 2 prompts, 1 step and guidance >= 0")


def latent_distance(full: torch.Tensor, pruned: torch.Tensor) -> float:
    """LD-Pruner's score: the distance between the mean and between the standard deviation (over samples, per
    latent coordinate) of two sets of latents."""
    a = full.flatten(1)
    b = pruned.flatten(1)
    return ((a.mean(0) - b.mean(0)).norm() + (a.std(0) - b.std(0)).norm()).item()


def latents(pipe, unet, prompts: list[str], config: Config, seed: int) -> torch.Tensor:
    """The latents `pipe` draws with `unet` in place of its own."""
    own = pipe.unet
    pipe.unet = unet
    try:
        rescale = guidance_rescale(pipe)
        return sample_pairs(
            pipe, prompts, steps=config.steps, guidance=config.guidance, seed=seed, guidance_rescale=rescale
        ).latents
    finally:
        pipe.unet = own


def scores(pipe, names: list[str], config: Config) -> dict[str, float]:
    """Each operator's latent-space score (see :func:`latent_distance`)."""
    prompts = world_prompts(config.prompts, config.retrain.seed + 1)
    full = latents(pipe, pipe.unet, prompts, config, config.retrain.seed + 1)
    out = {}
    for name in names:
        pruned = SlimUNet2DConditionModel.from_unet(pipe.unet, [name]).eval()
        out[name] = latent_distance(full, latents(pipe, pruned, prompts, config, config.retrain.seed + 1))
    return out


def select(score: dict[str, float], savings: dict[str, int], budget: int) -> list[str]:
    """The lowest-scored operators, in order, until their removal saves at least `budget` MACs."""
    chosen, saved = [], 0
    for name in sorted(score, key=score.get):
        if saved >= budget:
            break
        chosen.append(name)
        saved += savings[name]
    return sorted(chosen)


def distill(pipe, config: Config = Config(), workdir=None):
    """Prune `pipe`'s UNet by latent-space operator scores and retrain it briefly: (the slim UNet, recipe)."""
    t0 = time.perf_counter()
    stage = Stages(workdir, config)
    teacher = pipe.unet.eval()
    savings = cached_json(stage, "savings", lambda: layer_savings(teacher))
    score = cached_json(stage, "scores", lambda: scores(pipe, list(savings), config))
    chosen = select(score, savings, int(config.ratio * unet_macs(teacher)))
    student = SlimUNet2DConditionModel.from_unet(teacher, chosen)
    retrain(pipe, student, [], config.retrain, normalize=False, stage=stage)
    recipe = {
        "method": "ldpruner",
        "paper": "LD-Pruner: Efficient Pruning of Latent Diffusion Models using Task-Agnostic Insights (CVPRW 2024)",
        "config": {k: getattr(config, k) for k in ("ratio", "prompts", "steps", "guidance")} | config.retrain.__dict__,
        "operator_scores": score,
        "retrain_loss_last": stage.losses["retrain"],
    }
    return student, recipe | summary(pipe, student, t0)


__all__ = ["Config", "distill", "latent_distance", "scores", "select"]
