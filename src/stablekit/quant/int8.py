"""Real int8 execution of W8A8 layers on PyTorch's quantized CPU kernels (``torch.ao``, the x86/oneDNN and FBGEMM
backends): the layer's own 8-bit weight codes and per-channel scales, its calibrated per-tensor input range,
int8 x int8 products accumulated in int32.

A layer runs this way when its weights and activations are 8-bit, its input has one static range (not
time-aware, not split, not dynamic) and it has no smoothing or low-rank branch; every other layer stays
simulated. The kernels return 8-bit outputs, so the layer's output is also quantized, to the output range seen
in calibration; the simulated layer keeps it in floating point. PyTorch marks its quantized tensor types as
deprecated; they are what its CPU int8 kernels take.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .core import QuantLayer
from .model import Quantized


def eligible(layer) -> bool:
    act = getattr(layer, "act", None)
    return (
        isinstance(layer, QuantLayer)
        and layer.wbits == 8
        and act is not None
        and act.bits == 8
        and act.mode == "static"
        and not act.split
        and layer.smooth is None
        and layer.down is None
        and layer.out_range is not None
        and layer.scale.shape[1] == 1
    )


def _affine(lo: float, hi: float) -> tuple[float, int]:
    """quint8 (scale, zero point) of the range [lo, hi], as the simulated quantizer computes them."""
    scale = max(hi - lo, 1e-8) / 255
    return scale, int(min(255, max(0, round(-lo / scale))))


class Int8Layer(nn.Module):
    """A QuantLayer's Linear or Conv2d on the int8 kernels (float in, float out)."""

    def __init__(self, layer: QuantLayer):
        super().__init__()
        import torch.ao.nn.quantized as nnq

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scale = layer.scale[:, 0].double()
            w = torch._make_per_channel_quantized_tensor(layer.codes, scale, torch.zeros_like(scale).long(), 0)
            shape = layer.shape
            if layer.kind == "linear":
                self.mod = nnq.Linear(shape[1], shape[0])
            else:
                c = layer.cargs
                self.mod = nnq.Conv2d(shape[1] * c["groups"], shape[0], tuple(shape[2:]), **c)
            self.mod.set_weight_bias(w, layer.bias)
        self.in_scale, self.in_zero = _affine(float(layer.act.lo[0, 0]), float(layer.act.hi[0, 0]))
        self.mod.scale, self.mod.zero_point = _affine(*layer.out_range.tolist())
        self.kind = layer.kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xq = torch.quantize_per_tensor(x.float().contiguous(), self.in_scale, self.in_zero, torch.quint8)
        return self.mod(xq).dequantize().to(dtype)

    def extra_repr(self):
        return f"{self.kind}, w8a8, int8 kernels"


def to_int8(q: Quantized) -> Quantized:
    """A copy of `q` (not attached) whose eligible layers run on the int8 kernels."""
    layers = {n: Int8Layer(m) if eligible(m) else m for n, m in q.layers.items()}
    return Quantized(layers, dict(q.meta, execution="int8 kernels where eligible"))
