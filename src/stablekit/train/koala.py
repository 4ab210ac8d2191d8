"""KOALA: a hand-designed smaller UNet, initialised from the teacher, distilled at its self-attention features.

Paper: Lee, Park, Kim, Kim, "KOALA: Empirical Lessons Toward Memory-Efficient and Fast Diffusion Models for
Text-to-Image Synthesis" (NeurIPS 2024; first titled "KOALA: Self-Attention Matters in Knowledge Distillation of
Latent Diffusion Models for Memory-Efficient and Fast Image Synthesis"), reference code:
github.com/youngwanLEE/sdxl-koala.

What is implemented:
1. **The compressed UNet.** KOALA shrinks SDXL's UNet where its cost is: the transformer depth of the lowest
   resolution stage, the mid block (removed in KOALA-700M), and one (ResNet, transformer) pair in every decoder
   stage (after BK-SDM). On the embedded model (one transformer per stage) that is: the mid block, the
   lowest-resolution encoder stage's transformer, and the second (ResNet, transformer) pair of every up block
   (:data:`REMOVED`); every kept layer starts from the teacher's weights.
2. **Self-attention distillation.** The student is retrained with the task loss, the output loss against the
   teacher, and the feature loss at the output of the self-attention (``attn1``) of every transformer block the
   student keeps, against the teacher's at the same block: the paper's main lesson is that self-attention features
   carry the knowledge worth distilling, more than the stage outputs BK-SDM uses.

Paper defaults and our deviations:
1. The architecture is KOALA's recipe applied to a three-stage UNet with one transformer per stage, so "fewer
   transformer blocks" removes whole blocks; the paper keeps fractions of ten-block stages.
2. Removing an up-block ResNet keeps its 1x1 shortcut on the concatenated skip connection (see :mod:`.slim_unet`).
3. The paper distils on LAION-Aesthetics prompts and images for hundreds of thousands of iterations; we use the
   embedded world's renders and hundreds of iterations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .compress import Retrain, retrain, summary
from .slim_unet import SlimUNet2DConditionModel, removable_layers
from .students import Stages


@dataclass(frozen=True)
class Config:
    retrain: Retrain = field(default_factory=Retrain)


def design(unet) -> list[str]:
    """KOALA's removals on `unet`: the mid block, the deepest encoder stage's transformers and the last (ResNet,
    transformer) pair of every up block that has more than one."""
    names = set(removable_layers(unet))
    out = [n for n in names if n.startswith("mid_block.")]
    deepest = len(unet.down_blocks) - 1
    out += [n for n in names if n.startswith(f"down_blocks.{deepest}.attentions.")]
    for i, block in enumerate(unet.up_blocks):
        last = len(block.resnets) - 1
        pair = (f"up_blocks.{i}.resnets.{last}", f"up_blocks.{i}.attentions.{last}")
        out += [n for n in pair if last and n in names]
    return sorted(out)


def self_attentions(unet) -> list[str]:
    """The self-attention modules (``attn1``) of the transformer blocks `unet` keeps."""
    return [name for name, _ in unet.named_modules() if name.endswith(".attn1")]  # removed blocks have none


def distill(pipe, config: Config = Config(), workdir=None):
    """KOALA's smaller UNet of `pipe`, retrained by self-attention distillation: (the slim UNet, recipe)."""
    t0 = time.perf_counter()
    stage = Stages(workdir, config)
    teacher = pipe.unet.eval()
    student = SlimUNet2DConditionModel.from_unet(teacher, design(teacher))
    retrain(pipe, student, self_attentions(student), config.retrain, normalize=False, stage=stage)
    recipe = {
        "method": "koala",
        "paper": "KOALA: Empirical Lessons Toward Memory-Efficient and Fast Diffusion Models for Text-to-Image "
        "Synthesis (NeurIPS 2024)",
        "config": dict(config.retrain.__dict__),
        "distilled_features": self_attentions(student),
        "retrain_loss_last": stage.losses["retrain"],
    }
    return student, recipe | summary(pipe, student, t0)


__all__ = ["Config", "design", "distill", "self_attentions"]
