"""Compressed sensing with a latent diffusion prior: reconstruct an image from linear measurements y = A x.

Paper: "Invertible Diffusion Models for Compressed Sensing" (Chen et al., 2024; reference code
https://github.com/Guaishou74851/IDM). IDM fine-tunes a Stable Diffusion sampler end to end, made invertible so
that the whole chain fits in memory, to map measurements to images. That training does not fit this CPU, so this
module is the training-free route the brief allows, the algorithm of IDM's own diffusion baseline, DDNM ("Zero-Shot
Image Restoration Using Denoising Diffusion Null-Space Model", Wang, Yu and Zhang, 2023; reference code
https://github.com/wyhuai/DDNM), run through the embedded model's VAE.

Implemented: `particles` DDIM chains of the embedded model (unconditional: the empty prompt). At every step the
model's clean estimate is decoded to pixels, replaced by its range-null-space correction ``x + A^+ (y - A x)`` (the
closest image that explains the measurements exactly), encoded back, and the chain steps on from the corrected
estimate with the noise direction it implies. The output is the corrected decode of the final latents, averaged over
the particles (the posterior mean's estimate); each particle also explains y exactly. A hook `acquire` may add
measurements during sampling (Active Diffusion Subsampling, :mod:`.active_subsampling`).

Defaults: 10 DDIM steps, 4 particles.

Deviations:
1. Training-free (DDNM-style), not IDM's end-to-end fine-tuned invertible sampler: no measurement-injection
   modules, no training.
2. The correction is made in pixels and carried to the latent by the VAE encoder, so the latent chain is only
   approximately consistent (the paper's baseline works in pixel space; the embedded model is a latent model).
3. Block Gaussian measurements use orthonormal rows (so A^+ = A^T) on 8x8 RGB cells, not IDM's 32x32 gray blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StablekitError
from ..latents import Schedule, encode_prompts
from .measurements import BlockGaussian, PixelSubsampling


@dataclass(frozen=True)
class CSConfig:
    """`steps` DDIM steps of `particles` chains under `prompt` (empty: unconditional), `fit_steps` Adam steps at
    `fit_lr` on each clean estimate; `seed` fixes the noise."""

    steps: int = 8
    particles: int = 3
    fit_steps: int = 6
    fit_lr: float = 0.3
    prompt: str = ""
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.particles < 1:
            raise StablekitError(f"steps and particles must be >= 1 (got {self.steps}, {self.particles})")


def predict(pipe, sched: Schedule, z: torch.Tensor, i: int, cond: dict) -> torch.Tensor:
    """The model's clean latent estimate at step `i` (epsilon or v prediction; stable at zero SNR for v)."""
    out = pipe.unet(z, sched.timesteps[i], **cond, return_dict=False)[0]
    a = sched.alphas[i].item()
    if sched.prediction == "v_prediction":
        return a**0.5 * z - (1 - a) ** 0.5 * out
    return (z - (1 - a) ** 0.5 * out) / a**0.5


def decode(pipe, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]."""
    return pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)


def fit(pipe, z0: torch.Tensor, operator, y: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """`steps` Adam steps on the clean latents `z0` towards decodes that explain the measurements `y`."""
    z0 = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z0], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            loss = (operator.measure(decode(pipe, z0)) - y).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=[z0])
        opt.step()
    return z0.detach()


@torch.no_grad()
def reconstruct(pipe, operator, y: torch.Tensor, size: tuple[int, int], config: CSConfig = CSConfig(), acquire=None):
    """Reconstruct the (1, 3, *size) image measured as `y` by `operator`. `acquire(i, x0, operator, y)`, called at
    every step with the particles' clean estimates in pixels, may return a new (operator, y). Returns the mean of
    the particles clamped to [0, 1], the particles (each explains y exactly, so not clamped), the final operator
    and the number of network calls."""
    sched = Schedule(pipe, config.steps)
    f, n = pipe.vae_scale_factor, config.particles
    shape = (n, pipe.unet.config.in_channels, size[0] // f, size[1] // f)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))
    cond = encode_prompts(pipe, [config.prompt] * n, z)[1]
    for i in range(len(sched)):
        z0 = predict(pipe, sched, z, i, cond)
        if acquire is not None:
            operator, y = acquire(i, decode(pipe, z0), operator, y)
        a, a_next = sched.alphas[i].item(), sched.alphas[i + 1].item()
        z0 = fit(pipe, z0, operator, y, config.fit_steps, config.fit_lr)
        noise = (z - a**0.5 * z0) / (1 - a) ** 0.5
        z = a_next**0.5 * z0 + (1 - a_next) ** 0.5 * noise
    particles = operator.project(decode(pipe, z), y)
    return ((particles.mean(0, keepdim=True) + 1) / 2).clamp(0, 1), particles, operator, len(sched)


def make_operator(kind: str, ratio: float, size: tuple[int, int], seed: int = 0):
    """A random operator: ``"pixels"`` (random 2x2 cells) or ``"gaussian"`` (8x8 block Gaussian)."""
    if kind == "pixels":
        return PixelSubsampling.random(ratio, size, g=torch.Generator().manual_seed(seed))
    if kind == "gaussian":
        return BlockGaussian(ratio, seed=seed)
    raise StablekitError(f"unknown measurement operator '{kind}' (pixels or gaussian)")


MULTIPLE, MAX_SIDE = 32, 256  # the embedded UNet halves its 8x-reduced latent twice


def check_request(image, ratio: float, operator: str, active: bool, config: CSConfig) -> None:
    """One-line StablekitError for an image or setting :func:`sense_image` cannot take."""
    from .measurements import check_ratio
    from .super_resolution import MODES

    check_ratio(ratio)
    if image.mode not in MODES:
        raise StablekitError(f"images of mode {image.mode} are not supported (use {', '.join(MODES)})")
    w, h = image.size
    if w % MULTIPLE or h % MULTIPLE or max(w, h) > MAX_SIDE:
        raise StablekitError(
            f"a {w}x{h} image is not supported: sides must be multiples of {MULTIPLE} up to {MAX_SIDE}"
        )
    if active and operator != "pixels":
        raise StablekitError("active subsampling chooses pixel cells: use it with --operator pixels")
    if active and config.particles < 2:
        raise StablekitError("Active Diffusion Subsampling needs at least 2 particles")


def sense_image(pipe, image, ratio: float, operator: str = "gaussian", active: bool = False, config=CSConfig()):
    """Measure the PIL `image` with a random `operator` at `ratio` (or, with `active`, let Active Diffusion
    Subsampling choose the pixel cells) and reconstruct it: (PIL image, ratio measured, network calls)."""
    from ..latents import to_pil, to_tensor
    from .active_subsampling import active_subsampling

    check_request(image, ratio, operator, active, config)
    w, h = image.size
    x = to_tensor(image.convert("RGB"))[None] * 2 - 1
    if active:
        out, _, op, calls = active_subsampling(pipe, lambda o: o.measure(x), (h, w), ratio, config)
    else:
        op = make_operator(operator, ratio, (h, w), config.seed)
        out, _, op, calls = reconstruct(pipe, op, op.measure(x), (h, w), config)
    return to_pil(out), op.ratio, calls
