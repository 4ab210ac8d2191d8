"""The naive baseline: round-to-nearest post-training quantization with min-max ranges, as one would quantize a
classifier.

Weights: symmetric per output channel, the scale from each channel's largest magnitude. Activations: one
asymmetric range per layer input, the minimum and maximum seen over the calibration calls (spread evenly over
the full-precision trajectories), the same range at every timestep. No range search, no reconstruction. It is
the reference each method's gain is measured against, at every bit-width.
"""

from __future__ import annotations

from ..registry import register
from .method import QuantMethod


@register("quant")
class Naive(QuantMethod):
    name = "naive"
    mse = False
