"""The plain recipe: the teacher's training step (``stablekit.default_model.train``) with independent Gaussian
noise per image, the reference every other recipe is compared with.

Deviations from the teacher's recipe: those of :mod:`stablekit.train.trainer`, and
  1. no Immiscible Diffusion noise assignment (the teacher's recipe uses it; it is the ``immiscible`` recipe).
"""

from .base import Recipe, register


@register
class Plain(Recipe):
    name = "plain"
    paper = "the teacher's recipe (v-prediction, zero terminal SNR, Min-SNR-5, EMA) without noise assignment"
