"""DeepCache: reuse the UNet's deep features across steps, recompute only a shallow branch.

"DeepCache: Accelerating Diffusion Models for Free" (2024; reference code horseee/DeepCache).

At a key step the whole UNet runs and every module below the chosen skip branch stores its output. At the
other steps those modules return their stored output without running, so only the shallow path runs: the
down layers above the branch, the skip connection, and the up layers above it.

Implemented: the uniform 1:N schedule (a key step every `interval` steps), the non-uniform one
(``schedule="quadratic"``: the same number of key steps, packed around ``center``) or any list of key
steps; any skip branch; any ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL) in text-to-image, image-to-image
and ControlNet pipelines.

Branches number the layers of the down path in order, a layer being a resnet (with its attention) or a
downsampler; branch ``b`` caches everything below layer ``b``. For SD 1.x/2.x and SDXL this is the
reference code's numbering (block ``b // 3``, layer ``b % 3``), and at equal settings the output equals its
``DeepCacheSDHelper``. Defaults are the reference code's usage example: ``interval=3``, ``branch=0`` (the
shallowest branch, the fastest); the paper reports 2.3x on SD 1.5 for a 0.05 CLIP-score drop.

Deviations from the reference code:

* steps are counted, not found by looking the timestep up in ``scheduler.timesteps`` (ambiguous for
  second-order schedulers, whose timesteps repeat), and all state is reset at every pipeline call (the
  helper keeps its first call's start step, so a later img2img call with another strength can begin on a
  cached step and reuse the previous call's features);
* ``"quadratic"`` places its key steps at ``center + sign(u) * |u| ** power`` for evenly spaced ``u``; the
  reference computes the part before ``center`` with complex powers of a negative number and keeps only the
  real part, which spaces those steps differently. It has no defaults for ``center``/``power``; ours
  (30 % of the steps, 1.4) are our choice. ``DeepCacheSDHelper`` itself has no non-uniform mode.
* ControlNet: residuals on the recomputed skip connections act at every step; those on the cached deep
  ones act at key steps only, which is where the deep branch they feed runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import StablekitError
from ..registry import register
from .caching import KeySteps, StepCache


def branches(unet) -> list[tuple[int, int]]:
    """``(down block, layer)`` of each skip branch, shallowest first."""
    return [(b, j) for b, block in enumerate(unet.down_blocks) for j in range(_n_layers(block))]


def _n_layers(block) -> int:
    return len(block.resnets) + len(block.downsamplers or ())


def _layer(block, prefix: str, j: int) -> dict:
    """The modules of layer `j` of a down or up block: resnet `j` with its attention, or the downsampler."""
    if j >= len(block.resnets):
        return {f"{prefix}.downsamplers.{i}": m for i, m in enumerate(block.downsamplers)}
    mods = {f"{prefix}.resnets.{j}": block.resnets[j]}
    if getattr(block, "attentions", None):
        mods[f"{prefix}.attentions.{j}"] = block.attentions[j]
    return mods


@dataclass(frozen=True)
class DeepCacheConfig(KeySteps):
    """A key step every `interval` steps (``schedule="uniform"``), as many packed around `center` with spread
    `power` (``"quadratic"``), or the given key steps; between them the modules below skip branch `branch` are
    cached (the branch is checked against the UNet on attach)."""

    interval: int = 3
    branch: int = 0
    schedule: str | tuple[int, ...] = "uniform"
    center: float = 0.3
    power: float = 1.4

    def __post_init__(self):
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise StablekitError(f"DeepCache branch is a whole number >= 0, got {self.branch!r}")
        self._check()


@register("accel")
class DeepCache(StepCache):
    """``DeepCache(interval=3, branch=0, schedule="uniform" | "quadratic" | key steps, center=0.3, power=1.4)``,
    or ``DeepCache(DeepCacheConfig(...))``."""

    name = "deepcache"
    Config = DeepCacheConfig

    def skipped_modules(self, unet):
        all_branches, branch = branches(unet), self.config.branch
        if not 0 <= branch < len(all_branches):
            raise StablekitError(f"this UNet has skip branches 0 to {len(all_branches) - 1}; got {branch}")
        b, layer = all_branches[branch]
        n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
        deep = {f"down_blocks.{i}": unet.down_blocks[i] for i in range(b + 1, n_down)}
        if unet.mid_block is not None:
            deep["mid_block"] = unet.mid_block
        deep.update({f"up_blocks.{i}": unet.up_blocks[i] for i in range(n_up - 1 - b)})
        down, up = unet.down_blocks[b], unet.up_blocks[n_up - 1 - b]
        if layer == 0:
            deep[f"down_blocks.{b}"] = down
        else:
            for j in range(layer, _n_layers(down)):
                deep.update(_layer(down, f"down_blocks.{b}", j))
        for k in range(len(up.resnets) - 1 - layer):  # up layers count from the output: resnet k is layer n - 1 - k
            deep.update(_layer(up, f"up_blocks.{n_up - 1 - b}", k))
        return deep
