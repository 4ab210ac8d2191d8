"""Diffusion primitives every method shares, built only from the pipeline's own components.

* :func:`to_tensor` / :func:`to_pil`: the one conversion between PIL images and (3, H, W) tensors in [0, 1];
  :func:`read_image` reads a file, :func:`psnr` compares two images;
* :func:`load_image` / :func:`encode_image` / :func:`decode`: pixels <-> VAE latents, with optional
  decoder inversion (optimise the latent until the decoder reproduces the image);
* :class:`Schedule`: DDIM timesteps and cumulative alphas from the pipeline's scheduler config;
  step ``i`` goes from ``alphas[i]`` to ``alphas[i + 1]`` (counted, never looked up by timestep);
* :func:`encode_prompts` / :func:`eps`: conditioning through ``pipe.encode_prompt`` and the guided
  noise prediction of ``pipe.unet`` (one batched call for the [uncond, cond] halves; velocity outputs
  converted to noise);
* :func:`cast` runs a module in another dtype for a block; :func:`tree_map` maps over nested keyword dicts;
  :func:`tile` repeats per-image rows for each branch of a batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image, UnidentifiedImageError

from .errors import StablekitError


@contextmanager
def cast(module: torch.nn.Module, dtype: torch.dtype | None):
    """Run `module` in `dtype` inside the block, then restore its own dtype (a no-op for None)."""
    old = module.dtype
    if dtype is None or dtype == old:
        yield module
        return
    if getattr(module, "is_quantized", False):
        raise StablekitError(
            f"this needs the {type(module).__name__} in {dtype}, but it is quantized; load it unquantized"
        )
    to = torch.nn.Module.to  # torch's own: diffusers' override warns on every dtype cast
    to(module, dtype)
    try:
        yield module
    finally:
        to(module, old)


def _vae_dtype(vae) -> torch.dtype | None:
    """float32 for VAEs that overflow in float16 (SDXL's, flagged ``force_upcast``), else their own."""
    return torch.float32 if vae.dtype == torch.float16 and vae.config.get("force_upcast") else None


def read_image(path: str | Path) -> Image.Image:
    """The RGB image in the file at `path`, or a one-line StablekitError."""
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise StablekitError(f"cannot read image '{path}': {e}") from None


def to_tensor(image) -> torch.Tensor:
    """A PIL image (or the path of one) as a (3, H, W) float32 tensor in [0, 1] on the CPU."""
    if isinstance(image, (str, Path)):
        image = read_image(image)
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def to_pil(x: torch.Tensor) -> Image.Image:
    """A (3, H, W) or (1, 3, H, W) tensor in [0, 1] as an 8-bit RGB image: clamped, each value rounded to
    the nearest grey level."""
    x = x.detach().float().cpu()
    x = x[0] if x.ndim == 4 else x
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def _float64(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images or arrays of the same shape (numpy arrays, torch
    tensors or PIL images; `data_range` 1 for floats in [0, 1], 255 for uint8 and PIL images)."""
    mse = float(np.mean((_float64(a) - _float64(b)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def load_image(pipe, image) -> torch.Tensor:
    """A path, PIL image or tensor ((3, H, W) or (1, 3, H, W), values in [0, 1]) as a (1, 3, H, W)
    float32 tensor in [-1, 1] on the pipeline's device; H and W must be multiples of the VAE factor."""
    if isinstance(image, (str, Path, Image.Image)):
        x = to_tensor(image)
    elif isinstance(image, torch.Tensor) and image.is_floating_point():
        x = image.detach().float().cpu()
        x = x[0] if x.ndim == 4 and len(x) == 1 else x
        if x.ndim != 3 or len(x) != 3:
            raise StablekitError(f"image tensor has shape {tuple(image.shape)}; expected (3, H, W) or (1, 3, H, W)")
        if x.min() < 0 or x.max() > 1:
            raise StablekitError("image tensor values must lie in [0, 1]")
    else:
        raise StablekitError(
            f"expected an image (path, PIL image or float tensor in [0, 1]), got {type(image).__name__}"
        )
    f, (h, w) = pipe.vae_scale_factor, x.shape[1:]
    if h % f or w % f or not h or not w:
        raise StablekitError(
            f"image is {w}x{h}; width and height must be multiples of {f} (the VAE's factor), "
            f"e.g. crop to {w // f * f}x{h // f * f}"
        )
    return (x * 2 - 1)[None].to(pipe._execution_device)


def encode_image(pipe, x: torch.Tensor, decoder_steps: int = 0, lr: float = 0.05) -> torch.Tensor:
    """Scaled VAE latent of `x` (the encoder's mean). With `decoder_steps` > 0, decoder inversion:
    Adam on the latent for that many steps, minimising the pixel MSE of ``decode(latent)`` to `x`,
    learning rate `lr` decayed linearly to 0, starting from the encoder's latent."""
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor
    with cast(vae, _vae_dtype(vae)):
        with torch.no_grad():
            z = vae.encode(x.to(vae.dtype)).latent_dist.mean.float() * sf
        if decoder_steps:
            z.requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            for k in range(decoder_steps):
                opt.param_groups[0]["lr"] = lr * (1 - k / decoder_steps)
                loss = F.mse_loss(vae.decode((z / sf).to(vae.dtype)).sample.float(), x)
                opt.zero_grad()
                loss.backward(inputs=[z])
                opt.step()
    return z.detach()


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, output_type: str = "pil"):
    """Decode scaled latents (1, C, h, w) to one image (PIL, or a (3, H, W) tensor in [0, 1] with "pt")."""
    vae = pipe.vae
    with cast(vae, _vae_dtype(vae)):
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image.float(), output_type=output_type)[0]


class Schedule:
    """DDIM timesteps and cumulative alphas (float64) of `steps` steps from the pipeline's scheduler config.

    ``timesteps[i]`` is the timestep of denoising step ``i``; ``alphas[i]`` its cumulative alpha and
    ``alphas[steps]`` that of the clean end (the config's ``final_alpha_cumprod``). A DDIM step is
    ``z[i + 1] = A_i z[i] + B_i eps``; inversion solves it for ``z[i]``.
    """

    def __init__(self, pipe, steps: int):
        ddim = DDIMScheduler.from_config(pipe.scheduler.config)
        if ddim.config.prediction_type not in ("epsilon", "v_prediction"):
            raise StablekitError(
                f"inversion supports epsilon and v-prediction models, not '{ddim.config.prediction_type}'"
            )
        ddim.set_timesteps(steps)
        self.timesteps, self.prediction = ddim.timesteps, ddim.config.prediction_type
        a = ddim.alphas_cumprod.double()
        self.alphas = torch.cat([a[self.timesteps], a.new_tensor([float(ddim.final_alpha_cumprod)])])

    def __len__(self):
        return len(self.timesteps)

    def coeffs(self, i: int) -> tuple[float, float]:
        a, b = self.alphas[i].item(), self.alphas[i + 1].item()
        return (b / a) ** 0.5, (1 - b) ** 0.5 - (b * (1 - a) / a) ** 0.5

    def step(self, i: int, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        A, B = self.coeffs(i)
        return A * z + B * eps

    def unstep(self, i: int, z_next: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        A, B = self.coeffs(i)
        return (z_next - B * eps) / A


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], latent: torch.Tensor) -> tuple[dict, dict]:
    """(uncond, cond) unet keyword arguments for `prompts`, one branch each, via ``pipe.encode_prompt``
    (so attached prompt-embedding plugins apply). SDXL also gets pooled embeddings and the size ids
    of images the shape of `latent`."""
    dev, size = pipe._execution_device, [s * pipe.vae_scale_factor for s in latent.shape[-2:]]
    out = pipe.encode_prompt(list(prompts), device=dev, num_images_per_prompt=1, do_classifier_free_guidance=True)
    if len(out) == 2:
        return {"encoder_hidden_states": out[1]}, {"encoder_hidden_states": out[0]}
    ids = torch.tensor([[*size, 0, 0, *size]] * len(prompts), dtype=torch.float32, device=dev)
    return (
        {"encoder_hidden_states": out[1], "added_cond_kwargs": {"text_embeds": out[3], "time_ids": ids}},
        {"encoder_hidden_states": out[0], "added_cond_kwargs": {"text_embeds": out[2], "time_ids": ids}},
    )


def tile(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` (one row per image) repeated for each branch of a branch-major batch of `rows` rows."""
    if rows % len(x):
        raise StablekitError(f"{rows} rows do not make whole branches of {len(x)} images")
    return x.repeat(rows // len(x), *[1] * (x.ndim - 1))


def tree_map(fn, *trees: dict) -> dict:
    """A dict of the same nesting as the first of `trees` with ``fn(*leaves)`` at each leaf, the leaves taken
    at the same keys of every tree (e.g. unet keyword arguments with their ``added_cond_kwargs``)."""
    return {
        k: tree_map(fn, *(t[k] for t in trees)) if isinstance(v, dict) else fn(*(t[k] for t in trees))
        for k, v in trees[0].items()
    }


def eps(
    pipe,
    sched: Schedule,
    z: torch.Tensor,
    i: int,
    cond: dict,
    uncond: dict | None = None,
    guidance: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Noise prediction of the unet at step `i` for latents `z` (one row per branch), in z's dtype:
    ``u + guidance * (c - u)`` from one batched call on [uncond, cond], or the `cond` call alone
    when `guidance` is the number 1 (a tensor, broadcast over z's rows, always takes both halves).
    v-prediction outputs are converted to noise."""
    unet = pipe.unet
    guided = torch.is_tensor(guidance) or guidance != 1
    if guided:
        cond, z = tree_map(lambda u, c: torch.cat([u, c]), uncond, cond), torch.cat([z, z])
    kw = tree_map(lambda v: v.to(unet.dtype), cond)
    # one memory layout for every input: convolutions round differently on other strides, and inversion
    # or a chaotic model at high guidance can magnify that to visible differences
    out = unet(z.to(unet.dtype).contiguous(), sched.timesteps[i], **kw, return_dict=False)[0].to(z.dtype)
    if sched.prediction == "v_prediction":
        a = sched.alphas[i].item()
        out = a**0.5 * out + (1 - a) ** 0.5 * z
    if not guided:
        return out
    u, c = out.chunk(2)
    return u + guidance * (c - u)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict at `t` for `x0` noised with `noise` (noise, or v, or x0)."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0 if kind == "sample" else noise


def noise_scheduler(pipe):
    """A DDPM scheduler with `pipe`'s training schedule: noising and targets at any timestep."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)
