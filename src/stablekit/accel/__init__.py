"""Faster generation without retraining: feature caching as module hooks on the UNet.

    with stablekit.use(pipe, DeepCache(interval=3, branch=0)):
        image = pipe(prompt).images[0]

* :class:`DeepCache` (DeepCache, 2024): reuse the deep features, recompute a shallow branch.
* :class:`EncoderPropagation` (Faster Diffusion, 2024): skip the encoder at non-key steps; ``parallel=True``
  runs the decoders of a key step and its non-key steps as one batch; ``prior_noise`` injects the initial noise.
* :class:`FeatureInheritance` (A-SDM, 2024): chosen blocks inherit their last output at chosen steps.
* :class:`LCMLoRA` (LCM-LoRA, 2023): a latent-consistency LoRA fused while attached, with ``LCMScheduler``.

They share :func:`key_steps` (the step schedules) and :class:`StepCache` (the hooks), in ``caching.py``;
:func:`autotune` picks one of them and its schedule for a pipeline and a deviation or speed target.
They are the ``accel`` kind of :data:`stablekit.registry.CATALOGUE`: ``--accel NAME:k=v`` on the command line,
and ``stablekit.registry.build("deepcache:interval=3", CATALOGUE["accel"], "accel")``.
"""

from .autotune import Tuning, autotune
from .caching import StepCache, key_steps
from .deepcache import DeepCache
from .encoder_propagation import EncoderPropagation
from .feature_inheritance import FeatureInheritance
from .lcm import LCMLoRA

__all__ = [
    "DeepCache",
    "EncoderPropagation",
    "FeatureInheritance",
    "LCMLoRA",
    "autotune",
    "Tuning",
    "key_steps",
    "StepCache",
]
