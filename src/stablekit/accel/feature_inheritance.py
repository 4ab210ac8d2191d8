"""Feature inheritance (the tuning-free part of "A-SDM: Accelerating Stable Diffusion through Model
Assembly and Feature Inheritance Strategies", 2024): chosen UNet modules skip chosen steps.

At a key step every module runs; at the other steps each chosen module (a block such as ``"mid_block"``, a
layer such as ``"up_blocks.1.attentions.0"``, or any smaller unit, named by its path in the UNet) returns the
output it gave at the last key step, without running. Everything not chosen runs at every step, on inherited
inputs where they come from a skipped module.

Implemented: skipping at block, layer or unit level, with the time-step modes uniform (a key step every
`interval` steps), ``"quadratic"`` (key steps packed around ``center``, as DeepCache's non-uniform mode) or
any list of key steps. Not part of this plugin: the paper's tuning methods (model assembly, ME-CondConv,
multi-UNet switching), which need training.

Defaults: the paper reports a 40 % faster SDM from feature inheritance; only its abstract was available,
so which modules and steps it skips are not known here. Our defaults, the mid block and the lowest-resolution
up block inherited at every second step, are our choice, not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import StablekitError
from ..plugins import settle
from ..registry import register
from .caching import KeySteps, StepCache


@dataclass(frozen=True)
class FeatureInheritanceConfig(KeySteps):
    """The UNet modules (`blocks`, by path; checked against the UNet on attach) that inherit their output
    between key steps, and the key steps as in :class:`~.deepcache.DeepCacheConfig`."""

    blocks: tuple[str, ...] = ("mid_block", "up_blocks.0")
    interval: int = 2
    schedule: str | tuple[int, ...] = "uniform"
    center: float = 0.3
    power: float = 1.4

    def __post_init__(self):
        blocks = (self.blocks,) if isinstance(self.blocks, str) else tuple(self.blocks)
        if not blocks or not all(isinstance(b, str) and b for b in blocks):
            raise StablekitError(f"feature inheritance needs module names, e.g. blocks=['mid_block']; got {blocks}")
        settle(self, blocks=blocks)
        self._check()


@register("accel")
class FeatureInheritance(StepCache):
    """``FeatureInheritance(blocks=("mid_block", "up_blocks.0"), interval=2, schedule="uniform")``."""

    name = "feature-inheritance"
    Config = FeatureInheritanceConfig

    def skipped_modules(self, unet):
        named, blocks = dict(unet.named_modules()), self.config.blocks
        for name in blocks:
            if name not in named:
                raise StablekitError(f"this UNet has no module '{name}'; name one of its blocks, e.g. 'mid_block'")
        return {name: named[name] for name in blocks}
