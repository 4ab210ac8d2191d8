"""MultiDiffusion: denoise overlapping windows of a large latent and average them at every step.

"MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation" (Bar-Tal, Yariv, Lipman, Dekel, 2023;
reference code omerbt/MultiDiffusion).

At every step the latent is cut into windows of the model's native size sliding by ``stride``; each window is
denoised by the unchanged model, and every latent pixel takes the mean of the predictions of the windows that
cover it. With uniform weights the mean of the predictions, stepped once, is the paper's closed-form solution of
its least-squares fusion of the windows' steps (the scheduler's step is linear in the prediction), so the result
is the same as the reference code's averaging of stepped windows. Implemented as a UNet hook through the shared
:class:`~stablekit.accel.tiling.TiledUNet`, so any scheduler, guidance and the feature caches stack with it.

Defaults are the reference code's panorama settings: windows of the UNet's native sample size (64 latent pixels
for SD 1.5), ``stride`` of an eighth of the window (8 for SD 1.5), one window per UNet call
(``view_batch_size=1``).

Deviations from the reference code:

1. a latent side that the stride does not divide gets one more window flush with its far edge (the reference
   leaves the remainder uncovered), so every size works;
2. the prediction is averaged before the scheduler step instead of averaging per-window steps: equal for
   deterministic first-order schedulers (DDIM, Euler), and well defined for multistep ones, whose history is then
   one full-size latent; stochastic schedulers draw their noise once for the latent, not once per window;
3. the reference runs guidance inside its own loop; here the pipeline's guidance runs unchanged on the merged
   halves (the ``[uncond, cond]`` rows stay together in every window call);
4. the VAE decodes in tiles (diffusers' ``enable_tiling``) instead of in one call, to bound memory.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..errors import StablekitError
from ..registry import register
from .tiling import TileConfig, TiledUNet, Window


def starts(length: int, window: int, stride: int) -> list[int]:
    """Where the windows along one side of `length` begin; the last one ends at `length`."""
    if length <= window:
        return [0]
    first = list(range(0, length - window + 1, stride))
    return first if first[-1] == length - window else first + [length - window]


@dataclass(frozen=True)
class MultiDiffusionConfig(TileConfig):
    """Windows of side `tile` (None: the UNet's native size) every `stride` latent pixels (None: tile // 8),
    `batch` windows per UNet call, tiled VAE decoding unless ``tiled_vae=False``."""

    stride: int | None = None

    def __post_init__(self):
        self._check()
        if self.stride is not None and (isinstance(self.stride, bool) or not isinstance(self.stride, int)):
            raise StablekitError(f"stride is in latent pixels, a whole number >= 1; got {self.stride!r}")
        if self.stride is not None and self.stride < 1:
            raise StablekitError(f"stride is in latent pixels, a whole number >= 1; got {self.stride}")


@register("accel")
class MultiDiffusion(TiledUNet):
    """``MultiDiffusion(tile=None, batch=1, tiled_vae=True, stride=None)``: overlapping windows, averaged."""

    name = "multidiffusion"
    Config = MultiDiffusionConfig

    def windows(self, height: int, width: int, step: int) -> list[Window]:
        stride = self.config.stride or max(1, self.size // 8)
        rows = starts(height, self.size, stride)
        cols = starts(width, self.size, stride)
        return [
            (t, min(height, t + self.size), c, min(width, c + self.size)) for t, c in itertools.product(rows, cols)
        ]
