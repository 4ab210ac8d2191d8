"""PTQ4DM: calibration on the full-precision model's own denoising trajectories, with timesteps drawn from a
normal distribution.

"Post-training Quantization on Diffusion Models" (Shang et al., CVPR 2023; reference code 42Shawn/PTQ4DM).

The paper's finding is about the calibration set: inputs of the denoiser taken from its own generation process
(not from training images with noise added), at timesteps drawn from a normal distribution centred before the
middle of the process (normally distributed time-step calibration), quantize better than uniform or
final-step sets. Implemented: that calibration set (the UNet calls of the full-precision pipeline's
trajectories whose timesteps are nearest to the draws), per-output-channel weights and per-tensor activations
whose ranges are searched for the least squared error on the calibration data; the paper's setting is W8A8.

Defaults: ``mean=0.4``, ``std=0.4`` of the training timesteps (the paper only constrains the mean to lie at or
below T/2; these values are our choice), 64 calibration calls.

Deviations from the paper and its reference code:

1. the reference code reconstructs the quantized network with BRECQ-style block reconstruction after choosing
   the calibration set; here the ranges are searched but nothing is reconstructed, so the method isolates the
   calibration set's contribution (Q-Diffusion adds reconstruction);
2. the paper's draws are over a DDIM/DDPM schedule of the same length as generation; here each draw goes to
   the nearest timestep of the recorded trajectories, so calls repeat when draws cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import StablekitError
from ..registry import register
from .calibration import normal_timesteps
from .method import QuantConfig, QuantMethod


@dataclass(frozen=True)
class PTQ4DMConfig(QuantConfig):
    """Calibration timesteps ~ N(`mean` T, (`std` T)^2)."""

    mean: float = 0.4
    std: float = 0.4

    def __post_init__(self):
        super().__post_init__()
        if not (0 <= self.mean <= 1 and self.std > 0):
            raise StablekitError(f"PTQ4DM needs 0 <= mean <= 1 and std > 0, got mean={self.mean}, std={self.std}")


@register("quant")
class PTQ4DM(QuantMethod):
    name = "ptq4dm"
    Config = PTQ4DMConfig

    def select(self, traj):
        c = self.config
        return normal_timesteps(traj, c.samples, c.mean, c.std, c.seed)
