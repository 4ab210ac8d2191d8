"""Expectation over transformations (EOT, Athalye et al. 2018): every PGD step optimises the protection
through a transformation drawn at random, so that it survives the image being re-encoded or resized.

Each step draws one of {identity, the chosen transformations} uniformly (one sample per step, a
stochastic estimate of the expectation) from a numpy generator of its own, seeded from the attack's
seed (draws interleaved with the attack's torch noise on one generator come out correlated):

* ``jpeg`` (quality, default 75): the real JPEG codec of :func:`stablekit.eval.attacks.jpeg` in the
  forward pass; it is not differentiable (quantised DCT coefficients), so its gradient is passed
  straight through as the identity (BPDA);
* ``resize`` (factor, default 0.5): down- (or, above 1, up-) sampling and back to the original size,
  bilinear with antialiasing in torch, so differentiable exactly (the attack suite only has
  ``resized_crop``; the benchmark's resilience test resizes with PIL);
* ``noise`` (standard deviation on the [0, 1] scale, default 0.03): :func:`stablekit.eval.attacks.noise`
  in the forward pass, clipped and rounded; its gradient is the identity, which is exact for additive
  noise apart from the clipping and rounding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import StablekitError
from ..eval import attacks
from ..latents import to_pil, to_tensor

DEFAULTS = {"jpeg": 75, "resize": 0.5, "noise": 0.03}


def _straight_through(x: torch.Tensor, image: Image.Image) -> torch.Tensor:
    y = to_tensor(image)[None]
    return x + (y.to(x) - x).detach()


def jpeg(x: torch.Tensor, quality, rng: np.random.Generator) -> torch.Tensor:
    return _straight_through(x, attacks.jpeg([to_pil(x)], int(quality))[0])


def resize(x: torch.Tensor, factor, rng: np.random.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(y, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def noise(x: torch.Tensor, std, rng: np.random.Generator) -> torch.Tensor:
    return _straight_through(x, attacks.noise([to_pil(x)], float(std), seed=int(rng.integers(2**31)))[0])


TRANSFORMS = {"jpeg": jpeg, "resize": resize, "noise": noise}


def parse(eot) -> dict[str, float]:
    """``False``/``None`` (none), ``True`` (all, default strengths), names, or ``{name: strength}``."""
    if eot is None or eot is False:
        return {}
    if eot is True:
        return dict(DEFAULTS)
    if isinstance(eot, str):
        eot = [eot]
    items = eot.items() if isinstance(eot, dict) else [(name, None) for name in eot]
    out = {}
    for name, strength in items:
        if name == "all":
            out.update(DEFAULTS)
            continue
        if name not in TRANSFORMS:
            raise StablekitError(f"unknown EOT transformation '{name}'; use {', '.join(TRANSFORMS)} or all")
        out[name] = DEFAULTS[name] if strength is None else float(strength)
    return out


def sample(x: torch.Tensor, transforms: dict[str, float], rng: np.random.Generator) -> torch.Tensor:
    """`x` through one transformation drawn uniformly from the identity and `transforms`."""
    if not transforms:
        return x
    k = int(rng.integers(len(transforms) + 1))
    if k == 0:
        return x
    name, strength = list(transforms.items())[k - 1]
    return TRANSFORMS[name](x, strength, rng)
