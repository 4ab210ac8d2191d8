"""SAFREE and UCE on the tiny pipelines: the math of each component, its wiring, and exact removal.

Trigger detection needs a text encoder with meaning; :class:`BagOfWords` is one whose geometry is known:
each listed word is its own orthonormal direction and every token's embedding is the sum of the words so
far (the end token's embedding is the sum of the whole prompt), as in a causal encoder.
"""

import dataclasses
import math
import types
from contextlib import contextmanager

import pytest
import torch
from conftest import make_tiny_sd, run
from transformers.modeling_outputs import BaseModelOutput

import stablekit
from stablekit import StablekitError, WeightEdit
from stablekit.registry import CATALOGUE, build
from stablekit.safety import SAFREE, UCE
from stablekit.safety.safree import band, basis, project, reattend, triggers
from stablekit.safety.uce import cross_attention_weights
from stablekit.text import encode_ids, token_ids

WORDS = ["red", "blue", "star", "circle", "on", "gray", "white", "background", "square"]
STAR = "red star on gray background"
PLAIN = "blue circle on white background"


class BagOfWords(torch.nn.Module):
    def __init__(self, tokenizer, dim=32, model_type="clip_text_model"):  # causal like CLIP: SAFREE's sentence space
        super().__init__()
        table = torch.zeros(tokenizer.vocab_size, dim)
        for k, w in enumerate(WORDS):
            table[tokenizer.convert_tokens_to_ids(w), k] = 1.0
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = types.SimpleNamespace(use_attention_mask=False, model_type=model_type)

    device = property(lambda self: self.table.device)
    dtype = property(lambda self: self.table.dtype)

    def forward(self, ids, attention_mask=None, output_hidden_states=False):
        h = self.table[ids].cumsum(1)
        return BaseModelOutput(last_hidden_state=h, hidden_states=(h, h))


@pytest.fixture(scope="module")
def bag_sd():
    pipe = make_tiny_sd()
    pipe.text_encoder = BagOfWords(pipe.tokenizer)
    return pipe


@contextmanager
def cond_embeds(pipe):
    """The embeddings that reach the UNet's cross-attention while inside, one entry per UNet call."""
    seen = []
    handle = pipe.unet.down_blocks[1].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True
    )
    try:
        yield seen
    finally:
        handle.remove()


def encode(pipe, prompt):
    return type(pipe).encode_prompt(
        pipe, prompt=prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )[0][0]


def pinv_projector(vectors):
    """Projector onto the span of the rows of `vectors`, written as in the paper: E (E^T E)^+ E^T."""
    e = vectors.T.double()
    return e @ torch.linalg.pinv(e.T @ e) @ e.T


# ---- SAFREE: the math
def test_projection_removes_the_concept_component():
    g = torch.Generator().manual_seed(0)
    tokens, concepts, inputs = (torch.randn(n, 16, generator=g) for n in (7, 2, 5))
    out = project(tokens, basis(inputs), basis(concepts)).double()
    want = (torch.eye(16, dtype=torch.float64) - pinv_projector(concepts)) @ pinv_projector(inputs) @ tokens.T.double()
    torch.testing.assert_close(out, want.T, atol=1e-5, rtol=1e-5)
    assert (out @ concepts.T.double()).abs().max() < 1e-4


def test_trigger_rule_is_leave_one_out_distance_against_the_others_mean():
    e0, e1 = torch.eye(4)[:2]
    concept = basis(e0[None])
    dist = torch.tensor([1.0, 1.0, 1.5, 1.0, 1.02])
    loo = 3 * e0 + dist[:, None] * e1  # residual distance to the concept subspace is `dist`
    assert triggers(loo, concept, 0.01).tolist() == [False, False, True, False, False]
    assert triggers(loo, concept, 0.0).tolist() == [False, False, True, False, False]
    assert not triggers(loo, concept, 0.5).any()  # 1.5 < 1.5 * mean(1, 1, 1, 1.02)
    assert triggers(loo[:1], concept, 0.01).tolist() == [False]


def test_reattention_changes_only_the_low_band_and_only_where_filtered_is_stronger():
    g = torch.Generator().manual_seed(1)
    f, o = torch.randn(2, 3, 8, 6, generator=g), torch.randn(2, 3, 8, 6, generator=g)
    out = reattend(f, o, radius=1, scale=0.3)
    ff, fo, fout = torch.fft.fft2(f), torch.fft.fft2(o), torch.fft.fft2(out)
    inside = band(8, 6, 1)
    assert inside.sum() == 9 and inside[0, 0] and inside[1, 5] and not inside[2, 0]
    stronger = inside & (ff.abs() > fo.abs())
    torch.testing.assert_close(fout, torch.where(stronger, 0.3 * ff, ff), atol=1e-4, rtol=1e-4)
    assert stronger.any() and (inside & ~stronger).any()
    assert torch.equal(reattend(f, f, 1, 0.3), f)  # nothing stronger: untouched, bit for bit


# ---- SAFREE on a pipeline
def test_detection_flags_the_concept_token_and_projection_removes_it(bag_sd):
    plugin = SAFREE(concepts=["star"], self_validation=False, re_attention=False)
    with cond_embeds(bag_sd) as seen, stablekit.use(bag_sd, plugin):
        run(bag_sd, prompt=STAR, steps=2)
    (d,) = plugin.decisions
    assert [t for t, f in zip(d.tokens, d.flagged, strict=False) if f] == ["star"]
    orig, cond = encode(bag_sd, STAR), seen[0][1]
    star = 1 + d.tokens.index("star")
    ids = token_ids(bag_sd, STAR)
    loo = encode_ids(bag_sd, [ids[:i] + ids[i + 1 :] for i in range(1, len(ids) - 1)])[:, len(ids) - 2]
    concept = encode_ids(bag_sd, [token_ids(bag_sd, "star")])[:, 2]
    want = (torch.eye(32, dtype=torch.float64) - pinv_projector(concept)) @ pinv_projector(loo) @ orig[star].double()
    torch.testing.assert_close(cond[star].double(), want, atol=1e-5, rtol=1e-5)
    assert abs(float(cond[star] @ concept[0])) < 1e-5 < abs(float(orig[star] @ concept[0]))
    others = [i for i in range(len(orig)) if i != star]
    assert torch.equal(cond[others], orig[others])
    assert torch.equal(seen[0][0], encode(bag_sd, ""))  # the unconditional half is untouched


def test_prompt_without_the_concept_is_unchanged(bag_sd):
    ref = run(bag_sd, prompt=PLAIN, steps=3)
    plugin = SAFREE(concepts=["star"], upper=1.0, gain=0.0)
    with stablekit.use(bag_sd, plugin):
        assert torch.equal(run(bag_sd, prompt=PLAIN, steps=3), ref)
        assert not any(plugin.decisions[0].flagged)
        run(bag_sd, prompt=STAR, steps=1)
        assert any(plugin.decisions[0].flagged)


def test_self_validating_filter_step_count_follows_its_formula(bag_sd):
    steps, upper, gain, center = 6, 1.0, 8.0, 0.3
    plugin = SAFREE(concepts=["star"], upper=upper, gain=gain, center=center, re_attention=False)
    with cond_embeds(bag_sd) as seen, stablekit.use(bag_sd, plugin):
        run(bag_sd, prompt=STAR, steps=steps)
    orig = encode(bag_sd, STAR)
    ids = token_ids(bag_sd, STAR)
    n = len(ids)
    loo = encode_ids(bag_sd, [ids[:i] + ids[i + 1 :] for i in range(1, n - 1)])[:, n - 2]
    concept = encode_ids(bag_sd, [token_ids(bag_sd, "star")])[:, 2]
    proj = (torch.eye(32, dtype=torch.float64) - pinv_projector(concept)) @ pinv_projector(loo) @ orig[:n].double().T
    beta = 1 - torch.cosine_similarity(orig[:n].double(), proj.T, dim=-1).mean().item()
    assert plugin.decisions[0].beta == pytest.approx(beta, abs=1e-5)
    count = round(upper * steps / (1 + math.exp(-gain * (beta - center))))
    assert 0 < count < steps and plugin.steps_filtered(plugin.decisions[0].beta, steps) == count
    filtered = [not torch.equal(e[1], orig) for e in seen]
    assert filtered == [True] * count + [False] * (steps - count)


def test_reattention_runs_the_original_branch_and_detaches_exactly(bag_sd):
    ref = run(bag_sd, prompt=STAR, steps=4)
    batches = []
    handle = bag_sd.unet.up_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    plugin = SAFREE(concepts=["star"], upper=1.0, gain=0.0, scales=[0.0, 0.0])
    with stablekit.use(bag_sd, plugin):
        with_ra = run(bag_sd, prompt=STAR, steps=4)
    handle.remove()
    assert batches == [3, 3, 2, 2]  # [uncond, filtered, original] while filtering (2 of 4 steps), then [uncond, cond]
    with stablekit.use(bag_sd, SAFREE(concepts=["star"], upper=1.0, gain=0.0, re_attention=False)):
        without = run(bag_sd, prompt=STAR, steps=4)
    assert with_ra.shape == ref.shape and not torch.equal(with_ra, without)
    assert torch.equal(run(bag_sd, prompt=STAR, steps=4), ref)
    for m in [bag_sd.unet, *bag_sd.unet.up_blocks]:
        assert not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks


def test_reattention_rescales_only_the_filtered_branch_skip_features(bag_sd):
    block, before, after = bag_sd.unet.up_blocks[0], [], []
    handles = [
        block.register_forward_pre_hook(
            lambda m, a, kw: before.append(kw["res_hidden_states_tuple"][-1]), with_kwargs=True
        ),
        block.resnets[0].register_forward_pre_hook(lambda m, a: after.append(a[0])),
    ]
    with stablekit.use(bag_sd, SAFREE(concepts=["star"], upper=1.0, gain=0.0, scales=[0.5, 0.5])):
        run(bag_sd, prompt=STAR, steps=2)
    for h in handles:
        h.remove()
    skip, seen = before[0], after[0][:, -before[0].shape[1] :]  # the resnet sees [hidden, skip] channels
    assert skip.shape[0] == 3
    assert torch.equal(seen[0], skip[0]) and torch.equal(seen[2], skip[2])  # uncond and original branches
    torch.testing.assert_close(seen[1], reattend(skip[1:2], skip[2:], 1, 0.5)[0])
    assert not torch.equal(seen[1], skip[1])
    assert torch.equal(after[1][:, -skip.shape[1] :], before[1])  # step 2 is not filtered: untouched


def test_leave_one_out_uses_clip_pooled_outputs_of_the_prompt_without_each_token(tiny_sd):
    plugin = SAFREE(concepts=["star", "circle"], self_validation=False, re_attention=False)
    with stablekit.use(tiny_sd, plugin):
        run(tiny_sd, prompt=STAR, steps=1)
    ids = token_ids(tiny_sd, STAR)
    pooled = [
        tiny_sd.text_encoder(torch.tensor([r])).pooler_output[0]
        for r in [ids[:i] + ids[i + 1 :] for i in range(1, len(ids) - 1)]
    ]
    concept = torch.stack(
        [tiny_sd.text_encoder(torch.tensor([token_ids(tiny_sd, c)])).pooler_output[0] for c in ("star", "circle")]
    )
    loo = torch.stack(pooled)
    assert plugin.decisions[0].flagged == triggers(loo, basis(concept), 0.01).tolist()
    orig = encode(tiny_sd, STAR)[: len(ids)].double()
    proj = (torch.eye(32, dtype=torch.float64) - pinv_projector(concept)) @ pinv_projector(loo) @ orig.T
    beta = 1 - torch.cosine_similarity(orig, proj.T, dim=-1).mean().item()
    assert plugin.decisions[0].beta == pytest.approx(beta, abs=1e-4)


def test_state_resets_per_call_and_batches_are_row_by_row(bag_sd):
    plugin = SAFREE(concepts=["star"])
    with stablekit.use(bag_sd, plugin):
        out = run(bag_sd, prompt=[STAR, PLAIN], steps=2, num_images_per_prompt=2)
        assert out.shape[0] == 4 and [any(d.flagged) for d in plugin.decisions] == [True, False]
        run(bag_sd, prompt=PLAIN, steps=2, guidance_scale=1.0)
        assert len(plugin.decisions) == 1 and not any(plugin.decisions[0].flagged)


def test_negative_prompt_is_off_by_default_and_follows_the_filter(bag_sd):
    concepts = ["star", "red"]
    with cond_embeds(bag_sd) as seen:
        for flag in (False, True):  # no self-validation: every step filters, so the negative prompt always holds
            with stablekit.use(bag_sd, SAFREE(concepts=concepts, negative_prompt=flag, self_validation=False)):
                run(bag_sd, prompt=PLAIN, steps=1)
    assert torch.equal(seen[0][0], encode(bag_sd, ""))
    assert torch.equal(seen[1][0], encode(bag_sd, "star, red"))
    plugin = SAFREE(concepts=concepts, negative_prompt=True, upper=1.0, gain=1e4)
    with stablekit.use(bag_sd, plugin):
        run(bag_sd, prompt=[STAR, PLAIN], steps=1)
        star, plain = (d.beta for d in plugin.decisions)
        assert star > plain
        plugin.config = dataclasses.replace(plugin.config, center=(star + plain) / 2)  # takes STAR, leaves PLAIN
        with cond_embeds(bag_sd) as seen:
            run(bag_sd, prompt=[STAR, PLAIN], steps=1)
    uncond = seen[0][:2]  # the unconditional rows come first
    assert torch.equal(uncond[0], encode(bag_sd, "star, red")) and torch.equal(uncond[1], encode(bag_sd, ""))


def test_sdxl(tiny_sdxl_path):
    pipe = stablekit.load(tiny_sdxl_path, device="cpu")
    ids = token_ids(pipe, STAR)
    assert torch.equal(encode_ids(pipe, [ids])[0], encode(pipe, STAR))
    ref = run(pipe, prompt=STAR, steps=2)
    plugin = SAFREE(concepts=["star"], self_validation=False, detect=False)
    with stablekit.use(pipe, plugin):
        assert not torch.equal(run(pipe, prompt=STAR, steps=2), ref)
        assert all(plugin.decisions[0].flagged)
    assert torch.equal(run(pipe, prompt=STAR, steps=2), ref)


@pytest.fixture(scope="module")
def bag_bert():
    """A bag-of-words encoder that does not call itself CLIP: SAFREE's default picks the token space."""
    pipe = make_tiny_sd()
    pipe.text_encoder = BagOfWords(pipe.tokenizer, model_type="bert")
    return pipe


def test_token_space_removes_the_concept_direction_from_every_position(bag_bert):
    plugin = SAFREE(concepts=["star"], self_validation=False, re_attention=False)
    with stablekit.use(bag_bert, plugin):
        with cond_embeds(bag_bert) as seen:
            run(bag_bert, prompt=STAR, steps=2)
        assert plugin._space == "tokens" and all(plugin.decisions[0].flagged)
        star = torch.zeros(32)
        star[WORDS.index("star")] = 1  # the star token's embedding in every template is the star direction
        orig = encode(bag_bert, STAR)
        want = orig - (orig @ star)[:, None] * star  # every position, padding included, loses only that
        assert (orig @ star).abs().max() == 1  # the star and every later position (causal bag) hold it
        torch.testing.assert_close(seen[0][1], want)
        torch.testing.assert_close(seen[1][1], want)
        assert torch.equal(seen[0][0], encode(bag_bert, ""))
        ref = run(bag_bert, prompt=PLAIN, steps=2)
    assert torch.equal(ref, run(bag_bert, prompt=PLAIN, steps=2))  # no star component: nothing changes


def test_token_space_filter_defaults_split_concept_prompts_from_others(bag_bert, bag_sd):
    plugin = SAFREE(concepts=["star"])
    with stablekit.use(bag_bert, plugin):
        run(bag_bert, prompt=[STAR, PLAIN], steps=1)
    star, plain = (d.beta for d in plugin.decisions)
    assert plain == pytest.approx(1 / 7)  # untouched rows; 1/7: the bag's start token is a zero vector
    assert star > plain + 0.1
    assert plugin.steps_filtered(0.12, 25) == 25 and plugin.steps_filtered(0.01, 25) == 0
    with stablekit.use(bag_sd, plugin):  # a CLIP encoder: the paper's sentence space and constants
        assert plugin._space == "sentence" and plugin.steps_filtered(0.12, 50) == 0
        assert plugin.steps_filtered(1.0, 50) == 10


def test_safree_bad_input(bag_sd):
    for concepts in ([], "star", [""]):
        with pytest.raises(StablekitError, match="concept"):
            SAFREE(concepts=concepts)
    with pytest.raises(StablekitError, match="concept"):
        build("safree", CATALOGUE["guard"], "guard")
    assert build("safree:concepts=star,alpha=0.1", CATALOGUE["guard"], "guard").config.concepts == ("star",)
    for kw in (dict(space="words"), dict(rank=0), dict(rank=1.5)):
        with pytest.raises(StablekitError, match="space is one of"):
            SAFREE(concepts=["star"], **kw)
    embeds = encode(bag_sd, STAR)[None]
    with stablekit.use(bag_sd, SAFREE(concepts=["star"])), pytest.raises(StablekitError, match="prompt text"):
        bag_sd(prompt_embeds=embeds, num_inference_steps=1, height=32, width=32, output_type="latent")


# ---- UCE
def last_token(pipe, text):
    return encode(pipe, text)[max(len(token_ids(pipe, text)) - 2, 0)]


def test_uce_maps_the_concept_to_its_guide_and_preserves_others(tiny_sd):
    star, empty, circle = (last_token(tiny_sd, t) for t in ("star", "", "circle"))
    attn = tiny_sd.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn2
    before = {n: getattr(attn, n)(torch.stack([star, empty, circle])) for n in ("to_k", "to_v")}
    weight = attn.to_v.weight.detach().clone()
    with stablekit.use(tiny_sd, UCE(concepts=["star"], preserve=["circle"], lamb=1e-4)):
        for name, (_s, e, c) in before.items():
            after = getattr(attn, name)(torch.stack([star, circle]))
            torch.testing.assert_close(after[0], e, atol=2e-3, rtol=2e-3)  # keys/values of "star" are the guide's
            torch.testing.assert_close(after[1], c, atol=2e-3, rtol=2e-3)
    with stablekit.use(tiny_sd, UCE(concepts=["star"], preserve=["circle"])):  # default lamb=0.5
        after = attn.to_v(torch.stack([star, circle]))
        moved = (after[0] - before["to_v"][0]).norm() / (before["to_v"][1] - before["to_v"][0]).norm()
        assert moved > 0.9 and (after[1] - before["to_v"][2]).norm() < 0.05 * before["to_v"][2].norm()
    assert torch.equal(attn.to_v.weight, weight)


def test_uce_edits_every_cross_attention_key_and_value(tiny_sd):
    edit = UCE(concepts=["star"]).fit(tiny_sd)
    attn2 = [n for n, _ in tiny_sd.unet.named_modules() if n.endswith(".attn2")]
    assert set(edit.deltas) == set(cross_attention_weights(tiny_sd.unet))
    assert sorted(edit.deltas) == sorted(f"unet.{n}.{p}.weight" for n in attn2 for p in ("to_k", "to_v"))


def test_uce_save_load_round_trip_is_exact(tiny_sd, tmp_path):
    ref = run(tiny_sd)
    edit = UCE(concepts=["star", "square"], guides=["circle"], preserve=["red"])
    with stablekit.use(tiny_sd, edit):
        edited = run(tiny_sd)
    assert not torch.equal(edited, ref) and torch.equal(run(tiny_sd), ref)
    edit.save(tmp_path / "uce.safetensors")
    loaded = UCE.load(tmp_path / "uce.safetensors")
    assert loaded.config == edit.config and all(torch.equal(loaded.deltas[n], d) for n, d in edit.deltas.items())
    with stablekit.use(tiny_sd, loaded):
        assert torch.equal(run(tiny_sd), edited)


def test_uce_refuses_another_model_and_bad_input(tiny_sd, tiny_sdxl_path, tmp_path):
    edit = UCE(concepts=["star"]).fit(tiny_sd)
    other = make_tiny_sd()
    with torch.no_grad():
        other.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.mul_(1.1)
    for pipe in (other, stablekit.load(tiny_sdxl_path, device="cpu")):
        with pytest.raises(StablekitError, match="another model"):
            stablekit.use(pipe, edit)
        assert stablekit.attached(pipe) == []
    WeightEdit({"unet.conv_in.bias": torch.zeros(32)}).save(tmp_path / "plain.safetensors")
    with pytest.raises(StablekitError, match="not a UCE edit"):
        UCE.load(tmp_path / "plain.safetensors")
    bad = (dict(concepts=[]), dict(), dict(concepts=["a", "b"], guides=["x", "y", "z"]), dict(concepts=["a"], lamb=0))
    for kw in bad:
        with pytest.raises(StablekitError):
            UCE(**kw)
    with pytest.raises(StablekitError, match="not computed"):
        UCE(concepts=["star"]).save(tmp_path / "x.safetensors")


def test_sld_on_a_standard_pipeline_equals_diffusers_safe_pipeline():
    from diffusers import StableDiffusionPipelineSafe

    from stablekit.safety import SLD

    pipe = make_tiny_sd()
    safe = StableDiffusionPipelineSafe(**pipe.components)
    safe.safety_concept = "star"
    kw = dict(height=32, width=32, num_inference_steps=6, guidance_scale=7.5, output_type="np")
    # warm-up 2 of 6 steps and a weaker scale, so that the safety term is active and partly clipped
    sld = dict(guidance=50.0, warmup=2)
    want = safe(
        "a red star", generator=torch.Generator().manual_seed(0), sld_guidance_scale=50.0, sld_warmup_steps=2, **kw
    ).images
    plain = pipe("a red star", generator=torch.Generator().manual_seed(0), **kw).images
    with stablekit.use(pipe, SLD(["star"], **sld)) as h:
        got = pipe("a red star", generator=torch.Generator().manual_seed(0), **kw).images
        again = pipe("a red star", generator=torch.Generator().manual_seed(0), **kw).images  # momentum resets
    assert abs(want - plain).max() > 1e-3  # the safety guidance changed the image
    assert abs(got - want).max() < 1e-5 and abs(again - want).max() < 1e-5
    assert h.plugins[0].prompts == ["star"]
    assert abs(pipe("a red star", generator=torch.Generator().manual_seed(0), **kw).images - plain).max() == 0
    with pytest.raises(StablekitError, match="guidance_scale > 1"), stablekit.use(pipe, SLD(["star"])):
        pipe("a red star", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="latent")
