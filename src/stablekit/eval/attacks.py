"""Image attacks on watermarks and detectors, each ``attack(images, strength, **ctx) -> images``.

`images` is a list of PIL images; the output has the same length and sizes. `strength` is in the
attack's natural unit (below); attacks that need a model take it from `ctx` (``pipe=...``) and
ignore context they do not use, so a harness can pass the same context to all of them.
:data:`ATTACKS` maps each name to ``(function, default strength grid)``, weakest first.

* ``jpeg``: JPEG quality (90 -> 10);
* ``resized_crop``: kept fraction of the area (1 -> 0.5), at a random position (``seed``),
  resized back to the original size;
* ``rotation``: degrees (0 -> 45), corners filled black;
* ``blur``: Gaussian blur, standard deviation in pixels;
* ``noise``: additive Gaussian noise, standard deviation on the [0, 1] pixel scale (``seed``);
* ``brightness`` / ``contrast``: enhancement factor (1 is the identity);
* ``combination``: all of the above at once, scaled by strength in [0, 1];
* ``vae_regeneration``: number of encode/decode round trips through ``pipe``'s VAE;
* ``purification``: diffusion purification (SDEdit) with ``pipe`` at img2img strength 0.1 -> 0.5,
  empty prompt, no guidance, ``steps`` ("Robustness of AI-Image Detectors: Fundamental Limits and Practical
  Attacks", 2024);
* ``imprint``: spoofing by noise reuse (SEAL's attack (i), that paper's spoofing): DDIM-invert a ``marked``
  image and each input image (``prompt``, no guidance), mix their noises with weight `strength` for
  the marked one (``sqrt(1 - s) z + sqrt(s) z_marked``) and regenerate with ``prompt``. At 1 the
  marked noise is reused whole for the input's prompt; at 0 the input is only reconstructed;
* ``averaging``: adds `strength` times the pattern estimated by averaging many ``marked`` images
  (their mean minus the mean of ``clean`` reference images, or minus its own per-channel mean);
  positive strength spoofs, negative removes ("Can Simple Averaging Defeat Modern Watermarks?",
  Yang et al., NeurIPS 2024);
* ``surrogate_pgd``: model substitution ("Robustness of AI-Image Detectors: Fundamental Limits and Practical
  Attacks", 2024): the attacker trains a surrogate classifier (:func:`train_surrogate`: a small CNN, marked
  vs clean images of their own) and runs ``iters`` steps of L-infinity PGD of radius `strength` (pixels in
  [0, 1], step 2.5 x radius / iters) that lower the surrogate's "marked" logit; the perturbation transfers
  to the real detector. Give ``surrogate=`` or the ``marked=[...]`` and ``clean=[...]`` to train one. The
  paper's surrogate is a ResNet-18 trained on thousands of images; here a 4-layer CNN.
"""

from __future__ import annotations

import io
import math
import random

import torch
from PIL import Image, ImageEnhance, ImageFilter

from ..errors import StablekitError
from ..latents import to_pil, to_tensor


def jpeg(images, strength, **_):
    out = []
    for im in images:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=int(strength))
        out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def resized_crop(images, strength, seed: int = 0, **_):
    rng, out = random.Random(seed), []
    for im in images:
        w, h = im.size
        cw, ch = max(1, round(w * math.sqrt(strength))), max(1, round(h * math.sqrt(strength)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out.append(im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC))
    return out


def rotation(images, strength, **_):
    return [im.rotate(float(strength), resample=Image.Resampling.BICUBIC) for im in images]


def blur(images, strength, **_):
    return [im.filter(ImageFilter.GaussianBlur(radius=float(strength))) for im in images]


def noise(images, strength, seed: int = 0, **_):
    g = torch.Generator().manual_seed(int(seed))
    return [to_pil(x + float(strength) * torch.randn(x.shape, generator=g)) for x in map(to_tensor, images)]


def brightness(images, strength, **_):
    return [ImageEnhance.Brightness(im).enhance(float(strength)) for im in images]


def contrast(images, strength, **_):
    return [ImageEnhance.Contrast(im).enhance(float(strength)) for im in images]


def combination(images, strength, seed: int = 0, **_):
    s = float(strength)
    images = resized_crop(rotation(images, 10 * s), 1 - 0.25 * s, seed=seed)
    images = brightness(contrast(blur(images, 1.0 * s), 1 + 0.5 * s), 1 + 0.5 * s)
    return jpeg(noise(images, 0.05 * s, seed=seed), round(90 - 60 * s))


def _pipe(ctx: dict, attack: str):
    if ctx.get("pipe") is None:
        raise StablekitError(f"the {attack} attack needs a pipeline: pass pipe=...")
    return ctx["pipe"]


def vae_regeneration(images, strength, **ctx):
    from ..latents import decode, encode_image, load_image

    pipe, out = _pipe(ctx, "vae_regeneration"), list(images)
    for _ in range(int(strength)):
        out = [decode(pipe, encode_image(pipe, load_image(pipe, im))) for im in out]
    return out


def purification(images, strength, steps: int = 50, seed: int = 0, **ctx):
    from diffusers import AutoPipelineForImage2Image

    if int(steps * strength) < 1:
        raise StablekitError(
            f"purification at strength {strength} with {steps} steps runs no denoising step; use more steps"
        )
    img2img = AutoPipelineForImage2Image.from_pipe(_pipe(ctx, "purification"))
    img2img.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    return [
        img2img(
            "",
            image=im.convert("RGB"),
            strength=float(strength),
            num_inference_steps=steps,
            guidance_scale=1.0,
            generator=g,
            height=im.height,
            width=im.width,
        ).images[0]
        for im in images
    ]


def imprint(images, strength, marked=None, prompt: str = "", steps: int = 50, **ctx):
    from ..edit import invert
    from ..latents import decode

    pipe = _pipe(ctx, "imprint")
    if marked is None:
        raise StablekitError("the imprint attack needs a watermarked image: pass marked=...")
    s, z_marked, out = float(strength), invert(pipe, marked, prompt, "ddim", steps, 1.0).latents[0], []
    for im in images:
        z = invert(pipe, im, prompt, "ddim", steps, 1.0).latents[0]
        z = math.sqrt(1 - s) * z + math.sqrt(s) * z_marked
        lat = pipe(
            prompt,
            latents=z.to(pipe.unet.dtype),
            num_inference_steps=steps,
            guidance_scale=1.0,
            height=im.height,
            width=im.width,
            output_type="latent",
        ).images
        out.append(decode(pipe, lat))
    return out


def averaging(images, strength, marked=None, clean=None, **_):
    if not marked:
        raise StablekitError("the averaging attack needs watermarked images: pass marked=[...]")
    mean = torch.stack([to_tensor(im) for im in marked]).mean(0)
    ref = torch.stack([to_tensor(im) for im in clean]).mean(0) if clean else mean.mean((1, 2), keepdim=True)
    pattern = mean - ref
    out = []
    for im in images:
        x = to_tensor(im)
        if x.shape != pattern.shape:
            raise StablekitError(
                f"averaging: image is {im.width}x{im.height} but the marked images are "
                f"{pattern.shape[2]}x{pattern.shape[1]}"
            )
        out.append(to_pil(x + float(strength) * pattern))
    return out


def train_surrogate(marked, clean, iters: int = 300, batch: int = 32, lr: float = 2e-3, seed: int = 0):
    """The attacker's substitute detector: a small CNN, images (B, 3, H, W) in [0, 1] -> logit (marked > 0),
    trained with binary cross-entropy on `marked` and `clean` PIL images (random flips)."""
    from torch import nn

    torch.manual_seed(seed)
    x = torch.stack([to_tensor(im) for im in [*marked, *clean]])
    y = torch.cat([torch.ones(len(marked)), torch.zeros(len(clean))])
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1),
        nn.SiLU(),
        nn.Conv2d(32, 64, 4, 2, 1),
        nn.SiLU(),
        nn.Conv2d(64, 64, 4, 2, 1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 1),
        nn.Flatten(0),
    )
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(iters):
        i = torch.randint(0, len(x), (min(batch, len(x)),))
        xb = torch.where(torch.rand(len(i))[:, None, None, None] < 0.5, x[i].flip(-1), x[i])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xb * 2 - 1), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda v: net(v * 2 - 1)


def surrogate_pgd(images, strength, surrogate=None, marked=None, clean=None, iters: int = 20, **_):
    if surrogate is None:
        if not marked or not clean:
            raise StablekitError("the surrogate_pgd attack needs surrogate=... or marked=[...] and clean=[...]")
        surrogate = train_surrogate(marked, clean)
    eps = float(strength)
    x0 = torch.stack([to_tensor(im) for im in images])
    x = x0.clone()
    for _ in range(int(iters)):
        x.requires_grad_(True)
        grad = torch.autograd.grad(surrogate(x).sum(), x)[0]
        with torch.no_grad():
            x = x - 2.5 * eps / iters * grad.sign()
            x = (x0 + (x - x0).clamp(-eps, eps)).clamp(0, 1)
    return [to_pil(v) for v in x.detach()]


ATTACKS = {
    "jpeg": (jpeg, (90, 70, 50, 30, 10)),
    "resized_crop": (resized_crop, (0.9, 0.75, 0.6, 0.5)),
    "rotation": (rotation, (5, 15, 30, 45)),
    "blur": (blur, (0.5, 1.0, 2.0, 4.0)),
    "noise": (noise, (0.02, 0.05, 0.1, 0.2)),
    "brightness": (brightness, (1.2, 1.5, 2.0)),
    "contrast": (contrast, (1.2, 1.5, 2.0)),
    "combination": (combination, (0.25, 0.5, 1.0)),
    "vae_regeneration": (vae_regeneration, (1, 2, 4)),
    "purification": (purification, (0.1, 0.2, 0.3, 0.5)),
    "imprint": (imprint, (0.5, 1.0)),
    "averaging": (averaging, (0.5, 1.0, 2.0)),
    "surrogate_pgd": (surrogate_pgd, (2 / 255, 4 / 255, 8 / 255, 16 / 255)),
}
