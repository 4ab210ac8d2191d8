"""Asymmetric decoder: a VAE decoder that also sees the masked input image, so edits keep the unedited pixels.

Paper: "Designing a Better Asymmetric VQGAN for StableDiffusion" (Zhu et al., 2023; reference code
github.com/buxiangzhiren/Asymmetric_VQGAN).

Implemented: the encoder is kept; a new, heavier decoder replaces the VAE's decoder. Its **conditional branch**
encodes the known pixels -- the input image with the region to regenerate zeroed, ``(1 - mask) * image`` -- into
one feature map per decoder stage (the input of every up block, at that block's resolution and width, and the
full-resolution features that enter the output convolution). Each is injected by the paper's **mask-guided blend**:
``h = h * m + c * (1 - m)`` with ``m`` the mask at that resolution (1: regenerate, 0: known), so the decoder draws
the edited region from the latent and everything else from the image itself. With the mask all ones the branch
is unused and the decoder is a plain (text-to-image) decoder. Only the decoder is trained, the encoder frozen,
on world renders with random masks (:mod:`.asymmetric_decoder_train`).

Mask convention: ``mask`` is 1 (white) where the image may change -- the edited or inpainted region -- and 0
where the input image's pixels are to be kept.

Paper defaults: the SD decoder widened/deepened ("base" and "large"), a conditional branch of strided
convolutions, L1 + LPIPS + adversarial losses, masks from LaMa's generator plus full masks, encoder frozen.

Deviations:
1. "Heavier" is one extra residual block per up stage (same widths) plus the conditional branch; the decoder
   starts from the VAE decoder's weights (the extra blocks start as identities), not from scratch, so it
   trains in minutes on a CPU.
2. The conditional branch also receives the mask as a fourth channel (a zeroed pixel and a black pixel are
   otherwise indistinguishable), and each stage is a convolution pair, not one convolution.
3. The mask is reduced to each stage's resolution by max-pooling (a cell is "known" only if all its pixels
   are), not nearest-neighbour sampling, so no edited pixel is ever taken from the image.
4. Losses: L1 + MSE on pixels (as the embedded VAE itself was trained), no LPIPS (no pretrained network is
   available offline) and no adversarial term.
5. Masks: boxes, brush strokes, the world's object masks (dilated), and all-ones / all-zeros masks.
6. The full-resolution blend comes after the output normalisation and activation, not before them: that
   GroupNorm normalises each channel over the whole image, which erases the absolute colours the conditional
   features carry; placed after it, the known pixels reach the output convolution unnormalised.
7. For edits by prompts without a mask, the region to regenerate is found from the latents
   (:func:`edit_mask`): where the target branch differs from the source branch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder

from ..errors import StablekitError
from ..latents import load_image, to_pil

WEIGHTS = Path(__file__).parent / "weights" / "asymmetric_decoder.safetensors"
DECODERS = ("vae", "asymmetric")


class ConditionEncoder(nn.Module):
    """The conditional branch: (masked image, mask) -> one feature map per blend point, finest first."""

    def __init__(self, widths: list[int]):
        super().__init__()
        # widths[0]: full-resolution features before the output convolution; widths[1]: the last up block's
        # input (full resolution); widths[2:]: earlier up blocks' inputs, each at half the previous resolution
        stages, cin = [], 4
        for k, w in enumerate(widths):
            stride = 2 if k >= 2 else 1
            first = nn.Conv2d(cin, w, 4 if stride == 2 else 3, stride, 1)
            stages.append(nn.Sequential(first, nn.SiLU(), nn.Conv2d(w, w, 3, 1, 1)))
            cin = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
            x = F.silu(x)
        return out


class AsymmetricDecoder(nn.Module):
    """``post_quant_conv`` + a diffusers :class:`Decoder` one block deeper per stage + :class:`ConditionEncoder`,
    built for an ``AutoencoderKL`` config `vae_config`; ``forward(z, image, mask)`` with `z` the unscaled latent,
    `image` (B, 3, H, W) in [-1, 1] and `mask` (B, 1, H, W), 1 where the output is generated."""

    def __init__(self, vae_config: dict):
        super().__init__()
        self.vae_config = {k: v for k, v in dict(vae_config).items() if not k.startswith("_")}
        c = self.vae_config
        latent = c["latent_channels"]
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if c.get("use_post_quant_conv", True) else nn.Identity()
        self.decoder = Decoder(
            in_channels=latent,
            out_channels=c["out_channels"],
            up_block_types=tuple(c["up_block_types"]),
            block_out_channels=tuple(c["block_out_channels"]),
            layers_per_block=c["layers_per_block"] + 1,
            norm_num_groups=c["norm_num_groups"],
            act_fn=c["act_fn"],
            mid_block_add_attention=c.get("mid_block_add_attention", True),
        )
        rev = list(reversed(c["block_out_channels"]))
        inputs = [rev[0]] + rev[:-1]  # width of each up block's input, coarsest first
        self.cond = ConditionEncoder([rev[-1], *reversed(inputs)])

    @classmethod
    def from_vae(cls, vae) -> AsymmetricDecoder:
        """A decoder initialised from `vae`'s: shared layers copied, each extra residual block an identity."""
        model = cls(vae.config)
        model.post_quant_conv.load_state_dict(vae.post_quant_conv.state_dict())
        missing = model.decoder.load_state_dict(vae.decoder.state_dict(), strict=False).missing_keys
        extra = len(model.decoder.up_blocks[0].resnets) - 1
        for block in model.decoder.up_blocks:
            nn.init.zeros_(block.resnets[extra].conv2.weight)
            nn.init.zeros_(block.resnets[extra].conv2.bias)
        if any(f"resnets.{extra}." not in k for k in missing):
            raise StablekitError("the VAE's decoder does not fit the asymmetric decoder built from its config")
        return model

    def forward(self, z: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        feats = self.cond(torch.cat([image * (1 - mask), mask], 1))
        h = d.mid_block(d.conv_in(self.post_quant_conv(z)), None)
        for block, c in zip(d.up_blocks, reversed(feats[1:]), strict=True):
            h = blend(h, c, mask)
            h = block(h, None)
        h = blend(d.conv_act(d.conv_norm_out(h)), feats[0], mask)
        return d.conv_out(h)


def blend(h: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask-guided blend: `h` where the mask (max-pooled to h's size) is 1, the condition `c` elsewhere."""
    m = F.adaptive_max_pool2d(mask, h.shape[-2:]) if mask.shape[-2:] != h.shape[-2:] else mask
    return h * m + c * (1 - m)


_LOADED: dict[str, AsymmetricDecoder] = {}


def load_decoder(pipe, path: str | Path = WEIGHTS) -> AsymmetricDecoder:
    """The trained asymmetric decoder at `path` (default: the one shipped for the embedded model), checked
    against `pipe`'s VAE; cached per path and moved to the pipeline's device."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise StablekitError(f"no asymmetric decoder at '{path}'; train one with python -m {__name__}_train")
    if str(path) not in _LOADED:
        recipe = json.loads(path.with_suffix(".json").read_text())
        model = AsymmetricDecoder(recipe["vae_config"])
        model.load_state_dict(load_file(str(path)))
        _LOADED[str(path)] = model.eval().requires_grad_(False)
    model = _LOADED[str(path)]
    mine = {k: v for k, v in pipe.vae.config.items() if not k.startswith("_") and k in model.vae_config}
    if any(model.vae_config[k] != v for k, v in mine.items() if k != "scaling_factor"):
        raise StablekitError(
            f"the asymmetric decoder at '{path}' was trained for another VAE; train one for this model's VAE"
        )
    return model.to(pipe._execution_device)


def pixel_mask(mask, size) -> torch.Tensor:
    """`mask` (H x W array or tensor in [0, 1], a PIL image, or (1, 1, H, W)) as a (1, 1, H, W) float tensor,
    1 where the output may change; a one-line error when its size is not `size` (H, W)."""
    import numpy as np
    from PIL import Image

    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255
    m = torch.as_tensor(mask, dtype=torch.float32).detach().cpu()
    m = m.reshape(m.shape[-2:]) if m.ndim == 4 and m.shape[:2] == (1, 1) else m
    if m.ndim != 2 or tuple(m.shape) != tuple(size):
        got = "x".join(str(s) for s in reversed(m.shape))
        raise StablekitError(f"the mask is {got}; it must be the image's size, {size[1]}x{size[0]}")
    return (m > 0.5).float()[None, None]


@torch.no_grad()
def decode_keeping(pipe, latents: torch.Tensor, image, mask, output_type: str = "pil", path: str | Path = WEIGHTS):
    """Decode scaled `latents` (1, C, h, w) with the asymmetric decoder, keeping `image` (path, PIL image or
    (3, H, W) tensor in [0, 1]) where `mask` is 0; a PIL image, or a (3, H, W) tensor in [0, 1] with "pt"."""
    x = load_image(pipe, image)
    f = pipe.vae_scale_factor
    if tuple(latents.shape[-2:]) != (x.shape[-2] // f, x.shape[-1] // f):
        raise StablekitError(
            f"the latents ({latents.shape[-1]}x{latents.shape[-2]}) do not fit the {x.shape[-1]}x{x.shape[-2]} image"
        )
    m = pixel_mask(mask, x.shape[-2:]).to(x)
    model = load_decoder(pipe, path)
    z = latents.to(x) / pipe.vae.config.scaling_factor
    out = ((model(z, x, m).float() + 1) / 2).clamp(0, 1)[0].cpu()
    return out if output_type == "pt" else to_pil(out)


AUTO_THRESHOLD = 0.3  # a latent cell is edited where the branches differ by this fraction of the largest difference


def edit_mask(z_source: torch.Tensor, z_target: torch.Tensor, factor: int) -> torch.Tensor:
    """The region an edit changed, from the source and target branches' final latents (C, h, w): the cells whose
    RMS difference exceeds :data:`AUTO_THRESHOLD` of the largest, grown by one cell, at pixel resolution
    (1, 1, H, W)."""
    d = (z_target.float() - z_source.float()).pow(2).mean(0).sqrt()
    cells = (d > AUTO_THRESHOLD * d.max().clamp_min(1e-8)).float()[None, None]
    cells = F.max_pool2d(cells, 3, 1, 1)
    return F.interpolate(cells, scale_factor=factor, mode="nearest")


def check_decoder(pipe, decoder: str, mask, images: list | None) -> None:
    """One-line errors for an unknown `decoder`, a mask without the asymmetric decoder, no source `images`, or a
    mask not of the images' size."""
    if decoder not in DECODERS:
        raise StablekitError(f"unknown decoder '{decoder}'; choose one of: {', '.join(DECODERS)}")
    if decoder == "vae" and mask is not None:
        raise StablekitError("a mask of the region to keep needs the asymmetric decoder (decoder='asymmetric')")
    if decoder == "asymmetric" and images is None:
        raise StablekitError(
            "the asymmetric decoder needs the source image's pixels: pass the image, not an Inversion"
        )
    if mask is not None:
        pixel_mask(mask, load_image(pipe, images[0]).shape[-2:])


def decode_edits(pipe, z_sources: torch.Tensor, z_targets: torch.Tensor, images: list, mask=None) -> list:
    """Each target latent decoded by the asymmetric decoder, keeping its source image outside `mask` (one mask for
    every image; by default :func:`edit_mask` of each source/target pair); a list of PIL images."""
    out = []
    for zs, zt, image in zip(z_sources, z_targets, images, strict=True):
        m = edit_mask(zs, zt, pipe.vae_scale_factor) if mask is None else mask
        out.append(decode_keeping(pipe, zt[None], image, m))
    return out
