"""Q-Diffusion: calibration spread over all timesteps, split quantizers for skip concatenations, and block-wise
reconstruction of the weights' rounding.

"Q-Diffusion: Quantizing Diffusion Models" (Li et al., ICCV 2023; reference code Xiuyu-Li/q-diffusion).

Implemented:

* time step-aware calibration: UNet calls taken at timesteps spread evenly over the full-precision model's own
  trajectories (the paper samples every few steps of the whole process);
* shortcut splitting: the layers whose input concatenates the upsampling path with a skip connection (the
  first convolution and the shortcut of every up-block resnet) quantize the two parts with ranges of their own;
* block reconstruction (BRECQ) with adaptive rounding (AdaRound): per UNet block (every resnet and every
  attention block), each weight rounds up or down as learnt variables decide, optimized so that the quantized
  block's output matches the full-precision block's on the calibration inputs, with AdaRound's regulariser
  pushing each variable to 0 or 1 (``lambda=0.01``, ``beta`` annealed from 20 to 2 after a 20 % warm-up);
* ranges searched for the least squared error (weights per output channel, activations per tensor).

Defaults: W8A8 and W4A8, as in the paper; 64 calibration calls, of which `recon_calls` feed reconstruction.

Deviations from the paper and its reference code:

1. reconstruction runs `iters` = 100 iterations per block by default (the reference code runs 20000): a reduced
   count that finishes in minutes on a CPU; the rounding still starts from round-to-nearest;
2. block inputs come from the full-precision model, not from the model with the earlier blocks quantized;
3. the activation ranges are searched once and not refined by LSQ after the weights, and the layers outside the
   resnet and attention blocks (time embedding, down- and up-samplers, first and last convolutions) keep
   round-to-nearest weights;
4. attention's matrix products are not quantized (the reference code quantizes them, keeping the softmax
   output at a higher precision at W4A8), so the "attention at higher precision" choice has nothing to act on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from tqdm.auto import tqdm

from ..errors import StablekitError
from ..pipeline import frozen
from ..plugins import use
from ..registry import register
from .calibration import capture
from .core import QuantLayer, expand_scale, weight_codes
from .method import QuantConfig, QuantMethod

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


@dataclass(frozen=True)
class QDiffusionConfig(QuantConfig):
    """`iters` reconstruction iterations per block, on `recon_calls` of the calibration calls."""

    iters: int = 100
    recon_calls: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.iters < 0 or self.recon_calls < 1:
            raise StablekitError(
                f"Q-Diffusion needs iters >= 0 and recon_calls >= 1, not {self.iters}, {self.recon_calls}"
            )


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class AdaRound:
    """Learnable up/down rounding of one quantized layer's full-precision weight `w`."""

    def __init__(self, layer: QuantLayer, w: torch.Tensor):
        self.layer, self.w = layer, w
        self.s = expand_scale(layer.scale, w.shape)
        rest = w / self.s - (w / self.s).floor()  # in [0, 1): start at round-to-nearest's side
        self.v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest.clamp(0.01, 0.99) - GAMMA) - 1))
        lo, hi = -(2 ** (layer.wbits - 1)), 2 ** (layer.wbits - 1) - 1
        layer.soft_weight = lambda: ((w / self.s).floor() + rectified_sigmoid(self.v)).clamp(lo, hi) * self.s

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * rectified_sigmoid(self.v) - 1).abs().pow(beta)).sum()

    def finish(self) -> None:
        self.layer.soft_weight = None
        rounding = (rectified_sigmoid(self.v) >= 0.5).float().detach()
        self.layer.set_codes(weight_codes(self.w, self.layer.scale, self.layer.wbits, rounding))


def reconstruct_block(block, rounds: list[AdaRound], data: list[tuple], iters: int, weight: float = 0.01):
    opt = torch.optim.Adam([r.v for r in rounds], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    warm = int(0.2 * iters)
    for it in range(iters):
        args, kwargs, target = data[int(torch.randint(len(data), (1,), generator=gen))]
        out = block(*args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        loss = (out - target).pow(2).mean()
        if it >= warm:
            beta = 20 - (20 - 2) * (it - warm) / max(1, iters - warm)
            loss = loss + weight * sum(r.regulariser(beta) for r in rounds) / sum(r.v.numel() for r in rounds)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for r in rounds:
        r.finish()


@register("quant")
class QDiffusion(QuantMethod):
    name = "qdiffusion"
    Config = QDiffusionConfig
    split_skips = True

    def refine(self, pipe, q, calls):
        if not self.config.iters:
            return
        unet = pipe.unet
        blocks = {n: m for n, m in unet.named_modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))}
        originals = {n: m.weight.detach().float() for n, m in unet.named_modules() if n in q.layers}
        data = capture(unet, blocks, calls[: self.config.recon_calls])
        with use(pipe, q), frozen(unet), torch.enable_grad():
            for name, block in tqdm(blocks.items(), desc="block reconstruction", unit="block"):
                inside = [f"{name}.{n}" for n, m in block.named_modules() if isinstance(m, QuantLayer)]
                rounds = [AdaRound(q.layers[n], originals[n]) for n in inside]
                if rounds:
                    reconstruct_block(block, rounds, data[name], self.config.iters)
