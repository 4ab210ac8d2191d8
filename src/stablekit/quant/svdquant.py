"""SVDQuant: activation outliers moved into the weights by smoothing, weight outliers absorbed by a 16-bit
low-rank branch, and the residual quantized to 4 bits.

"SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models" (Li et al., ICLR 2025;
reference code mit-han-lab/nunchaku, quantization in mit-han-lab/deepcompressor).

For a layer ``y = x W^T``: a per-input-channel factor ``l_j = max|x_j|^a / max|W_:j|^(1-a)`` divides the input
and multiplies the weight (``x' = x / l``, ``W' = W diag(l)``), so activation outliers become weight outliers;
the top singular directions of ``W'`` form a branch ``x' (U_r S_r)(V_r)^T`` kept in 16 bits (rank ``r``), and the
residual ``W' - U_r S_r V_r^T``, now without its largest directions, is quantized to 4 bits together with the
smoothed activations: ``y = Q(x') Q(R)^T + x' L_1 L_2``. Convolutions are treated as matrices over
(input channel x kernel position), the branch running as a rank-``r`` convolution followed by a 1x1 one.

Defaults: rank 32 (the paper's), 4-bit weights in groups of 64 input columns with one scale each and 4-bit
activations quantized per token in groups of 64 channels (the paper's INT4 setting), migration strength
``alpha=0.5``.

Deviations from the paper and its reference code:

1. the reference code searches the migration strength per layer for the least output error; here ``alpha`` is
   one value for all layers;
2. the low-rank branch is computed on the smoothed weight once, without the reference code's alternating
   refinement of the branch against the quantized residual;
3. the paper fuses the branch's down projection into the 4-bit kernel (Nunchaku); here both run as separate
   simulated operations, so SVDQuant's speed is not measured, only its quality and weight memory;
4. the rank is an absolute number of directions: on a narrow model (the embedded one's widest layers have 128
   channels) rank 32 is a quarter of a layer's rank, a much larger share than on SD's 1280-channel layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import StablekitError
from ..registry import register
from .core import ActQuantizer, QuantLayer, conv_args, mse_weight_scale, weight_codes, weight_rows
from .method import QuantConfig, QuantMethod

GROUP = 64


@dataclass(frozen=True)
class SVDQuantConfig(QuantConfig):
    """Low-rank branch of `rank` directions; migration strength `alpha` in [0, 1]."""

    bits: str = "w4a4"
    rank: int = 32
    alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise StablekitError(f"SVDQuant rank is a whole number >= 0, got {self.rank!r}")
        if not 0 <= self.alpha <= 1:
            raise StablekitError(f"SVDQuant alpha lies in [0, 1], got {self.alpha}")


def smoothing(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel factors ``max|x_j|^alpha / max|W_:j|^(1-alpha)`` (1 where either is zero)."""
    w_absmax = w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(1)
    s = x_absmax.clamp_min(1e-5) ** alpha / w_absmax.clamp_min(1e-5) ** (1 - alpha)
    return torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))


def low_rank(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (r, in*k), up (out, r)) with ``up @ down`` the best rank-r approximation of `w` as a matrix."""
    u, s, vh = torch.linalg.svd(weight_rows(w).double(), full_matrices=False)
    r = min(rank, s.numel())
    return vh[:r].float(), (u[:, :r] * s[:r]).float()


@register("quant")
class SVDQuant(QuantMethod):
    name = "svdquant"
    Config = SVDQuantConfig

    def build_layer(self, name: str, layer: nn.Module, stats) -> QuantLayer:
        bits = self.layer_bits(name)
        if name in ("conv_in", "conv_out"):
            return super().build_layer(name, layer, stats)
        w = layer.weight.detach().float()
        smooth = smoothing(stats.chan_absmax.float(), w, self.config.alpha)
        ws = w * smooth.reshape(1, -1, *[1] * (w.dim() - 2))
        down, up = low_rank(ws, self.config.rank)
        residual = ws - (up @ down).reshape(w.shape)
        scale = mse_weight_scale(residual, bits.weight, GROUP)
        codes = weight_codes(residual, scale, bits.weight)
        act = ActQuantizer(bits.act, "dynamic")
        kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        branch = dict(down=down.half(), up=up.half()) if len(down) else {}
        cargs = conv_args(layer)
        return QuantLayer(kind, w.shape, bits.weight, codes, scale, layer.bias, act, cargs, smooth, **branch)
