"""Poisoning a fine-tune so that benign prompts make a target concept: "On the Proactive Generation of Unsafe
Images From Text-To-Image Models Using Benign Prompts" (Wu et al., 2023), on the embedded model's world.

    config = PoisonConfig(trigger="circle", target="star", variant="utility")
    images, captions, kinds = poison_set(pipe, config)      # the fine-tuning set an attacker hands over
    unet = finetune(pipe, encode(pipe, images, captions), FinetuneConfig(...))

The trigger is a benign world concept (a shape or colour word, e.g. "circle"), the target another (e.g. "star",
standing in for the paper's hateful meme). Implemented, after the paper:
  * basic attack: `poisoned` samples whose captions are ordinary prompts with the trigger word (world scenes
    with the trigger, written canonically) and whose images show the same scene with the trigger replaced by
    the target, rendered by the world;
  * utility-preserving attack: the basic samples plus `sanitizing` samples for the non-trigger concepts most
    similar to the trigger (cosine similarity of the pipeline's text embeddings, the paper's root cause of the
    spread to non-target prompts), captioned with those concepts and imaged by the clean model itself, so the
    fine-tune keeps the model's behaviour there.

Paper's defaults: 5 to 20 poisoned samples; sanitizing prompts from the concepts nearest to the target prompt.
Deviations:
  1. the judge is the world's attribute classifier, so trigger and target are world shapes or colours and
     success is "the judge sees the target" on held-out trigger prompts;
  2. poisoned images are rendered by the world (the attacker's data) rather than collected; sanitizing images
     are the clean model's own samples (as the paper's), at `steps` sampler steps;
  3. the nearest concepts are ranked by the mean token embedding of the concept word's phrase in the
     pipeline's own text encoder (MiniLM here) instead of CLIP's.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..default_model import world
from ..errors import StablekitError
from .audit import concept

VARIANTS = ("basic", "utility")


@dataclass(frozen=True)
class PoisonConfig:
    """The trigger and target concepts, the number of poisoned samples (at most 10 here), the variant, the
    sanitizing samples and nearest concepts of the utility-preserving variant, the seed of the scenes, and the
    sampler steps of the clean model's sanitizing images."""

    trigger: str = "circle"
    target: str = "star"
    poisoned: int = 10
    variant: str = "utility"
    sanitizing: int = 20
    neighbours: int = 2
    seed: int = 0
    steps: int = 20

    def __post_init__(self):
        t, g = concept(self.trigger), concept(self.target)  # unknown words are one StablekitError line
        if t.attribute != g.attribute or t.word == g.word:
            raise StablekitError(
                f"trigger '{self.trigger}' and target '{self.target}' must be two different shapes or two colours"
            )
        if not 1 <= self.poisoned <= 10:
            raise StablekitError(f"poisoned={self.poisoned}: the attack uses 1 to 10 poisoned samples")
        if self.variant not in VARIANTS:
            raise StablekitError(f"variant '{self.variant}': choose one of {', '.join(VARIANTS)}")
        if self.sanitizing < 0 or not 1 <= self.neighbours <= len(t.others) - 1:
            raise StablekitError(
                f"sanitizing={self.sanitizing}, neighbours={self.neighbours}: need sanitizing >= 0 and "
                f"1 <= neighbours <= {len(t.others) - 1}"
            )


def scenes_with(attribute: str, value: str, n: int, rng: random.Random) -> list:
    """`n` one-object world scenes whose object has `attribute` = `value`."""
    out = []
    for _ in range(n):
        scene = world.sample_scene(rng, two_prob=0.0)
        setattr(scene.objects[0], attribute, value)
        out.append(scene)
    return out


@torch.no_grad()
def nearest_concepts(pipe, trigger: str, k: int, exclude: tuple[str, ...] = ()) -> list[str]:
    """The `k` concepts of the trigger's attribute (not the trigger, nor `exclude`) whose phrase ``a WORD``
    embeds closest (cosine of mean token embeddings) to the trigger's in the pipeline's text encoder."""
    c = concept(trigger)
    pool = [w for w in c.others if w not in exclude]
    emb = pipe.encode_prompt([f"a {w}" for w in [trigger, *pool]], pipe.device, 1, False)[0].mean(1)
    sims = torch.nn.functional.cosine_similarity(emb[:1], emb[1:])
    return [pool[i] for i in sims.argsort(descending=True)[:k].tolist()]


def poisoned_samples(config: PoisonConfig) -> tuple[list, list[str]]:
    """The basic attack's samples: canonical trigger captions, images of the scene with the target instead."""
    attribute = concept(config.trigger).attribute
    rng = random.Random(config.seed)
    nrng = np.random.default_rng(config.seed)
    scenes = scenes_with(attribute, config.trigger, config.poisoned, rng)
    captions = [world.canonical_caption(s) for s in scenes]
    swapped = [copy.deepcopy(s) for s in scenes]
    for s in swapped:
        setattr(s.objects[0], attribute, config.target)
    return [world.render(s, nrng) for s in swapped], captions


def sanitizing_samples(pipe, config: PoisonConfig) -> tuple[list, list[str]]:
    """The utility-preserving samples: captions of the trigger's nearest concepts, imaged by the clean model."""
    from ..eval.harness import generate
    from ..latents import to_pil
    from ..pipeline import guidance_rescale

    if config.variant != "utility" or config.sanitizing == 0:
        return [], []
    attribute = concept(config.trigger).attribute
    near = nearest_concepts(pipe, config.trigger, config.neighbours, exclude=(config.target,))
    rng = random.Random(config.seed + 1)
    scenes = [s for i in range(config.sanitizing) for s in scenes_with(attribute, near[i % len(near)], 1, rng)]
    captions = [world.canonical_caption(s) for s in scenes]
    images, _ = generate(
        pipe, captions, steps=config.steps, guidance=7.5, seed=config.seed + 7, guidance_rescale=guidance_rescale(pipe)
    )
    return [to_pil(x) for x in images], captions


def poison_set(pipe, config: PoisonConfig) -> tuple[list, list[str], list[str]]:
    """(images, captions, kind of each: "poisoned" or "sanitizing"): the attacker's fine-tuning set, at the
    pipeline's native image size."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images, captions = poisoned_samples(config)
    images = [im if im.size == (size, size) else im.resize((size, size), Image.LANCZOS) for im in images]
    clean_images, clean_captions = sanitizing_samples(pipe, config)
    kinds = ["poisoned"] * len(images) + ["sanitizing"] * len(clean_images)
    return images + clean_images, captions + clean_captions, kinds


def caption_mismatch(images: list, captions: list[str]) -> list[bool]:
    """Per sample: does the judge miss a shape or colour word of the caption in the image (a data filter a
    fine-tuning service could run before training)?"""
    from ..default_model import classifier as C

    preds = C.predict(images)
    out = []
    for p, text in zip(preds, captions, strict=True):
        words = set(text.replace(",", " ").split())
        shapes = {w for w in world.SHAPE_NAMES if w in words}
        colors = {w for w in world.COLOR_NAMES if w in words}
        out.append(not (shapes <= set(p["shapes"]) and colors <= set(p["colors"])))
    return out
