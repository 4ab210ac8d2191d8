"""Training recipes for the embedded model's UNet, compared from the same start at the same compute.

A recipe is ``NAME[:k=v,...]`` (:data:`RECIPES`): the shared loop (:mod:`.trainer`'s :func:`fit`, the
teacher's step with a recipe's hooks) trains a fresh UNet on the rendered world, and :func:`.folder.run`
writes a resumable diffusers folder that ``stablekit.load`` opens. ``stablekit train --help`` lists the recipes.

Fine-tuning a model on images with captions (``stablekit finetune``: LoRA or full) is :mod:`.finetune`, its
LoRA files :mod:`.lora_adapter`. Distillation into faster students lives beside them (``stablekit distill``):
:mod:`.students` (the teacher's pairs, the students' loop and folders), :mod:`.instaflow`, :mod:`.dmd2`,
:mod:`.lcm_distill` and :mod:`.guidance_lora`; and compressed UNets (``stablekit compress``): :mod:`.slim_unet`
(a UNet with layers removed), :mod:`.compress` (budgets and retraining by distillation), :mod:`.laptop_diff`,
:mod:`.koala` and :mod:`.ld_pruner`.
"""

from . import corruption, immiscible, plain, rrcm, scalelong, spd, umd  # noqa: F401  (each files its recipe)
from .base import RECIPES, Recipe, train
from .finetune import FinetuneConfig, finetune
from .lora_adapter import LoRAAdapter
from .trainer import TrainConfig, WorldData, build_unet, fit

for _name in (
    "plain",
    "immiscible",
    "scalelong",
    "corruption",
    "spd",
    "umd",
    "rrcm",
):  # listed in this order: the reference first
    RECIPES[_name] = RECIPES.pop(_name)


def recipe(spec: str) -> Recipe:
    """The recipe of ``NAME[:k=v,...]``; a bad name or parameter is one StablekitError line."""
    from ..registry import build

    return build(spec, RECIPES, "recipe")


__all__ = [
    "RECIPES",
    "FinetuneConfig",
    "LoRAAdapter",
    "Recipe",
    "TrainConfig",
    "WorldData",
    "build_unet",
    "finetune",
    "fit",
    "recipe",
    "train",
]
