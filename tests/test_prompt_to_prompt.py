"""Prompt-to-prompt attention control on the tiny random-weight SD pipeline (32x32 images, 4 steps)."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_sd, run

import stablekit
from stablekit import CallState, StablekitError
from stablekit.edit import PromptToPrompt, edit, invert
from stablekit.edit.prompt_to_prompt import token_map, word_positions

SOURCE = "a red star on a gray background"
TARGET = "a blue star on a gray background"
ADDED = "a big red star on a gray background"
METHODS = ["ddim", "edict", "nulltext", "direct"]


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_sd()


class Recorded(PromptToPrompt):
    """Keeps the [source, target] latents and the blend mask after every step."""

    def reset(self, call):
        super().reset(call)
        self.steps = []

    def on_step_end(self, call, step, timestep, latents):
        latents = super().on_step_end(call, step, timestep, latents)
        self.steps.append((latents.clone(), None if self.mask is None else self.mask.clone()))
        return latents


def test_removal_restores_the_pipeline_bit_for_bit(pipe, image):
    processors = pipe.unet.attn_processors
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1)
    before, edited = run(pipe, [SOURCE, TARGET], latents=z), edit(pipe, image, SOURCE, TARGET, "ddim", steps=3)
    with stablekit.use(pipe, PromptToPrompt("replace", self_replace_steps=1.0)):
        during = run(pipe, [SOURCE, TARGET], latents=z)
    assert stablekit.attached(pipe) == [] and pipe.unet.attn_processors == processors  # the same objects
    assert torch.equal(run(pipe, [SOURCE, TARGET], latents=z), before)
    assert np.array_equal(np.asarray(edit(pipe, image, SOURCE, TARGET, "ddim", steps=3)), np.asarray(edited))
    assert torch.allclose(during[0], before[0], atol=1e-4)  # text-to-image: the source branch is untouched
    assert not torch.allclose(during[1], before[1], atol=1e-3)


@pytest.mark.parametrize("method", ["ddim", "edict", "nulltext"])  # direct: only the source gets offsets
def test_full_replace_with_identical_prompts_gives_the_source(pipe, image, method):
    c = Recorded("replace", cross_replace_steps=1.0, self_replace_steps=1.0)
    edit(pipe, image, SOURCE, SOURCE, method, controller=c, steps=4)
    assert len(c.steps) == (3 if method == "edict" else 4)  # EDICT regenerates the last 80%
    assert all(torch.equal(z[1], z[0]) for z, _ in c.steps)


def test_control_replaces_the_targets_maps_in_the_conditional_half(pipe):
    heads, keys = 2, pipe.tokenizer.model_max_length
    c = PromptToPrompt("refine", weights={"big": 3.0})
    with stablekit.use(pipe, c):

        def control(step, queries, cross, rows=4):
            c.reset(CallState(do_cfg=rows == 4, prompt=[SOURCE, ADDED], num_steps=10, step=step))
            g = torch.Generator().manual_seed(0)
            probs = torch.rand(rows * heads, queries, keys if cross else queries, generator=g)
            return probs.view(rows, heads, queries, -1), c.control(probs, heads, cross).view(rows, heads, queries, -1)

        index, alpha = token_map(pipe.tokenizer, SOURCE, ADDED, "refine")
        taken = alpha == 1
        p, out = control(7, 64, True)  # cross-attention before 0.8 * 10 steps
        assert torch.equal(out[:3], p[:3])  # both unconditional rows and the source
        assert torch.equal(out[3][..., taken], p[2][..., index][..., taken])
        assert torch.equal(out[3, ..., 2], 3 * p[3, ..., 2])  # "big" keeps its own map, re-weighted
        assert torch.equal(*control(8, 64, True))
        p, out = control(3, 64, False)  # self-attention before 0.4 * 10 steps, at most 16x16 queries
        assert torch.equal(out[:3], p[:3]) and torch.equal(out[3], p[2])
        assert torch.equal(*control(4, 64, False)) and torch.equal(*control(0, 1024, False))
        p, out = control(0, 64, False, rows=2)  # without guidance: [cond_src, cond_tgt]
        assert torch.equal(out[0], p[0]) and torch.equal(out[1], p[0])


def test_reweighting_by_one_changes_nothing_by_five_changes_the_edit(pipe, image):
    runs = {}
    for key, weights in [("none", None), ("one", {"star": 1.0}), ("five", {"star": 5.0})]:
        runs[key] = c = Recorded("replace", weights=weights)
        edit(pipe, image, SOURCE, SOURCE, "ddim", controller=c, steps=4)
    final = {k: c.steps[-1][0][1] for k, c in runs.items()}
    assert torch.equal(final["one"], final["none"])
    assert (final["five"] - final["none"]).abs().max() > 0.05


@pytest.mark.parametrize("method", METHODS)
def test_local_blend_keeps_the_source_outside_the_mask(peaky, image, method):
    c = Recorded("replace", blend=["red", "blue"], threshold=0.8)
    edit(peaky, image, SOURCE, TARGET, method, controller=c, steps=4)
    assert stablekit.attached(peaky) == []
    for z, mask in c.steps:
        assert mask.shape == (1, 1, 16, 16) and 0 < mask.mean() < 1
        assert torch.equal(torch.where(mask[0] == 0, z[1], z[0]), z[0])  # outside: exactly the source branch
    z, mask = c.steps[-1]
    assert ((z[1] - z[0]) * mask[0]).abs().max() > 1e-3  # inside: the edit


def test_an_inversion_is_reused_for_several_edits(pipe, image):
    inv = invert(pipe, image, SOURCE, "edict", 3)
    direct = edit(pipe, image, SOURCE, TARGET, "edict", controller=PromptToPrompt(), steps=3)
    assert np.array_equal(np.asarray(edit(pipe, inv, SOURCE, TARGET, controller=PromptToPrompt())), np.asarray(direct))
    with pytest.raises(StablekitError, match="the inversion was made under the prompt"):
        edit(pipe, inv, TARGET, SOURCE)


def test_token_alignment(pipe):
    tok = pipe.tokenizer
    index, alpha = token_map(tok, SOURCE, TARGET, "replace")
    assert torch.equal(index, torch.arange(16)) and torch.equal(alpha, torch.ones(16))
    index, alpha = token_map(tok, SOURCE, ADDED, "refine")  # [CLS] a big red star ... [SEP], then padding
    assert index[:11].tolist() == [0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 10] and alpha[:4].tolist() == [1, 1, 0, 1]
    assert alpha[4:].eq(1).all() and torch.equal(index[10:], torch.arange(10, 16))
    assert word_positions(tok, "a five-pointed star", "five-pointed") == [2, 3, 4]
    with pytest.raises(StablekitError, match="target prompt's words cannot be aligned for a replace edit; use refine"):
        token_map(tok, SOURCE, ADDED, "replace")


def test_bad_settings_are_one_line_errors(pipe, image):
    cases = [
        (dict(mode="swap"), "unknown prompt-to-prompt mode"),
        (dict(cross_replace_steps=1.5), "fractions"),
        (dict(weights={"red": -1}), "finite and >= 0"),
    ]
    for kw, match in cases:
        with pytest.raises(StablekitError, match=match):
            PromptToPrompt(**kw)
    cases = [
        (PromptToPrompt(), ADDED, "cannot be aligned for a replace edit"),
        (PromptToPrompt(weights={"green": 2}), TARGET, "word 'green' is not in the target prompt"),
        (PromptToPrompt(blend=["green"]), TARGET, "blend word 'green' is in neither prompt"),
    ]
    for controller, target, match in cases:
        with pytest.raises(StablekitError, match=match) as e:
            edit(pipe, image, SOURCE, target, "ddim", controller=controller, steps=2)
        assert "\n" not in str(e.value) and stablekit.attached(pipe) == []
    with stablekit.use(pipe, PromptToPrompt()), pytest.raises(StablekitError, match="pairs of prompts"):
        run(pipe, SOURCE)
    with pytest.raises(StablekitError, match="conflicts"), stablekit.use(pipe, PromptToPrompt(), PromptToPrompt()):
        pass
    assert stablekit.attached(pipe) == []
