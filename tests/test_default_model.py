"""The shipped default model: loads offline through the same code as any SD model, follows prompts."""
import json

import numpy as np
import pytest
import torch

import stablekit
from stablekit.default_model import WEIGHTS_DIR


@pytest.fixture(scope="module")
def default_pipe():
    return stablekit.load(device="cpu")


def _generate(pipe, prompts, seed=0, steps=12):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=gens).images


def test_shipped_files_and_size():
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size < 40e6
    memo = json.loads((WEIGHTS_DIR / "memorized.json").read_text())
    assert len(memo) >= 5 and len({m["caption"] for m in memo}) == len(memo)


def test_default_model_is_a_standard_sd_pipeline(default_pipe):
    from diffusers import StableDiffusionPipeline
    assert isinstance(default_pipe, StableDiffusionPipeline)
    assert default_pipe.text_encoder.config.hidden_size == default_pipe.unet.config.cross_attention_dim == 384
    assert default_pipe.unet.config.sample_size * default_pipe.vae_scale_factor == 64


def test_same_seed_same_image_and_prompts_matter(default_pipe):
    a, b, c = (np.asarray(_generate(default_pipe, [p], seed=0, steps=6)[0]) for p in
               ["a red circle on a gray background", "a red circle on a gray background", "a blue star on beige"])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_generated_colours_follow_the_prompt(default_pipe):
    """The judge reads the prompted colour far above chance (1/8): 6 of 16 has p < 0.01 under chance.

    Only colour is asserted: the shipped model is undertrained and its background and shape accuracy
    are still near chance (see README, `stablekit bench default-model`)."""
    from stablekit.default_model.classifier import predict
    from stablekit.default_model.world import COLOR_NAMES
    colors = COLOR_NAMES * 2
    prompts = [f"a {c} {s} on a gray background" for c, s in zip(colors, ["square", "circle"] * 8)]
    preds = predict(_generate(default_pipe, prompts, seed=10, steps=20))
    hits = sum(c in p["colors"] for c, p in zip(colors, preds))
    assert hits >= 6, (hits, preds)
