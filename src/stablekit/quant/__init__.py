"""Post-training quantization of the UNet: 8-bit and 4-bit weights and activations.

One calibration path (:mod:`.calibration`: the full-precision model's own trajectories), one shared layer
machinery (:mod:`.core`), one model format (:mod:`.model`), and one module per method:

* :mod:`.naive` -- round-to-nearest with min-max ranges, the baseline;
* :mod:`.ptq4dm` -- PTQ4DM's calibration set (timesteps from a normal distribution), W8A8;
* :mod:`.qdiffusion` -- Q-Diffusion: timestep-spread calibration, split skip quantizers, block reconstruction
  with adaptive rounding; W8A8, W4A8;
* :mod:`.quest` -- QuEST: time-aware activation quantizers and selective fine-tuning; W4A8, W4A4;
* :mod:`.svdquant` -- SVDQuant: smoothing, a 16-bit low-rank branch, a 4-bit residual; W4A4.

::

    q = stablekit.quant.quantize(pipe, "svdquant:bits=w4a4")     # calibrates; returns a plugin
    with stablekit.use(pipe, q):
        image = pipe("a red circle on a blue background").images[0]
    q.save("svd-w4a4")                                          # stablekit.load("svd-w4a4") reopens it

Layers compute on dequantized values (simulated quantization); :func:`.int8.to_int8` moves the W8A8 layers
that allow it onto PyTorch's int8 kernels.
"""

from ..pipeline import FOLDER_FORMATS
from ..registry import CATALOGUE, build
from . import naive, ptq4dm, qdiffusion, quest, svdquant  # noqa: F401  (file the methods in the catalogue)
from .core import SETTINGS, Bits
from .model import META_FILE, Quantized, fingerprint, load_folder

FOLDER_FORMATS[META_FILE] = load_folder
METHODS = CATALOGUE["quant"]


def method(spec: str):
    """The method of ``NAME[:k=v,...]`` (e.g. ``svdquant:bits=w4a4``), NAME one of :data:`METHODS`."""
    return build(spec, METHODS, "quantization method")


def quantize(pipe, spec: str, traj=None) -> Quantized:
    """Calibrate and quantize `pipe`'s UNet with the method of `spec`; the result is not attached."""
    return method(spec).quantize(pipe, traj)


__all__ = ["Bits", "METHODS", "Quantized", "SETTINGS", "fingerprint", "method", "quantize"]
