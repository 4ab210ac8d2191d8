"""Shifted tiles: Any-Size-Diffusion's fast seamless tiled diffusion (FSTD).

"Any-Size-Diffusion: Toward Efficient Text-Driven Synthesis for Any-Size HD Images" (Zheng et al., 2024;
reference code ProAirVerse/Any-Size-Diffusion).

At every step the latent is cut into non-overlapping tiles of the model's native size, each tile is denoised by the
unchanged model, and the predictions are put back side by side. The tile grid moves by a random offset at every
step, so a border between tiles never stays in place for two steps and the next step's tiles straddle the last
step's seams: the overlap MultiDiffusion pays for with extra windows comes implicitly, over time. Each step costs
about as many UNet calls as there are tiles, against MultiDiffusion's many overlapping windows.

Implemented: the paper's second stage (FSTD) as a UNet hook through the shared
:class:`~stablekit.accel.tiling.TiledUNet`, for text-to-image at any size, with any scheduler, guidance and
feature caches stacked; offsets drawn from ``seed`` anew at every pipeline call. The first stage (ARAD, a model
fine-tuned on several aspect ratios) is a training recipe, not part of this plugin. Default tile: the UNet's
native sample size.

Deviations from the paper:

1. offsets are multiples of the UNet's downsampling factor, so each tile's feature maps align with the latent;
2. a strip along an edge at most half a tile wide joins its neighbour where that keeps tiles at most one and a
   half tiles wide, so the number of tiles per side stays about the side over the tile and a latent no larger
   than one tile is one tile (the paper does not say how it treats the partial tiles at the borders);
3. with a feature cache attached (DeepCache and the like), the grid moves only at the cache's key steps, so the
   features a cached step replays belong to the same tiles;
4. the VAE decodes in tiles (diffusers' ``enable_tiling``) instead of in one call, to bound memory.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from ..plugins import attached
from ..registry import register
from .caching import StepCache
from .tiling import TileConfig, TiledUNet, Window


def strips(length: int, tile: int, offset: int) -> list[tuple[int, int]]:
    """The non-overlapping ``(start, end)`` strips of a side of `length`, with cuts at ``offset + k * tile``;
    an edge strip at most half a tile wide joins its neighbour unless that makes a strip over 1.5 tiles."""
    cuts = [0] + [c for c in range(offset % tile, length, tile) if c > 0] + [length]
    spans = list(itertools.pairwise(cuts))
    for edge, pair in ((0, slice(0, 2)), (-1, slice(-2, None))):
        merged = (spans[pair][0][0], spans[pair][-1][1])
        narrow = spans[edge][1] - spans[edge][0] <= tile / 2
        if len(spans) > 1 and narrow and merged[1] - merged[0] <= 1.5 * tile:
            spans[pair] = [merged]
    return spans


@dataclass(frozen=True)
class ShiftedTilesConfig(TileConfig):
    """Tiles of side `tile` (None: the UNet's native size) on a grid moved at every step by offsets drawn from
    `seed`, `batch` tiles per UNet call, tiled VAE decoding unless ``tiled_vae=False``."""

    seed: int = 0

    def __post_init__(self):
        self._check()


@register("accel")
class ShiftedTiles(TiledUNet):
    """``ShiftedTiles(tile=None, batch=1, tiled_vae=True, seed=0)``: non-overlapping tiles on a moving grid."""

    name = "shifted-tiles"
    Config = ShiftedTilesConfig
    reach = 1.5

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self._fresh()

    def reset(self, call):
        super().reset(call)
        self._fresh()

    def _fresh(self):
        self._rng = random.Random(self.config.seed)
        self._offset = (0, 0)
        self._moves = None  # the steps at which the grid moves, found at the first model call

    def windows(self, height: int, width: int, step: int) -> list[Window]:
        if self._moves is None:
            self._moves = self._moving_steps()
        if self._moves is True or step in self._moves:
            choices = range(0, self.size, self.unit)
            self._offset = (self._rng.choice(choices), self._rng.choice(choices))
        rows = strips(height, self.size, self._offset[0])
        cols = strips(width, self.size, self._offset[1])
        return [(t, b, left, r) for (t, b), (left, r) in itertools.product(rows, cols)]

    def _moving_steps(self):
        """True (every step), or the key steps of an attached feature cache."""
        caches = [p for p in attached(self.pipe) if isinstance(p, StepCache)]
        n = getattr(self.pipe, "num_timesteps", None) or self.call.num_steps
        if not caches or not n:
            return True
        return set(caches[0].full_steps(n))
