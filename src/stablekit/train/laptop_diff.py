"""LAPTOP-Diff: layer pruning by a one-shot output-loss criterion, then normalised feature distillation.

Paper: Zhang, Zhao, Li, Zhang, Hu, Bao, Liu, "LAPTOP-Diff: Layer Pruning and Normalized Distillation for
Compressing Diffusion Models" (2024); the authors announced code but no reference repository is public.

What is implemented:
1. **The criterion.** Each removable layer (:mod:`.slim_unet`: a ResNet or transformer block) is scored by the
   *output loss* of removing it alone: the mean squared difference between the teacher UNet's prediction and the
   prediction of the teacher without that layer, on noised training latents at uniform timesteps.
2. **One-shot pruning.** The paper shows this loss is close to additive over layers (the loss of removing a set is
   near the sum of the layers' losses), so the set to remove is the one that minimises the summed loss subject to
   the compression budget, chosen once without retraining in between: a 0-1 knapsack, solved exactly. The recipe
   records the predicted (summed) and the measured output loss of the chosen set: the additivity relied on.
3. **Normalised feature distillation.** The pruned UNet, initialised from the teacher's weights, is retrained with
   the task loss, the output loss against the teacher and the feature loss at the output of every down, mid and up
   block, each feature term divided by the mean square of the teacher's feature there, so that no block with large
   activations dominates the others (the imbalance the paper identifies in BK-SDM's unnormalised loss).

Paper defaults and our deviations:
1. The paper's budget is a parameter pruning ratio (50% on SDXL and SD 1.5); ours is a share of the UNet's
   multiply-accumulates per call (default 0.5), which is what sets sampling cost.
2. The paper scores layers on a few hundred prompts' denoising trajectories; we score on `calibration` (64) noised
   world latents at uniform timesteps.
3. Removing an up-block ResNet keeps its 1x1 shortcut on the concatenated skip connection (see :mod:`.slim_unet`),
   where a hand-designed removal such as BK-SDM's also drops the skip.
4. Retraining budgets fit the embedded model: thousands of renders and hundreds of iterations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .compress import Retrain, cached_json, layer_savings, noised_batch, retrain, summary, unet_macs
from .slim_unet import SlimUNet2DConditionModel
from .students import Stages, world_latents


@dataclass(frozen=True)
class Config:
    ratio: float = 0.5
    calibration: int = 64
    retrain: Retrain = field(default_factory=Retrain)

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio (the share of MACs to remove) must be in (0, 1), got {self.ratio}")
        if self.calibration < 1:
            raise ValueError(f"calibration must be at least 1, got {self.calibration}")


@torch.no_grad()
def output_loss(teacher, names, batch, chunk: int = 32) -> float:
    """Mean squared difference between the teacher's prediction and the teacher's without the layers `names`."""
    x_t, t, cond, _ = batch
    pruned = SlimUNet2DConditionModel.from_unet(teacher, names).eval()
    total = 0.0
    for i in range(0, len(x_t), chunk):
        s = slice(i, i + chunk)
        diff = pruned(x_t[s], t[s], cond[s]).sample - teacher(x_t[s], t[s], cond[s]).sample
        total += diff.pow(2).sum().item()
    return total / x_t.numel()


def select(scores: dict[str, float], savings: dict[str, int], budget: int) -> list[str]:
    """The layers whose summed score is least among the sets that save at least `budget` MACs: an exact 0-1
    knapsack by dynamic programming over the Pareto front of (MACs saved, capped at the budget; summed score).
    An unreachable budget removes every layer."""
    front = {0: (0.0, frozenset())}
    for name in sorted(scores):
        grown = dict(front)
        for saved, (score, chosen) in front.items():
            to = min(budget, saved + savings[name])
            if to not in grown or score + scores[name] < grown[to][0]:
                grown[to] = (score + scores[name], chosen | {name})
        front, least = {}, float("inf")
        for saved in sorted(grown, reverse=True):  # keep a state only if no state saving more costs less
            if grown[saved][0] < least:
                front[saved] = grown[saved]
                least = grown[saved][0]
    return sorted(front[budget][1]) if budget in front else sorted(scores)


def distill(pipe, config: Config = Config(), workdir=None):
    """Prune `pipe`'s UNet by the output-loss criterion and retrain it: (the slim UNet, recipe). With `workdir`,
    the layer scores and the retrained weights are kept there and a re-run resumes."""
    t0 = time.perf_counter()
    stage = Stages(workdir, config)
    teacher = pipe.unet.eval()
    savings = cached_json(stage, "savings", lambda: layer_savings(teacher))
    batch = noised_batch(pipe, world_latents(pipe, config.calibration, config.retrain.seed + 1), config.calibration, 1)
    scores = cached_json(stage, "scores", lambda: {n: output_loss(teacher, [n], batch) for n in savings})
    chosen = select(scores, savings, int(config.ratio * unet_macs(teacher)))
    student = SlimUNet2DConditionModel.from_unet(teacher, chosen)
    additivity = {"predicted": sum(scores[n] for n in chosen), "measured": output_loss(teacher, chosen, batch)}
    features = [f"down_blocks.{i}" for i in range(len(teacher.down_blocks))] + ["mid_block"]
    features += [f"up_blocks.{i}" for i in range(len(teacher.up_blocks))]
    retrain(pipe, student, features, config.retrain, normalize=True, stage=stage)
    recipe = {
        "method": "laptop",
        "paper": "LAPTOP-Diff: Layer Pruning and Normalized Distillation for Compressing Diffusion Models (2024)",
        "config": {"ratio": config.ratio, "calibration": config.calibration, **config.retrain.__dict__},
        "layer_output_loss": scores,
        "output_loss_of_chosen_set": additivity,
        "retrain_loss_last": stage.losses["retrain"],
    }
    return student, recipe | summary(pipe, student, t0)


__all__ = ["Config", "distill", "output_loss", "select"]
