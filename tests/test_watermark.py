"""Generative watermarks (Tree-Ring, Gaussian Shading, SEAL), their keys and detection, and the attack suite.

The tiny pipeline's VAE is untrained, so pixel-level inversion is meaningless there; detection is
tested on the generated latents (``output_type="latent"``), which ``detect(..., latents=...)``
DDIM-inverts with the empty prompt and no guidance over the same 3 steps as generation (a
correlation of about 0.95 with the initial noise under guidance 7.5). SEAL's semantics come from a
hashed bag-of-words embedding and a "perfect captioner" that knows each image's prompt.
"""

import random
import zlib
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import run
from diffusers.utils.torch_utils import randn_tensor
from scipy import stats

import stablekit
from stablekit import CallState, StablekitError
from stablekit.default_model import world
from stablekit.edit import decode
from stablekit.eval.attacks import ATTACKS
from stablekit.provenance import SEAL, GaussianShading, Key, TreeRing, detect, make_key, recover_noise, watermark
from stablekit.provenance.seal import caption, text_embedding

STEPS = 3
PROMPT_A, PROMPT_B = "a red star on a gray background", "two blue circles in the top left of a green backdrop"


def bow(text: str, dim: int = 64) -> np.ndarray:
    """Toy semantic embedding: the sum of a fixed random vector per word."""
    return sum(np.random.default_rng(zlib.crc32(w.encode())).standard_normal(dim) for w in text.split())


class Captioner:
    """A perfect captioner: embeds the prompt each image was generated from."""

    def __init__(self):
        self.prompts = {}

    def image(self, pipe, latents, prompt):
        im = decode(pipe, latents)
        self.prompts[im.tobytes()] = prompt
        return im

    def __call__(self, image):
        return bow(self.prompts[image.tobytes()])


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return stablekit.load(tiny_sd_path, device="cpu")


def generate(pipe, plugin=None, prompt=PROMPT_A, **kw):
    with stablekit.use(pipe, plugin) if plugin else nullcontext():
        return run(pipe, prompt=prompt, steps=STEPS, **kw)


def plugin_for(key):
    return watermark(key, embed_prompt=bow) if key.method == "seal" else watermark(key)


def test_gaussian_shading_latents_are_gaussian_and_bits_decode_exactly(pipe):
    keys = [make_key(pipe, "gaussian-shading", seed=i) for i in range(10)]
    keys.append(make_key(pipe, "gaussian-shading", seed=10, bits_per_element=2))
    marks = [GaussianShading(k) for k in keys]
    assert keys[0].params["hw_copies"] == 2 and len(keys[0].params["message"]) == 256  # 4 x 8 x 8 bits, 4 copies
    assert len(keys[-1].params["message"]) == 512
    lats = [
        m.make_latents(CallState(), (4, 4, 16, 16), torch.Generator().manual_seed(i), torch.float32, "cpu")
        for i, m in enumerate(marks)
    ]
    for m, lat in zip(marks, lats, strict=False):
        for z in lat:
            assert torch.equal(m.decode(z.double()), m.message)  # exact, from the initial latents
    # one sample per key: the samples of one key share the ciphertext, so only these are independent
    assert stats.kstest(torch.stack([lat[0] for lat in lats]).flatten().numpy(), "norm").pvalue > 0.01
    assert not torch.equal(lats[0][0], lats[0][1])
    acc = (marks[1].decode(lats[0][0].double()) == marks[1].message).float().mean()
    assert 0.35 < acc < 0.65  # another key reads noise


def test_gaussian_shading_score_is_standard_normal_without_the_mark_and_keeps_weak_marks(pipe):
    mark = GaussianShading(make_key(pipe, "gaussian-shading", seed=0))
    g = torch.Generator().manual_seed(0)
    null = [mark.score(torch.randn(4, 16, 16, generator=g).double(), None)["score"] for _ in range(300)]
    assert stats.kstest(null, "norm").pvalue > 0.01
    lat = mark.make_latents(CallState(), (200, 4, 16, 16), torch.Generator().manual_seed(1), torch.float64, "cpu")
    weak = 0.15 * lat + (1 - 0.15**2) ** 0.5 * torch.randn(lat.shape, generator=g, dtype=torch.float64)
    res = [mark.score(w, None) for w in weak]  # a noise recovered at correlation 0.15
    soft, bits = (np.mean([r[k] < 0.01 for r in res]) for k in ("p_value", "bits_p_value"))
    assert soft > 0.8 and soft > bits + 0.3


def test_tree_ring_latents_keep_moments_and_carry_the_rings(pipe):
    mark = TreeRing(make_key(pipe, "tree-ring", seed=0))
    assert (mark.radius, mark.channel) == (3, 3)  # 10 at 64x64 latents, scaled to 16x16; last channel
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    lat = mark.make_latents(CallState(), (32, 4, 16, 16), g(), torch.float32, "cpu")
    assert torch.equal(lat[:, :3], randn_tensor((32, 4, 16, 16), generator=g())[:, :3])
    assert abs(lat.mean()) < 0.05 and abs(lat.std() - 1) < 0.05
    marked, clean = mark.score(lat[0].double(), None), mark.score(torch.randn(4, 16, 16).double(), None)
    assert marked["score"] < 1e-5 and marked["p_value"] < 1e-10 and clean["p_value"] > 1e-3


def test_seal_patterns_are_gaussian_and_locality_sensitive(pipe):
    mark = SEAL(make_key(pipe, "seal", seed=0), embed_prompt=bow)
    rng = np.random.default_rng(0)
    vs = rng.standard_normal((20, 64))
    assert stats.kstest(torch.stack([mark.pattern(v) for v in vs]).flatten().numpy(), "norm").pvalue > 0.01
    assert torch.equal(mark.pattern(vs[0]), mark.pattern(2 * vs[0]))
    same = lambda a, b: (mark.hash(a) == mark.hash(b)).all(1).float().mean()  # noqa: E731
    assert same(vs[0], vs[0] + 0.1 * rng.standard_normal(64)) > 0.5 > 0.1 > same(vs[0], vs[1])


@pytest.mark.parametrize("method", ["tree-ring", "gaussian-shading", "seal"])
def test_detected_in_marked_latents_only_with_the_right_key(pipe, method):
    key, other = make_key(pipe, method, seed=1), make_key(pipe, method, seed=2)
    marked, clean = generate(pipe, plugin_for(key)), generate(pipe)
    cap = Captioner()
    images = {"marked": cap.image(pipe, marked, PROMPT_A), "clean": cap.image(pipe, clean, PROMPT_A)}

    def look(name, lat, k):
        return detect(
            pipe,
            images[name] if method == "seal" else None,
            k,
            latents=lat,  # noqa: E731
            steps=STEPS,
            embed=cap,
        )

    hit = look("marked", marked, key)
    assert hit.detected and hit.p_value < 1e-9 and hit.seconds > 0
    assert not look("clean", clean, key).detected
    assert not look("marked", marked, other).detected


def test_gaussian_shading_identifies_the_user_among_ten_keys(pipe):
    keys = [make_key(pipe, "gaussian-shading", seed=100 + i) for i in range(10)]
    res = detect(pipe, None, keys, latents=generate(pipe, watermark(keys[3])), steps=STEPS)
    acc = res.details["bit_accuracy"]
    assert res.detected and res.user == 3 and acc > 0.9 and res.details["bits_p_value"] < 1e-20
    assert sum(a == b for a, b in zip(res.message, keys[3].params["message"], strict=False)) == round(acc * 256)
    assert not detect(pipe, None, keys, latents=generate(pipe), steps=STEPS).detected


def test_seal_pattern_copied_to_another_prompt_fails(pipe):
    key, cap = make_key(pipe, "seal", seed=3), Captioner()
    lat_a = generate(pipe, plugin_for(key))
    noise, _ = recover_noise(pipe, latents=lat_a, steps=STEPS)  # the attacker's inversion
    lat_b = generate(pipe, prompt=PROMPT_B, latents=noise.float())  # same noise, new content
    res_a = detect(pipe, cap.image(pipe, lat_a, PROMPT_A), key, latents=lat_a, steps=STEPS, embed=cap)
    res_b = detect(pipe, cap.image(pipe, lat_b, PROMPT_B), key, latents=lat_b, steps=STEPS, embed=cap)
    assert res_a.detected and res_a.details["matches"] > 50
    assert not res_b.detected and res_b.details["matches"] < res_b.details["min_matches"]


def test_default_seal_embedder_pieces():
    pred = {
        "background": "gray",
        "count": 2,
        "shapes": ["star", "circle"],
        "colors": ["red"],
        "textures": ["solid", "striped"],
    }
    assert caption(pred) == "a red star and a striped red circle on a gray background"
    red, crimson, other = (text_embedding(t) for t in ("a red star", "a crimson star", "two blue circles"))
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    assert red.shape == (384,) and cos(red, crimson) > cos(red, other)


def test_attacks_keep_size_and_grow_with_strength(pipe):
    rng = random.Random(0)
    images = [world.render(world.sample_scene(rng)).resize((32, 32)) for _ in range(2)]

    def err(out):
        return np.mean([(np.asarray(a, float) - np.asarray(b, float)) ** 2 for a, b in zip(out, images, strict=False)])

    ctx = {"pipe": pipe, "steps": 4, "marked": images}
    for name, (fn, grid) in ATTACKS.items():
        if name in ("vae_regeneration", "purification", "imprint"):
            grid = grid[-1:]
        extra = {"imprint": {"marked": images[0]}, "surrogate_pgd": {"surrogate": lambda x: x.mean((1, 2, 3))}}
        outs = [fn(images, s, **dict(ctx, **extra.get(name, {}))) for s in grid]
        assert all([o.size for o in out] == [i.size for i in images] for out in outs), name
        if name in ("jpeg", "blur", "noise", "brightness", "contrast", "combination", "averaging"):
            errors = [err(out) for out in outs]
            assert errors == sorted(errors) and errors[0] < errors[-1], (name, errors)
    assert err(ATTACKS["averaging"][0](images, 0.0, marked=images)) == 0
    with pytest.raises(StablekitError, match="needs a pipeline"):
        ATTACKS["purification"][0](images, 0.5)


def test_key_files_and_size_errors(pipe, tmp_path):
    key = make_key(pipe, "tree-ring", seed=0)
    key.save(tmp_path / "k.json")
    assert Key.load(tmp_path / "k.json") == key and (tmp_path / "k.json").stat().st_mode & 0o777 == 0o600
    assert make_key(pipe, "tree-ring").secret != make_key(pipe, "tree-ring").secret
    (tmp_path / "bad.json").write_text("not json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    wrong_size = world.render(world.sample_scene(random.Random(0)))  # 64x64
    cases = [
        (lambda: Key.load(tmp_path / "missing.json"), "does not exist"),
        (lambda: Key.load(tmp_path / "bad.json"), "not a valid"),
        (lambda: Key.load(tmp_path / "other.json"), "not a valid"),
        (lambda: watermark(key, "gaussian-shading"), "made for tree-ring, not gaussian-shading"),
        (lambda: TreeRing(Key("tree-ring", {"latent_shape": [4, 16, 16]}, key.secret)), "corrupt"),
        (lambda: make_key(pipe, "gaussian-shading", message="0101"), "256 characters"),
        (lambda: make_key(pipe, "tree-ring", radius=8), "radius"),
        (lambda: make_key(pipe, "nope"), "unknown watermark method"),
        (lambda: detect(pipe, wrong_size, key), "64x64 but the key is for 32x32"),
        (lambda: generate(pipe, TreeRing(key), height=64, width=64), "made for 32x32 images"),
    ]
    for fn, match in cases:
        with pytest.raises(StablekitError, match=match) as e:
            fn()
        assert "\n" not in str(e.value)
