"""Faster and larger generation without retraining: feature caching and tiled any-size generation as UNet hooks.

    with stablekit.use(pipe, DeepCache(interval=3, branch=0)):
        image = pipe(prompt).images[0]

* :class:`DeepCache` (DeepCache, 2024): reuse the deep features, recompute a shallow branch.
* :class:`EncoderPropagation` (Faster Diffusion, 2024): skip the encoder at non-key steps; ``parallel=True``
  runs the decoders of a key step and its non-key steps as one batch; ``prior_noise`` injects the initial noise.
* :class:`FeatureInheritance` (A-SDM, 2024): chosen blocks inherit their last output at chosen steps.
* :class:`LCMLoRA` (LCM-LoRA, 2023): a latent-consistency LoRA fused while attached, with ``LCMScheduler``.

Generation beyond the model's native size, as a UNet hook that denoises the latent window by window:

* :class:`MultiDiffusion` (MultiDiffusion, 2023): overlapping windows, averaged at every step.
* :class:`ShiftedTiles` (Any-Size-Diffusion, 2024): non-overlapping tiles on a grid that moves at every step.

They share :class:`TiledUNet` (``tiling.py``), which also decodes in tiles; :func:`check_size` refuses a size
the model cannot divide or the memory cannot hold. The caches share :func:`key_steps` (the step schedules) and
:class:`StepCache` (the hooks), in ``caching.py``; :func:`autotune` picks one of them and its schedule for a
pipeline and a deviation or speed target.
They are the ``accel`` kind of :data:`stablekit.registry.CATALOGUE`: ``--accel NAME:k=v`` on the command line,
and ``stablekit.registry.build("deepcache:interval=3", CATALOGUE["accel"], "accel")``.
"""

from .autotune import Tuning, autotune
from .caching import StepCache, key_steps
from .deepcache import DeepCache
from .encoder_propagation import EncoderPropagation
from .feature_inheritance import FeatureInheritance
from .lcm import LCMLoRA
from .multidiffusion import MultiDiffusion
from .shifted_tiles import ShiftedTiles
from .tiling import TiledUNet, check_size

__all__ = [
    "DeepCache",
    "EncoderPropagation",
    "FeatureInheritance",
    "LCMLoRA",
    "autotune",
    "Tuning",
    "key_steps",
    "StepCache",
    "MultiDiffusion",
    "ShiftedTiles",
    "TiledUNet",
    "check_size",
]
