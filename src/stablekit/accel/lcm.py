"""LCM-LoRA: few-step generation from any SD model with a latent-consistency LoRA.

Luo et al., "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module" (2023). A LoRA distilled with
latent consistency distillation turns a Stable Diffusion model into a latent consistency model, which
samples in 2-8 steps with diffusers' ``LCMScheduler`` and low guidance (1-2; 1 disables classifier-free
guidance and halves the cost).

    with stablekit.use(pipe, LCMLoRA("lcm-lora-sdv1-5.safetensors")):       # or: with lcm(pipe, lora=...):
        image = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).images[0]

Implemented as a plugin on two seams: the scheduler (``LCMScheduler`` built from the pipeline's config) and a
weight edit. The LoRA is loaded by diffusers' ``pipe.load_lora_weights`` (every format diffusers reads:
peft/diffusers or kohya keys, UNet and text-encoder parts), fused with ``lora_scale=weight`` and its
adapter layers removed, so sampling costs what the base model costs. Detaching copies the saved original
weights back (bit for bit, unlike an unfuse, which subtracts the product again) and restores the scheduler.

No LCM-LoRA weights ship with stablekit: pass the published file (e.g. lcm-lora-sdv1-5) or a hub id. A pipeline
that already holds unfused LoRA adapters is refused (fuse them first): dropping the LCM adapter layers after
fusing would drop theirs too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import LCMScheduler

from ..errors import StablekitError
from ..plugins import Plugin, SchedulerPlugin, settle, use
from ..registry import register

ADAPTER = "stablekit-lcm"


@dataclass(frozen=True)
class LCMLoRAConfig:
    """The LoRA (a file or a hub id) and the weight it is fused with."""

    lora: str = ""
    weight: float = 1.0

    def __post_init__(self):
        if not str(self.lora).strip():
            raise StablekitError("LCM-LoRA needs lora=FILE or a hub id")
        settle(self, lora=str(self.lora), weight=float(self.weight))


@register("accel")
class LCMLoRA(Plugin):
    """``LCMScheduler`` plus an LCM-LoRA fused at `weight` while attached."""

    name = "lcm-lora"
    exclusive = SchedulerPlugin.exclusive
    Config = LCMLoRAConfig

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self._saved, self._scheduler = [], SchedulerPlugin(LCMScheduler)

    def attach(self, pipe):
        lora = self.config.lora
        if not hasattr(pipe, "load_lora_weights"):
            raise StablekitError(f"{type(pipe).__name__} cannot load LoRA weights")
        if Path(lora).suffix in (".safetensors", ".bin") and not Path(lora).is_file():
            raise StablekitError(f"LoRA file '{lora}' does not exist")
        if any(pipe.get_list_adapters().values()):
            raise StablekitError("the pipeline already holds LoRA adapters; fuse or unload them before LCM-LoRA")
        try:
            pipe.load_lora_weights(str(lora), adapter_name=ADAPTER)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            pipe.unload_lora_weights()
            raise StablekitError(f"cannot load LoRA '{lora}': {str(e).strip().splitlines()[0]}") from None
        modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
        layers = [m.get_base_layer() for c in modules for m in c.modules() if ADAPTER in getattr(m, "lora_A", {})]
        if not layers:
            pipe.unload_lora_weights()
            raise StablekitError(f"'{lora}' holds no LoRA weights for this pipeline; it was made for another model")
        # the originals, kept on the CPU, come back bit for bit on detach
        self._saved = [(p, p.detach().to("cpu", copy=True)) for m in layers for p in m.parameters(recurse=False)]
        pipe.fuse_lora(lora_scale=self.config.weight, adapter_names=[ADAPTER])
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
        self._scheduler.attach(pipe)

    def detach(self, pipe):
        self._scheduler.detach(pipe)
        with torch.no_grad():
            for p, orig in self._saved:
                p.copy_(orig)
        self._saved = []


def lcm(pipe, lora: str | Path, weight: float = 1.0):
    """Attach :class:`LCMLoRA` to `pipe`; returns the handle (``.remove()`` or use it as a ``with`` block)."""
    return use(pipe, LCMLoRA(lora, weight))
