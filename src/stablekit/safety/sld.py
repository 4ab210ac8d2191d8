"""Safe Latent Diffusion (Schramowski et al., CVPR 2023; a safety benchmark baseline): safety guidance as a plugin.

    with stablekit.use(pipe, SLD(concepts=["star"])):
        image = pipe("a red star on a gray background").images[0]

Implemented: the guidance of diffusers' ``StableDiffusionPipelineSafe``, on a standard pipeline. The concept text
runs as an extra branch of the guided UNet batch (:class:`~stablekit.plugins.GuidanceBranches`); with ``d = eps_c
- eps_s`` (prompt minus concept), each element gets the scale ``min(|d| * guidance, 1)``, zeroed where ``d >=
threshold``; the safety term ``(eps_s - eps_u) * scale + momentum * v`` updates the momentum ``v <- beta * v + (1
- beta) * term`` every step and, from step ``warmup`` on, is subtracted from the guidance direction. Here that is
done by replacing ``eps_c`` with ``eps_c - term``, which the pipeline's ``eps_u + g * (eps_c - eps_u)`` turns into
the safe pipeline's ``eps_u + g * (eps_c - eps_u - term)``.

Defaults are the safe pipeline's call defaults (its "medium" configuration): ``guidance=1000, warmup=10,
threshold=0.01, momentum=0.3, beta=0.4``. Deviations: the concept is the caller's (the pipeline's default is a
fixed list of inappropriate-content words), several concepts are joined with ", " into one prompt as there;
``warmup`` counts scheduler steps of this call (the pipeline counts loop iterations; the same for single-step
schedulers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StablekitError
from ..plugins import GuidanceBranches, settle
from ..registry import register
from .safree import concept_words


@dataclass(frozen=True)
class SLDConfig:
    """The parameters of :class:`SLD` (see the module docstring)."""

    concepts: tuple[str, ...] = ()
    guidance: float = 1000.0
    warmup: int = 10
    threshold: float = 0.01
    momentum: float = 0.3
    beta: float = 0.4

    def __post_init__(self):
        settle(self, concepts=concept_words(self.concepts, "SLD"))
        if self.guidance < 0 or self.warmup < 0 or not 0 <= self.beta <= 1:
            raise StablekitError(
                f"SLD: guidance and warmup must be >= 0 and beta in [0, 1] "
                f"(got guidance {self.guidance}, warmup {self.warmup}, beta {self.beta})"
            )


@register("guard")
class SLD(GuidanceBranches):
    """``SLD(concepts, guidance=1000, warmup=10, threshold=0.01, momentum=0.3, beta=0.4)``, or
    ``SLD(SLDConfig(...))``."""

    name = "sld"
    Config = SLDConfig

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self._v = None

    @property
    def prompts(self) -> list[str]:
        return [", ".join(self.config.concepts)]

    def reset(self, call):
        super().reset(call)
        self._v = None

    def combine(self, uncond, cond, extra):
        safe, cfg = extra[0], self.config
        d = cond - safe
        scale = torch.where(d >= cfg.threshold, 0.0, (d.abs() * cfg.guidance).clamp(max=1.0))
        term = (safe - uncond) * scale
        if self._v is None:
            self._v = torch.zeros_like(term)
        term = term + cfg.momentum * self._v
        self._v = cfg.beta * self._v + (1 - cfg.beta) * term
        return cond - term if self.call.step >= cfg.warmup else cond
