"""PhotoGuard's encoder attack (Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing",
ICML 2023; the "texture" / encoder attack that Diff-Protect (2024) shows is the weak point of
latent diffusion): perturb the pixels so that the VAE encoder maps the image to a target latent, so
every edit made from that latent (SDEdit, inpainting) starts from the wrong picture.

Objective (ascended by PGD): ``-mean((E(x') - z_target)^2)`` with E the encoder's mean latent
(``mode="toward"``, the default), or ``mean((E(x') - E(x))^2)``, away from the clean latent
(``mode="away"``). Targets: ``"gray"`` (the latent of a mid-grey image, the default), ``"zero"``
(the all-zero latent: PhotoGuard's image-to-image demo minimises the latent's norm), or any image of
the same size (PhotoGuard's inpainting demo uses a photo).

Implemented as in PhotoGuard's notebooks: sign-gradient PGD from a uniform random start, step size
decaying linearly to 1% of its start. Paper defaults: eps 0.06, step 0.02 (0.01 for inpainting),
1000 iterations -- on the [-1, 1] scale, so 0.03 = 7.65/255 and a 0.01 step in [0, 1] pixel units.
Ours: eps 8/255 (pixel units), step 0.01, **100 steps** (Diff-Protect's common setting for all its
attacks; 1000 is ``steps=1000``).

Deviations: the squared error is averaged (PhotoGuard takes the norm: same sign of the gradient);
the budget and step are in [0, 1] pixel units; the default target is a grey image's latent rather
than zero (our default; ``target="zero"`` is PhotoGuard's); PhotoGuard's inpainting variant
also zeroes the perturbation outside the kept region, which ``mask=`` does here for every method.
"""

from __future__ import annotations

import torch

from ..errors import StablekitError
from .core import encode, pixels
from .pgd import Budget, pgd

DEFAULTS = dict(steps=100, step_size=0.01, mode="toward")
MODES = ("toward", "away")


def target_latent(pipe, x: torch.Tensor, target) -> torch.Tensor:
    """The latent to push toward: ``"gray"``, ``"zero"``, or the latent of an image of `x`'s size."""
    with torch.no_grad():
        if isinstance(target, str) and target in ("gray", "grey"):
            return encode(pipe, torch.full_like(x, 0.5))
        if isinstance(target, str) and target == "zero":
            return torch.zeros_like(encode(pipe, x))
        y = pixels(pipe, target)
        if y.shape != x.shape:
            raise StablekitError(
                f"target image is {y.shape[-1]}x{y.shape[-2]} but the image is "
                f"{x.shape[-1]}x{x.shape[-2]}; give a target of the same size"
            )
        return encode(pipe, y)


def objective(pipe, x_adv: torch.Tensor, x: torch.Tensor, mode: str = "toward", target="gray") -> float:
    """The attack's objective at `x_adv` (higher is a stronger protection)."""
    with torch.no_grad():
        ref = target_latent(pipe, x, target) if mode == "toward" else encode(pipe, x)
        d = ((encode(pipe, x_adv) - ref) ** 2).mean().item()
    return -d if mode == "toward" else d


def attack(pipe, x: torch.Tensor, budget: Budget, *, mode: str = "toward", target="gray", **_) -> torch.Tensor:
    if mode not in MODES:
        raise StablekitError(f"the encoder attack's mode is one of {', '.join(MODES)}, not '{mode}'")
    ref = target_latent(pipe, x, target) if mode == "toward" else encode(pipe, x).detach()
    sign = -1.0 if mode == "toward" else 1.0

    def loss(x_adv, i):
        return sign * ((encode(pipe, x_adv) - ref) ** 2).mean()

    return pgd(x, loss, budget, random_start=True, decay=True, desc=f"protect (encoder, {mode})")
