"""ScaleLong: the UNet's long skip connections scaled by smaller coefficients, for more stable training.

Paper: "ScaleLong: Towards More Stable Training of Diffusion Model via Scaling Network Long Skip Connection"
(Huang et al., NeurIPS 2023), reference code https://github.com/sail-sg/ScaleLong. The i-th long skip, counted
from the input side (i = 0 the outermost), enters the decoder multiplied by ``kappa ** i`` (the constant scheme,
CS), so deeper skips are damped most; the paper suggests kappa in [0.5, 0.95] and its code defaults to 0.5.
The learnable scheme (LS) learns the coefficients. Here the scaling is a forward pre-hook on each up block that
multiplies the skip tensors it receives (``res_hidden_states_tuple``); the UNet's weights are untouched.

Defaults: scheme "constant", kappa = 0.5.

Deviations:
  1. the learnable scheme learns one scalar per skip, initialised at the constant scheme's ``kappa ** i``; the
     paper's LS computes the coefficients from the skip features with a small squeeze-and-excitation network;
  2. the exported diffusers folder holds the UNet without the hooks and the coefficients in ``skip_scales.json``;
     ``stablekit.load`` puts them back (:func:`install`), reading the recipe the folder records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..errors import StablekitError
from .base import Recipe, register

SCALES_FILE = "skip_scales.json"


def skip_count(unet) -> int:
    """How many long skip tensors the UNet's down path hands to its up path."""
    return 1 + sum(len(b.resnets) + (1 if b.downsamplers else 0) for b in unet.down_blocks)


class SkipScales(torch.nn.Module):
    """One coefficient per long skip (index 0: the outermost), applied by hooks on the up blocks."""

    def __init__(self, scales: torch.Tensor, learnable: bool):
        super().__init__()
        self.scales = torch.nn.Parameter(scales.float(), requires_grad=learnable)

    def attach(self, unet) -> list:
        """Hook every up block of `unet`; returns the hook handles. The up blocks take the skips from the deepest
        outwards, each block the last ``len(resnets)`` of those left."""
        handles, end = [], skip_count(unet)
        for block in unet.up_blocks:
            start = end - len(block.resnets)
            handles.append(block.register_forward_pre_hook(self._hook(start, end), with_kwargs=True))
            end = start
        return handles

    def _hook(self, start: int, end: int):
        def scale(module, args, kwargs):
            skips = kwargs["res_hidden_states_tuple"]
            coef = self.scales[start:end].to(skips[0])
            kwargs["res_hidden_states_tuple"] = tuple(s * c for s, c in zip(skips, coef, strict=True))
            return args, kwargs

        return scale


def install(unet, folder: str | Path) -> list:
    """Put a ScaleLong model's skip coefficients (``folder/skip_scales.json``) back on `unet`; the hook handles."""
    scales = torch.tensor(json.loads((Path(folder) / SCALES_FILE).read_text()))
    return SkipScales(scales, learnable=False).attach(unet)


@register
class ScaleLong(Recipe):
    name = "scalelong"
    paper = (
        "ScaleLong: Towards More Stable Training of Diffusion Model via Scaling Network Long Skip Connection (2023)"
    )

    @dataclass(frozen=True)
    class Config:
        kappa: float = 0.5
        scheme: Literal["constant", "learned"] = "constant"

        def __post_init__(self):
            if not 0 < self.kappa <= 1:
                raise StablekitError(f"kappa={self.kappa}: need 0 < kappa <= 1")
            if self.scheme not in ("constant", "learned"):
                raise StablekitError(f"scheme '{self.scheme}': choose constant or learned")

    def prepare(self, unet):
        n = skip_count(unet)
        init = self.config.kappa ** torch.arange(n, dtype=torch.float64)
        self.module = SkipScales(init, learnable=self.config.scheme == "learned")
        self.module.attach(unet)
        return self.module

    def for_inference(self, unet) -> None:
        SkipScales(self.module.scales.detach().clone(), learnable=False).attach(unet)

    def restore(self, pipe, folder: Path) -> None:
        install(pipe.unet, folder)

    def export(self, out: Path) -> None:
        (out / SCALES_FILE).write_text(json.dumps([float(s) for s in self.module.scales]))
