"""A UNet with layers removed: what the compressed models (LAPTOP-Diff, KOALA, LD-Pruner) share.

A *layer* is one residual block or one transformer block of a down, mid or up block of a diffusers
``UNet2DConditionModel``. Both are residual: a ResNet block returns ``shortcut(x) + branch(x)`` and a transformer
block ``x + branch(x)``. Removing a layer keeps its shortcut and drops its branch: a transformer block and a
ResNet block whose channels do not change become the identity; a ResNet block that changes channels (the first of
a stage, or an up block's, whose input is concatenated with a skip connection) keeps its 1x1 shortcut
convolution. The block structure, the skip connections and every module name stay as they were, so hooks and
plugins that address blocks work on the smaller UNet, and the kept layers' weights keep their names.

:class:`SlimUNet2DConditionModel` is the UNet with the names of its removed layers in its config
(``removed_layers``): a model folder saved with it names this module in ``model_index.json``, so diffusers and
:func:`stablekit.load` rebuild it (the teacher's architecture, then the removals) before loading its weights.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401  (diffusers' loader looks ModelMixin up here)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D

from ..errors import StablekitError


class SkippedResnet(torch.nn.Module):
    """A removed ResNet block: its shortcut only (identity, or its 1x1 convolution where channels change)."""

    def __init__(self, resnet: ResnetBlock2D):
        super().__init__()
        self.conv_shortcut = resnet.conv_shortcut
        self.output_scale_factor = resnet.output_scale_factor

    def forward(self, hidden_states, temb=None, *args, **kwargs):
        x = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states.contiguous())
        return x / self.output_scale_factor


class SkippedTransformer(torch.nn.Module):
    """A removed transformer block: the identity, answering the block's call signature."""

    def forward(self, hidden_states, *args, return_dict: bool = True, **kwargs):
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def removable_layers(unet) -> list[str]:
    """The names of the UNet's removable layers, in the order the forward pass runs them."""
    names = []
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [("mid_block", unet.mid_block)] if unet.mid_block is not None else []
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for prefix, block in blocks:
        resnets = list(getattr(block, "resnets", []))
        attentions = list(getattr(block, "attentions", None) or [])
        if prefix == "mid_block":  # resnet, (attention, resnet)*
            order = [f"{'resnets' if i % 2 == 0 else 'attentions'}.{i // 2}" for i in range(2 * len(resnets) - 1)]
        else:  # (resnet, attention)*
            order = [f"{kind}.{i}" for i in range(len(resnets)) for kind in ("resnets", "attentions")]
            order = [n for n in order if n.startswith("resnets") or int(n.split(".")[1]) < len(attentions)]
        names += [f"{prefix}.{n}" for n in order]
    return names


def remove_layers(unet, names) -> None:
    """Replace the named layers of `unet` (in place) by their shortcuts; a name that is not removable is an error."""
    allowed = set(removable_layers(unet))
    for name in names:
        if name not in allowed:
            raise StablekitError(f"'{name}' is not a removable layer of this UNet (one of: {', '.join(allowed)})")
        module = unet.get_submodule(name)
        if isinstance(module, (SkippedResnet, SkippedTransformer)):
            continue
        parent_name, _, index = name.rpartition(".")
        skip = SkippedResnet(module) if isinstance(module, ResnetBlock2D) else SkippedTransformer()
        unet.get_submodule(parent_name)[int(index)] = skip


def removed(unet) -> list[str]:
    """The names of the layers of `unet` that are removed."""
    kinds = (SkippedResnet, SkippedTransformer)
    return [n for n in removable_layers(unet) if isinstance(unet.get_submodule(n), kinds)]


class SlimUNet2DConditionModel(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` without the layers named in its config's ``removed_layers``."""

    def __init__(self, *args, removed_layers: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        remove_layers(self, removed_layers)
        self.register_to_config(removed_layers=list(removed_layers))

    @classmethod
    def from_unet(cls, unet, names) -> SlimUNet2DConditionModel:
        """A slim copy of `unet` without the layers `names`, every kept weight copied (the pruned model's start)."""
        config = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != "removed_layers"}
        slim = cls(**config, removed_layers=tuple(sorted(set(names) | set(removed(unet)))))
        missing = slim.load_state_dict(unet.state_dict(), strict=False).missing_keys
        if missing:
            raise StablekitError(f"the UNet lacks weights the slim copy needs: {', '.join(missing[:3])} ...")
        return slim.to(unet.device)


_PARENT = inspect.signature(UNet2DConditionModel.__init__)
SlimUNet2DConditionModel.__init__.__signature__ = _PARENT.replace(  # diffusers reads a model's config keys from it
    parameters=[
        *_PARENT.parameters.values(),
        inspect.Parameter("removed_layers", inspect.Parameter.KEYWORD_ONLY, default=()),
    ]
)


def parameters(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


__all__ = ["SlimUNet2DConditionModel", "parameters", "remove_layers", "removable_layers", "removed"]
