"""The shared machinery of every quantization method: bit-width settings, weight and activation quantizers,
packed 4-bit storage, and the simulated ("fake-quant") linear and convolution layer that replaces a UNet layer.

Weights are quantized symmetrically per output channel (or per group of input columns): ``codes`` in
``[-2^(b-1), 2^(b-1)-1]`` times a ``scale`` per row and group; 4-bit codes are stored two to a byte. Activations
are quantized per tensor with an asymmetric range ``[lo, hi]`` calibrated offline, optionally one range per
timestep bucket (a time-aware quantizer) and per channel half (a split quantizer for skip concatenations), or
dynamically per token and group of channels (SVDQuant's 4-bit activations). The layer computes in floating
point on the dequantized values: this is simulated quantization; :mod:`stablekit.quant.int8` runs the W8A8
layers that allow it on PyTorch's int8 kernels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StablekitError

SETTINGS = ("w8a8", "w4a8", "w4a4")
TIME_BUCKETS = 10  # a time-aware quantizer keeps one activation range per tenth of the training timesteps


@dataclass(frozen=True)
class Bits:
    """A bit-width setting ``wWaA``: `weight` bits for the weights, `act` bits for the activations."""

    weight: int
    act: int

    @classmethod
    def parse(cls, text: str) -> Bits:
        m = re.fullmatch(r"w(\d+)a(\d+)", str(text).strip().lower())
        if not m or str(text).strip().lower() not in SETTINGS:
            raise StablekitError(f"unknown bit-width '{text}'; choose one of: {', '.join(SETTINGS)}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self):
        return f"w{self.weight}a{self.act}"


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, with the identity as gradient (straight-through estimator)."""
    return (x.round() - x).detach() + x


# ---------------------------------------------------------------- weights


def weight_rows(w: torch.Tensor) -> torch.Tensor:
    """A layer weight as a matrix (out, in * kernel)."""
    return w.reshape(w.shape[0], -1)


def groups_of(w: torch.Tensor, group: int | None) -> int:
    """How many column groups a row of `w` splits into (1: per channel)."""
    k = weight_rows(w).shape[1]
    return k // group if group and k % group == 0 and k > group else 1


def weight_scale(w: torch.Tensor, bits: int, group: int | None = None, clip: torch.Tensor | float = 1.0):
    """Symmetric scale (out, groups) from each row's (group's) largest magnitude times `clip`."""
    g = groups_of(w, group)
    amax = weight_rows(w).reshape(w.shape[0], g, -1).abs().amax(-1)
    return (amax * clip).clamp_min(1e-8) / (2 ** (bits - 1) - 1)


def expand_scale(scale: torch.Tensor, w_shape) -> torch.Tensor:
    """A (out, groups) scale broadcast to a weight of `w_shape`."""
    k = math.prod(w_shape[1:])
    return scale.repeat_interleave(k // scale.shape[1], dim=1).reshape(w_shape)


def weight_codes(w: torch.Tensor, scale: torch.Tensor, bits: int, rounding: torch.Tensor | None = None):
    """Integer codes (int8 tensor of w's shape); `rounding` (0/1 per weight) replaces round-to-nearest."""
    x = w / expand_scale(scale, w.shape)
    q = x.floor() + rounding if rounding is not None else x.round()
    return q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)


def fake_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantized-dequantized `w`, differentiable in `w` through round-to-nearest (for fine-tuning)."""
    s = expand_scale(scale, w.shape)
    return round_ste(w / s).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s


def mse_weight_scale(w: torch.Tensor, bits: int, group: int | None = None, grid: int = 20) -> torch.Tensor:
    """The per-row (group) scale whose clipping ratio in [0.5, 1] minimises the squared rounding error."""
    best_err, best = None, None
    g = groups_of(w, group)
    for c in torch.linspace(0.5, 1.0, grid):
        s = weight_scale(w, bits, group, float(c))
        err = (fake_weight(w, s, bits) - w).pow(2)
        err = weight_rows(err).reshape(w.shape[0], g, -1).sum(-1)
        if best is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes in [-8, 7] stored two to a byte (uint8, flat, low nibble first)."""
    u = (codes.flatten().to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack4(packed: torch.Tensor, shape) -> torch.Tensor:
    """The int8 codes of `shape` that :func:`pack4` stored."""
    u = torch.stack([packed & 15, packed >> 4], dim=1).flatten()[: math.prod(shape)]
    return (u.to(torch.int16) - 8).to(torch.int8).reshape(shape)


# ---------------------------------------------------------------- activations


class TimeContext:
    """The timestep of the UNet call in progress, set by the quantized model's hook; read by time-aware
    quantizers. ``bucket`` is 0 when unknown (the global range is used)."""

    def __init__(self, train_steps: int = 1000):
        self.train_steps, self.bucket = train_steps, 0

    def set(self, timestep) -> None:
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        self.bucket = 1 + min(TIME_BUCKETS - 1, max(0, int(t * TIME_BUCKETS / self.train_steps)))


def fake_act(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, dim: int, split: int = 0):
    """Asymmetric quantization of `x` to the range [lo, hi]; with a `split`, channels [0, split) of `dim` use
    ``lo[0], hi[0]`` and the rest ``lo[1], hi[1]``."""
    if split:
        head, tail = x.split([split, x.shape[dim] - split], dim)
        return torch.cat([fake_act(head, lo[:1], hi[:1], bits, dim), fake_act(tail, lo[1:], hi[1:], bits, dim)], dim)
    levels = 2**bits - 1
    scale = (hi - lo).clamp_min(1e-8) / levels
    zero = (-lo / scale).round()
    q = (round_ste(x / scale) + zero).clamp(0, levels)
    return (q - zero) * scale


def dynamic_group_act(x: torch.Tensor, bits: int, dim: int, group: int = 64) -> torch.Tensor:
    """Symmetric quantization of every token's channels in groups of `group`, scales computed on the fly."""
    c = x.shape[dim]
    g = c // group if c % group == 0 and c > group else 1
    xs = x.movedim(dim, -1).unflatten(-1, (g, -1))
    qmax = 2 ** (bits - 1) - 1
    scale = xs.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax
    q = round_ste(xs / scale).clamp(-qmax - 1, qmax) * scale
    return q.flatten(-2).movedim(-1, dim)


class ActQuantizer(nn.Module):
    """Activation quantizer of `bits` bits: ``mode`` "static" (calibrated ranges ``lo``/``hi`` of shape
    (1 + buckets, parts): row 0 the global range, row b the range of timestep bucket b, NaN where unseen; two
    parts when channels [0, split) and [split, C) have ranges of their own) or "dynamic" (per token and group of
    64 channels)."""

    def __init__(self, bits, mode="static", lo=None, hi=None, context: TimeContext | None = None, split: int = 0):
        super().__init__()
        self.bits, self.mode, self.context, self.split = bits, mode, context, split
        self.register_buffer("lo", torch.zeros(1, 1) if lo is None else lo.clone().float())
        self.register_buffer("hi", torch.ones(1, 1) if hi is None else hi.clone().float())

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (parts,) range in use: the current timestep bucket's if calibrated, else the global one."""
        b = self.context.bucket if self.context is not None else 0
        if 0 < b < self.lo.shape[0] and not torch.isnan(self.lo[b]).any():
            return self.lo[b], self.hi[b]
        return self.lo[0], self.hi[0]

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.mode == "dynamic":
            return dynamic_group_act(x, self.bits, dim)
        lo, hi = self.ranges()
        return fake_act(x, lo.to(x.dtype), hi.to(x.dtype), self.bits, dim, self.split)


# ---------------------------------------------------------------- the layer


def conv_args(layer: nn.Module) -> dict:
    """The hyper-parameters of a Conv2d (empty for a Linear)."""
    if not isinstance(layer, nn.Conv2d):
        return {}
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


class QuantLayer(nn.Module):
    """A Linear or Conv2d computed from quantized weights on quantized inputs (simulated).

    ``y = op(Q_a(x / smooth), codes * scale) + bias [+ op(x / smooth, up @ down)]``: `smooth` (per input channel)
    and the low-rank pair (`down`, `up`) are SVDQuant's and absent otherwise. 4-bit codes are kept packed.
    `out_range`: the output's calibrated range, used only when the layer moves to the int8 kernels."""

    def __init__(
        self, kind, shape, wbits, codes, scale, bias, act, cargs=None, smooth=None, down=None, up=None, out_range=None
    ):
        super().__init__()
        self.kind, self.shape, self.wbits, self.act, self.cargs = kind, tuple(shape), wbits, act, dict(cargs or {})
        self.soft_weight = None  # while reconstruction or fine-tuning optimizes the weight: a callable giving it
        self.register_buffer("codes", None)
        self.set_codes(codes)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("smooth", smooth)
        self.register_buffer("down", down)
        self.register_buffer("up", up)
        self.register_buffer("out_range", out_range)  # (lo, hi) of the output in calibration, for int8 kernels

    def set_codes(self, codes: torch.Tensor) -> None:
        """Store integer `codes` (of the weight's shape), packed two to a byte at 4 bits or fewer."""
        self.codes = pack4(codes) if self.wbits <= 4 else codes.to(torch.int8)

    def int_codes(self) -> torch.Tensor:
        return unpack4(self.codes, self.shape) if self.wbits <= 4 else self.codes

    def weight(self) -> torch.Tensor:
        if self.soft_weight is not None:
            return self.soft_weight()
        return self.int_codes().float() * expand_scale(self.scale, self.shape)

    def op(self, x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w, bias)
        return F.conv2d(x, w, bias, **self.cargs)

    def lowrank(self, x: torch.Tensor) -> torch.Tensor:
        """The 16-bit branch: ``x`` through the (rank, in*k) `down` then the (out, rank) `up` factor."""
        if self.kind == "linear":
            return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))
        down = self.down.to(x.dtype).reshape(-1, *self.shape[1:])
        h = F.conv2d(x, down, None, **self.cargs)
        return F.conv2d(h, self.up.to(x.dtype)[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = -1 if self.kind == "linear" else 1
        if self.smooth is not None:
            shape = [1] * x.dim()
            shape[dim] = -1
            x = x / self.smooth.to(x.dtype).reshape(shape)
        xq = self.act(x, dim) if self.act is not None else x
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = self.op(xq, self.weight().to(x.dtype), bias)
        return y + self.lowrank(x) if self.down is not None else y

    def storage_bytes(self) -> int:
        """Bytes of everything this layer stores (codes, scales, bias, smoothing, low-rank factors)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self):
        extra = ", low-rank " + str(self.down.shape[0]) if self.down is not None else ""
        return f"{self.kind} {self.shape}, w{self.wbits}a{self.act.bits if self.act else 'fp'}{extra}, simulated"
