"""What every quantization method shares: its config, the layers it quantizes, and the one path from a
full-precision pipeline to a :class:`~stablekit.quant.model.Quantized` model.

``method.quantize(pipe)`` records calibration trajectories (or takes ones already recorded), keeps the UNet
calls its timestep rule picks (:meth:`QuantMethod.select`), gathers every layer's statistics on them, builds
each layer (:meth:`QuantMethod.weight_scale`, :meth:`QuantMethod.act_ranges`, :meth:`QuantMethod.build_layer`)
and lets the method refine the result (:meth:`QuantMethod.refine`: reconstruction, fine-tuning).

Every method quantizes all ``Linear`` and ``Conv2d`` layers of the UNet; the first and last convolutions
(``conv_in``, ``conv_out``) are kept at 8-bit weights and activations at every setting, as is usual in
post-training quantization of diffusion models. Attention's two matrix products (query x key, softmax x value)
are not quantized.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import StablekitError
from ..plugins import settle
from .calibration import CalibrationConfig, LayerStats, Trajectories, collect, spread, trajectories
from .core import ActQuantizer, Bits, QuantLayer, conv_args, fake_act, mse_weight_scale, weight_codes, weight_scale
from .model import Quantized, fingerprint

EIGHT_BIT_LAYERS = ("conv_in", "conv_out")


@dataclass(frozen=True)
class QuantConfig:
    """`bits`: ``w8a8``, ``w4a8`` or ``w4a4``; calibration on `prompts` prompts x `steps` steps, of which
    `samples` UNet calls are kept."""

    bits: str = "w8a8"
    prompts: int = 16
    steps: int = 25
    samples: int = 64
    seed: int = 1234

    def __post_init__(self):
        settle(self, bits=str(Bits.parse(self.bits)))
        self.calibration()  # validates the numbers

    def calibration(self) -> CalibrationConfig:
        return CalibrationConfig(prompts=self.prompts, steps=self.steps, samples=self.samples, seed=self.seed)


def target_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d of the UNet, by name."""
    return {n: m for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


def skip_splits(unet: nn.Module) -> dict[str, int]:
    """{layer name: channels of the upsampling path} for the layers whose input concatenates the upsampling
    path with a skip connection (the first convolution and the shortcut of every up-block resnet)."""
    out = {}
    prev = unet.mid_block.resnets[-1].out_channels
    for b, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            split = prev if j == 0 else block.resnets[j - 1].out_channels
            for part in ("conv1", "conv_shortcut"):
                if isinstance(getattr(resnet, part, None), nn.Conv2d):
                    out[f"up_blocks.{b}.resnets.{j}.{part}"] = split
        prev = block.resnets[-1].out_channels
    return out


def mse_range(values: torch.Tensor, lo: float, hi: float, bits: int, grid: int = 16) -> tuple[float, float]:
    """The range ``(c * lo, c * hi)``, c in [0.3, 1], that quantizes `values` with the least squared error."""
    best, best_err = (lo, hi), None
    for c in torch.linspace(0.3, 1.0, grid).tolist():
        q = fake_act(values, torch.tensor([lo * c]), torch.tensor([hi * c]), bits, 0)
        err = float((q - values).pow(2).sum())
        if best_err is None or err < best_err:
            best, best_err = (lo * c, hi * c), err
    return best


class QuantMethod:
    """Base class of the methods; subclasses set ``name``, ``Config`` and override the steps they change."""

    name = "quant"
    Config: type = QuantConfig
    time_aware = False  # one activation range per timestep bucket
    split_skips = False  # separate ranges for the two halves of skip concatenations
    mse = True  # search weight and activation ranges for the least squared error (else min-max)

    def __init__(self, *args, **params):
        if len(args) == 1 and not params and isinstance(args[0], self.Config):
            self.config = args[0]
        else:
            self.config = self.Config(*args, **params)
        self.bits = Bits.parse(self.config.bits)

    def __repr__(self):
        from ..plugins import config_text

        return f"{type(self).__name__}({config_text(self.config)})"

    # ---------------------------------------------------------------- the path

    def quantize(self, pipe, traj: Trajectories | None = None) -> Quantized:
        """A quantized model of `pipe`'s UNet (not attached: ``stablekit.use(pipe, q)``)."""
        if getattr(pipe, "unet", None) is None:
            raise StablekitError("this pipeline has no UNet to quantize")
        base = fingerprint(pipe.unet)
        traj = traj if traj is not None else trajectories(pipe, self.config.calibration())
        calls = self.select(traj)
        layers = target_layers(pipe.unet)
        splits = skip_splits(pipe.unet) if self.split_skips else {}
        stats = collect(pipe.unet, layers, calls, splits, traj.train_steps)
        built = {n: self.build_layer(n, m, stats[n]) for n, m in layers.items()}
        q = Quantized(built, self.meta(pipe, base, traj))
        self.refine(pipe, q, calls)
        return q

    def select(self, traj: Trajectories) -> list:
        """The calibration calls: by default spread evenly over the trajectory."""
        return spread(traj, self.config.samples, self.config.seed)

    def layer_bits(self, name: str) -> Bits:
        return Bits(8, 8) if name in EIGHT_BIT_LAYERS else self.bits

    def weight_scale(self, name: str, w: torch.Tensor, bits: int) -> torch.Tensor:
        return mse_weight_scale(w, bits) if self.mse else weight_scale(w, bits)

    def act_ranges(self, name: str, stats: LayerStats, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) of shape (1 + buckets, parts): the global row, and the buckets' rows if time-aware."""
        lo, hi = stats.lo.clone(), stats.hi.clone()
        rows = range(lo.shape[0]) if self.time_aware else [0]
        for r in range(1, lo.shape[0]):
            if r not in rows or not torch.isfinite(lo[r]).all():
                lo[r], hi[r] = float("nan"), float("nan")
        if self.mse:
            for r in rows:
                if not torch.isnan(lo[r]).any():
                    vals = stats.sample(r)
                    for p in range(lo.shape[1]):
                        lo[r, p], hi[r, p] = mse_range(vals[p], float(lo[r, p]), float(hi[r, p]), bits)
        return lo, hi

    def build_layer(self, name: str, layer: nn.Module, stats: LayerStats) -> QuantLayer:
        bits = self.layer_bits(name)
        w = layer.weight.detach().float()
        scale = self.weight_scale(name, w, bits.weight)
        lo, hi = self.act_ranges(name, stats, bits.act)
        act = ActQuantizer(bits.act, "static", lo, hi, split=stats.split)
        kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        codes = weight_codes(w, scale, bits.weight)
        out = torch.tensor([stats.out_lo, stats.out_hi])
        return QuantLayer(kind, w.shape, bits.weight, codes, scale, layer.bias, act, conv_args(layer), out_range=out)

    def refine(self, pipe, q: Quantized, calls: list) -> None:
        """After building: reconstruction or fine-tuning (none by default)."""

    def meta(self, pipe, base_sha: str, traj: Trajectories) -> dict:
        model = str(pipe.config.get("_name_or_path") or "")
        if model and os.path.isdir(model):
            model = os.path.abspath(model)
        return {
            "method": self.name,
            "bits": str(self.bits),
            "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "base": {"model": model, "unet_sha256": base_sha},
            "train_steps": traj.train_steps,
        }
