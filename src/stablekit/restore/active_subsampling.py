"""Active Diffusion Subsampling: choose which pixels to measure next from the disagreement of posterior particles.

Paper: "Active Diffusion Subsampling" (Nolan, Stevens, van Gorp, van Sloun and others, 2024; code
https://active-diffusion-subsampling.github.io/).

Implemented: the reverse diffusion runs `particles` posterior chains (:func:`.compressed_sensing.reconstruct`)
that start with no measurements. At each of the first ``steps - hold`` steps the particles' clean estimates are a
belief over the image; the next measurements are the cells (``block`` x ``block`` pixels, all channels) whose
outcome has the highest entropy under that belief, which the sensor then returns, and the chains condition on
everything measured so far. The budget ``ratio`` (the fraction of cells measured in the end) is split evenly over
the acquisition steps. The baseline is the same sampler with the same number of cells drawn uniformly at random and
all measured from the start.

Defaults: 2x2-pixel cells, acquisitions at every step but the last two, measurement noise 0.01 in the entropy.

Deviations:
1. The entropy of a cell's measurement is that of a Gaussian fitted to the particles (per value, plus the
   measurement noise), ``sum log(var + sigma^2)``, instead of the paper's Gaussian-mixture approximation over
   particle pairs; both rank the cells by how much the particles disagree there.
2. The posterior chains are the DDNM-style latent chains of :mod:`.compressed_sensing`, not DPS guidance.
3. Several cells per acquisition step (the budget over the steps), where the paper takes one measurement per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import StablekitError
from .compressed_sensing import CSConfig, reconstruct
from .measurements import PixelSubsampling, check_ratio, check_size

NOISE = 0.01


def cell_entropy(x0: torch.Tensor, block: int, noise: float = NOISE) -> torch.Tensor:
    """(H / block, W / block) entropy, up to constants, of each cell's values under a Gaussian fitted to the
    particles `x0` (P, 3, H, W)."""
    per_value = (x0.var(0, unbiased=True) + noise**2).log().sum(0, keepdim=True)
    return F.avg_pool2d(per_value[None], block)[0, 0] * block**2


def schedule(total: int, steps: int) -> list[int]:
    """`total` cells split as evenly as possible over `steps` acquisition steps."""
    return [total // steps + (k < total % steps) for k in range(steps)]


def active_subsampling(
    pipe, sensor, size, ratio: float, config: CSConfig | None = None, block: int = 2, hold: int = 2
):
    """Measure and reconstruct an image of `size` (H, W): `sensor(operator)` returns the measurements of the true
    image under `operator`. Returns what :func:`reconstruct` returns; the final operator holds the chosen cells."""
    config = config or CSConfig()
    check_ratio(ratio)
    check_size(size, block)
    if config.particles < 2:
        raise StablekitError("Active Diffusion Subsampling needs at least 2 particles")
    cells = (size[0] // block) * (size[1] // block)
    counts = schedule(max(1, round(ratio * cells)), max(1, config.steps - hold))

    def acquire(i, x0, operator, y):
        if i >= len(counts) or not counts[i]:
            return operator, y
        score = cell_entropy(x0, block).flatten().masked_fill(operator.mask.flatten(), -torch.inf)
        operator = operator.with_cells(score.topk(counts[i]).indices)
        return operator, sensor(operator)

    start = PixelSubsampling(torch.zeros(size[0] // block, size[1] // block, dtype=torch.bool), block)
    return reconstruct(pipe, start, torch.zeros(1, 3, *size), size, config, acquire)
