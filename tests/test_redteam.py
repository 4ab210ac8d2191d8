"""Concept arithmetic composes guidance exactly, through any attached defense; the audit's prompts and judge."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_sd

import stablekit
from stablekit import StablekitError
from stablekit.default_model import world
from stablekit.redteam import ConceptArithmetic, audit, decompositions
from stablekit.redteam.audit import concept, prompts
from stablekit.safety import SAFREE
from stablekit.text import encode_ids, token_ids

KW = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="latent")


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_sd()


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed) for _ in range(n)]


@torch.no_grad()
def composed_by_hand(pipe, terms, g=5.0, steps=4):
    e = encode_ids(pipe, [token_ids(pipe, t) for t in [""] + [p for p, _ in terms]])
    x = pipe.prepare_latents(1, 4, 32, 32, e.dtype, "cpu", torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(steps)
    for t in pipe.scheduler.timesteps:
        eps = pipe.unet(x.expand(len(e), -1, -1, -1), t, e).sample
        u = eps[0]
        eps = u + g * sum(w * (eps[i + 1] - u) for i, (_, w) in enumerate(terms))
        x = pipe.scheduler.step(eps[None], t, x).prev_sample
    return x


def test_composition_equals_compositional_guidance_by_hand(pipe):
    terms = [("a blue circle", 1.5), ("a red star", -0.5), ("star", 0.25)]
    attack = ConceptArithmetic(terms)
    with stablekit.use(pipe, attack):
        out = pipe(attack.prompts, generator=gens(3), **KW).images
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])  # the rows stay one image
    torch.testing.assert_close(out[:1], composed_by_hand(pipe, terms), atol=1e-4, rtol=1e-4)
    with stablekit.use(pipe, ConceptArithmetic([("a red star", 1.0), ("a blue circle", 0.0)])) as h:
        single = pipe(h.plugins[0].prompts, generator=gens(2), **KW).images
    torch.testing.assert_close(single[:1], pipe("a red star", generator=gens(1)[0], **KW).images, atol=1e-4, rtol=1e-4)


def test_batched_terms_make_one_composition_per_image(pipe):
    a = ConceptArithmetic([(["a red star", "a blue circle"], 1.0), (["star", "circle"], 0.5)])
    assert a.prompts == ["a red star", "a blue circle", "star", "circle"]
    with stablekit.use(pipe, a):
        both = pipe(a.prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1, 0, 1)], **KW).images
    for j, (p, q) in enumerate([("a red star", "star"), ("a blue circle", "circle")]):
        b = ConceptArithmetic([(p, 1.0), (q, 0.5)])
        with stablekit.use(pipe, b):
            alone = pipe(b.prompts, generator=gens(2, j), **KW).images
        torch.testing.assert_close(both[j], alone[0], atol=1e-4, rtol=1e-4)


def test_defense_sees_every_term(pipe):
    safree = SAFREE(["star"], re_attention=False, self_validation=False, detect=False)
    attack = ConceptArithmetic([("a blue circle", 1.0), ("a red star", 1.0)])
    with stablekit.use(pipe, safree, attack):
        pipe(attack.prompts, generator=gens(2), **KW)
    assert len(safree.decisions) == 2 and all(any(d.flagged) for d in safree.decisions)


def test_bad_input(pipe):
    for terms in ([], [("", 1.0)], [(["a", "b"], 1.0), (["c"], 1.0)]):
        with pytest.raises(StablekitError):
            ConceptArithmetic(terms)
    with stablekit.use(pipe, ConceptArithmetic([("a", 1.0), ("b", 1.0)])), pytest.raises(StablekitError, match="rows"):
        pipe("a red star", generator=gens(1)[0], **KW)


def test_decompositions_and_audit_prompts():
    d = decompositions("a red star on a gray background", "star", "circle", ["starburst"])
    assert d["negated"] == [("a red circle on a gray background", 2.0), ("a red star on a gray background", -1.0)]
    assert d["word"] == [("a red circle on a gray background", 1.0), ("star", 1.0)]
    assert d["paraphrases"] == [("a red starburst on a gray background", 1.0)]
    red = concept("red")
    assert red.attribute == "color" and red.paraphrases == ["crimson", "scarlet"] and "red" not in red.others
    p = prompts(red, 30, seed=3)
    assert len(p.direct) == len(p.para) == len(p.keep) == len(p.direct_scenes) == len(p.keep_scenes) == 30
    assert all(" red " in t for t in p.direct) and not any(" red " in t for t in p.para + p.keep)
    assert all(o.color != "red" for s in p.keep_scenes for o in s.objects)
    assert all(
        s.objects[0].color == "red" and world.canonical_caption(s) == t
        for s, t in zip(p.direct_scenes, p.direct, strict=False)
    )
    assert p.direct != prompts(red, 30, seed=4).direct
    with pytest.raises(StablekitError, match="unknown concept"):
        concept("nudity")


def test_blocklist_deletes_the_word_before_the_pipeline_sees_it(pipe):
    block, none = audit.defense(pipe, "blocklist", concept("star")), audit.defense(pipe, "none", concept("star"))
    assert block.filter(["a red Star on a starry sky", "star", "stars"]) == ["a red on a starry sky", "", "stars"]
    kw = dict(steps=2, guidance=5.0, seed=3, batch=2)
    got = audit.generate(pipe, block, ["a red star", "a blue circle"], **kw)[0]
    assert torch.equal(got, audit.generate(pipe, none, ["a red", "a blue circle"], **kw)[0])
    assert not torch.equal(got[0], audit.generate(pipe, none, ["a red star"], **kw)[0][0])


def test_others_kept_judges_every_attribute_of_the_scene_but_the_concept_s():
    from stablekit.default_model import classifier

    c = concept("star")
    p = prompts(c, 16, seed=5)
    rng = np.random.default_rng(0)
    images = classifier.to_tensor([world.render(s, rng) for s in p.direct_scenes])
    kept = audit.others_kept(images, p.direct_scenes, c)
    assert kept.shape == (16, 4) and kept.mean() > 0.9  # colour, background, texture, count of clean renders
    assert audit.others_kept(images, p.direct_scenes[::-1], c).mean() < kept.mean() - 0.2  # the wrong scenes


def test_token_slots_encode_like_the_text_and_decode_back(pipe):
    from stablekit.text import Slots

    slots = Slots(pipe, 2, "a red star")
    ids = torch.tensor([token_ids(pipe, "blue circle")[1:3]])[0]
    with torch.no_grad():
        got = slots.encode(slots.table[ids])
    want = encode_ids(pipe, [token_ids(pipe, "blue circle a red star")])
    torch.testing.assert_close(got, want)
    assert slots.text(ids) == "blue circle a red star"
    assert torch.equal(slots.nearest(slots.table[ids] * 3), ids)  # cosine: scale does not matter


def test_simplex_projection():
    from stablekit.redteam.unlearndiffatk import simplex

    p = simplex(torch.tensor([[0.5, 0.4, 0.3], [2.0, -1.0, 0.0], [0.2, 0.3, 0.5]]))
    torch.testing.assert_close(p.sum(-1), torch.ones(3))
    assert (p >= 0).all() and torch.equal(p[1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(p[0], torch.tensor([0.5, 0.4, 0.3]) - 0.2 / 3)
    torch.testing.assert_close(p[2], torch.tensor([0.2, 0.3, 0.5]))


def _losses(pipe, texts, x0, target_text=None, n=12):
    """Per text: the UnlearnDiffAtk objective (MSE to the training target), or with `target_text` the P4D one
    (MSE to the model's prediction for it), over n fixed noisings of x0."""
    from stablekit.latents import noise_scheduler, training_target

    sch, g = noise_scheduler(pipe), torch.Generator().manual_seed(5)
    t = torch.randint(1000, (n,), generator=g)
    noise = torch.randn(n, *x0.shape[1:], generator=g)
    xt = sch.add_noise(x0.expand(n, -1, -1, -1), noise, t)
    with torch.no_grad():

        def pred(text):
            return pipe.unet(xt, t, encode_ids(pipe, [token_ids(pipe, text)]).expand(n, -1, -1)).sample

        want = training_target(sch, x0.expand(n, -1, -1, -1), noise, t) if target_text is None else pred(target_text)
        return [torch.nn.functional.mse_loss(pred(text), want).item() for text in texts]


def test_optimising_attacks_lower_their_objective_and_leave_the_model(pipe):
    import random

    from stablekit.redteam.p4d import P4D
    from stablekit.redteam.unlearndiffatk import UnlearnDiffAtk

    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    vocab, rng = list(pipe.tokenizer.vocab), random.Random(0)
    text = UnlearnDiffAtk(tokens=3, iterations=60, per_timestep=20, lr=0.05).run(pipe, "a red star", x0)
    assert text.endswith("a red star") and len(text.split()) > 3
    rand = [" ".join(rng.sample(vocab, 3)) + " a red star" for _ in range(8)]
    got, *others = _losses(pipe, [text] + rand, x0)
    assert got < sorted(others)[len(others) // 2]  # better than the median random prefix
    p4d = P4D(tokens=4, iterations=60).run(pipe, [], "a red star", x0)
    got, *others = _losses(pipe, [p4d] + [" ".join(rng.sample(vocab, 4)) for _ in range(8)], x0, "a red star")
    assert got < sorted(others)[len(others) // 2]
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())
    assert all(p.requires_grad for p in pipe.unet.parameters())
