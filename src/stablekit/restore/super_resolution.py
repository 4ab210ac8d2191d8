"""One entry point for the super-resolution methods: check the input, run the method, return a PIL image.

big = stablekit.restore.super_resolve_image(Image.open("small.png"), method="resshift", scale=4)
"""

from __future__ import annotations

from PIL import Image

from ..errors import StablekitError
from . import obc, resshift, sr_diffusion, sr_net

METHODS = {
    "resshift": resshift.super_resolve,
    "diffusion": sr_diffusion.super_resolve,
    "obc": obc.super_resolve,
}
MODES = ("RGB", "L", "P")  # converted to RGB; others (alpha, CMYK, 16-bit) are refused
MIN_SIDE, MAX_SIDE = 4, 256


def check_image(image: Image.Image, scale: int) -> None:
    """One-line StablekitError for an image or scale the shipped networks cannot take."""
    if scale != sr_net.SCALE:
        raise StablekitError(f"--scale {scale} is not supported: the shipped networks upscale by {sr_net.SCALE}")
    if image.mode not in MODES:
        raise StablekitError(f"images of mode {image.mode} are not supported (use {', '.join(MODES)})")
    if not (MIN_SIDE <= min(image.size) and max(image.size) <= MAX_SIDE):
        raise StablekitError(
            f"a {image.width}x{image.height} image is not supported: each side must be {MIN_SIDE} to {MAX_SIDE} pixels"
        )


def open_image(path) -> Image.Image:
    """The image in the file at `path`, loaded in its own mode, or a one-line StablekitError."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as f:
            f.load()
            return f.copy()
    except (OSError, UnidentifiedImageError) as e:
        raise StablekitError(f"cannot read image '{path}': {e}") from None


def super_resolve_image(image: Image.Image, method: str = "resshift", scale: int = sr_net.SCALE, seed: int = 0):
    """`image` upscaled `scale` times by `method` (a key of METHODS), as an RGB PIL image."""
    from ..latents import to_pil, to_tensor

    if method not in METHODS:
        raise StablekitError(f"unknown super-resolution method '{method}' (one of {', '.join(METHODS)})")
    check_image(image, scale)
    out, _ = METHODS[method](to_tensor(image.convert("RGB"))[None], seed=seed)
    return to_pil(out)
