"""Each attack of ``stablekit.eval.attacks`` does what its docstring states, measured on images whose content is
known (world renders, coordinate ramps, impulses, flat grey). Every property is also run on the identity
``lambda images, strength: images``, and must fail there: none can pass by doing nothing.

The attacks that need a model run on the embedded default model (64x64 images, 16x16 latents, 10 steps)."""

import functools
import random

import numpy as np
import pytest
import torch
from PIL import Image

import stablekit
from stablekit.default_model import classifier, world
from stablekit.eval.attacks import ATTACKS
from stablekit.eval.metrics import psnr
from stablekit.provenance import recover_noise

STEPS = 10


def identity(images, strength, **_):
    return [im.copy() for im in images]


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float64) / 255


def mse(out, images) -> float:
    return float(np.mean([np.mean((arr(a) - arr(b)) ** 2) for a, b in zip(out, images, strict=True)]))


def mean_psnr(out, images) -> float:
    return float(
        np.mean(
            [psnr(arr(a), arr(b)) if a.tobytes() != b.tobytes() else np.inf for a, b in zip(out, images, strict=True)]
        )
    )


def renders(n: int = 4, seed: int = 3) -> list[Image.Image]:
    """One-object world scenes (64x64, the default model's size) that the judge reads correctly."""
    rng = random.Random(seed)
    return [world.render(world.sample_scene(rng, two_prob=0.0), np.random.default_rng(i)) for i in range(n)]


def ramp(size: int = 64) -> Image.Image:
    """Red grows with x, green with y (4 levels per pixel), blue 0."""
    g = np.tile(np.arange(size, dtype=np.uint8) * 4, (size, 1))
    return Image.fromarray(np.stack([g, g.T, np.zeros_like(g)], -1))


def flat(value: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), value, np.uint8))


def shapes_and_colors(images) -> list[tuple[list, list]]:
    return [(p["shapes"], p["colors"]) for p in classifier.predict(images)]


def check_jpeg(attack, pipe):
    images = renders()
    errors = [mse(attack(images, q), images) for q in (90, 50, 10)]
    assert 0 < errors[0] < errors[1] < errors[2], errors
    assert mean_psnr(attack(images, 90), images) > 30  # quality 90 keeps the picture


def check_resized_crop(attack, pipe):
    [out] = attack([ramp()], 0.25, seed=1)  # keeps a quarter of the area: half of each side
    a = arr(out)
    for channel in (0, 1):  # red spans x, green spans y: each now spans half its old range
        span = a[..., channel].max() - a[..., channel].min()
        assert abs(span / (63 * 4 / 255) - 0.5) < 0.06, (channel, span)
    assert out.size == (64, 64)


def check_rotation(attack, pipe):
    [quarter] = attack([ramp()], 90)  # counter-clockwise, exactly a transpose on a square
    assert np.array_equal(np.asarray(quarter), np.rot90(np.asarray(ramp())))
    [tilted] = attack([flat(200)], 45)
    a = np.asarray(tilted)
    assert (a[0, 0] == 0).all() and (a[-1, -1] == 0).all() and (a[32, 32] == 200).all()  # black corners


def check_blur(attack, pipe):
    impulse = np.zeros((65, 65, 3), np.uint8)
    impulse[32, 32] = 255
    ys, xs = np.mgrid[:65, :65]
    for sigma in (1.0, 2.0):
        [out] = attack([Image.fromarray(impulse)], sigma)
        w = arr(out)[..., 0]
        assert abs(w.sum() - 1) < 0.06  # the blur keeps the impulse's mass
        for d in (xs - 32, ys - 32):
            assert abs(np.sqrt((w / w.sum() * d**2).sum()) - sigma) < 0.1 * sigma  # standard deviation in pixels


def check_noise(attack, pipe):
    grey = flat(128)
    for std in (0.02, 0.1):
        diff = arr(attack([grey], std, seed=0)[0]) - arr(grey)
        assert abs(diff.std() - std) < 0.05 * std and abs(diff.mean()) < 0.005, (std, diff.std())
    assert arr(attack([grey], 0.1, seed=0)[0]).tobytes() != arr(attack([grey], 0.1, seed=1)[0]).tobytes()


def check_brightness(attack, pipe):
    dark = [im.point(lambda v: v // 2) for im in renders()]  # dark enough not to clip at 1.5
    for factor in (0.5, 1.5):
        ratio = np.mean([arr(o).mean() for o in attack(dark, factor)]) / np.mean([arr(im).mean() for im in dark])
        assert abs(ratio - factor) < 0.02 * factor, (factor, ratio)  # 8-bit rounding aside, pixels times factor


def check_contrast(attack, pipe):
    grey = 96 + np.indices((64, 64)).sum(0) // 2  # a grey ramp over 96..159: no clipping at factor 2
    image = Image.fromarray(np.repeat(grey[..., None], 3, -1).astype(np.uint8))
    for factor in (0.5, 2.0):
        out = arr(attack([image], factor)[0])
        assert abs(out.mean() - arr(image).mean()) < 0.01  # about the mean grey
        assert abs(out.std() / arr(image).std() - factor) < 0.03 * factor  # deviations from it times factor


def check_combination(attack, pipe):
    images = renders()
    errors = [mse(attack(images, s, seed=0), images) for s in (0.25, 0.5, 1.0)]
    assert 0 < errors[0] < errors[1] < errors[2], errors
    assert mean_psnr(attack(images, 1.0, seed=0), images) < 20  # at full strength, far from the input


def check_vae_regeneration(attack, pipe):
    images = renders(6)
    once, twice = attack(images, 1), attack(images, 2)
    assert 22 < mean_psnr(once, images) < 40  # changed, not destroyed
    assert mean_psnr(twice, images) < mean_psnr(once, images)  # every round trip loses more
    kept = [a == b for a, b in zip(shapes_and_colors(once), shapes_and_colors(images), strict=True)]
    assert sum(kept) >= 5, kept  # the judge still sees the same shape and colour


def check_purification(attack, pipe):
    images = renders(4)
    light, heavy = attack(images, 0.1), attack(images, 0.5)
    assert 22 < mean_psnr(light, images) < 40
    assert mean_psnr(heavy, images) < mean_psnr(light, images) - 2  # more of the schedule regenerated
    kept = [a[0] == b[0] for a, b in zip(shapes_and_colors(light), shapes_and_colors(images), strict=True)]
    assert sum(kept) >= 3, kept  # light purification keeps the shapes


def _noise(pipe, image: Image.Image) -> np.ndarray:
    x = torch.from_numpy(arr(image)).permute(2, 0, 1)[None].float()
    return recover_noise(pipe, x, steps=STEPS)[0].flatten().numpy()


def check_imprint(attack, pipe):
    g = torch.Generator().manual_seed(5)
    marked = pipe("a pink cross on a black background", num_inference_steps=STEPS, generator=g).images[0]
    z_marked, images = _noise(pipe, marked), renders(2)
    out = attack(images, 1.0, marked=marked, prompt="")
    for before, after in zip(images, out, strict=True):
        r_before = np.corrcoef(_noise(pipe, before), z_marked)[0, 1]
        r_after = np.corrcoef(_noise(pipe, after), z_marked)[0, 1]
        assert r_after > 0.7 and r_after > r_before + 0.4, (r_before, r_after)  # the marked noise, reused


def check_averaging(attack, pipe):
    clean = [im.point(lambda v: 16 + v * 7 // 8) for im in renders(4)]  # 16..239: marking does not clip
    pattern = np.where((np.indices((64, 64)).sum(0) % 2)[..., None], 12, -12)  # a checkerboard of +-12 levels
    marked = [Image.fromarray(np.clip(np.asarray(im, np.int32) + pattern, 0, 255).astype(np.uint8)) for im in clean]
    probe = flat(128)
    [forged] = attack([probe], 1.0, marked=marked, clean=clean)
    assert np.abs(np.asarray(forged, np.int32) - 128 - pattern).max() <= 2  # the pattern, added
    removed = attack(marked, -1.0, marked=marked, clean=clean)
    assert (
        np.mean(
            [
                np.abs(np.asarray(r, np.int32) - np.asarray(c, np.int32)).mean()
                for r, c in zip(removed, clean, strict=True)
            ]
        )
        < 1
    )


def check_surrogate_pgd(attack, pipe):
    """A toy mark (a +-6-level diagonal wave) and its real detector (correlation with the wave); the attacker's
    surrogate is a linear detector from their own renders, marked and not (difference of the class means);
    PGD against it must remove the real mark from other marked images within the L-infinity ball."""
    wave = 6 * np.sin(np.indices((64, 64)).sum(0) * 0.8)[..., None]

    def mark(images):
        return [
            Image.fromarray(np.clip(np.asarray(im, np.float64) + wave, 0, 255).round().astype(np.uint8))
            for im in images
        ]

    def detected(images):
        return [float(((arr(im) - arr(im).mean((0, 1))) * wave).mean()) > 0.006 for im in images]

    own = renders(8, seed=11)
    w = torch.from_numpy(np.mean([arr(m) - arr(c) for m, c in zip(mark(own), own, strict=True)], 0))
    w = w.permute(2, 0, 1).float()

    def surrogate(x):
        return ((x - x.mean((2, 3), keepdim=True)) * w).sum((1, 2, 3))

    targets = mark(renders(6, seed=12))
    assert all(detected(targets)) and not any(detected(renders(6, seed=12)))
    out = attack(targets, 8 / 255, surrogate=surrogate, iters=20)
    assert sum(detected(out)) <= 1  # the surrogate's gradient removes the real mark
    assert mean_psnr(out, targets) > 30  # within an 8/255 ball


PROPERTIES = {name: globals().get(f"check_{name}") for name in ATTACKS}


@pytest.fixture(scope="module")
def pipe():
    pipe = stablekit.load(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_every_attack_has_a_property():
    assert [name for name, check in PROPERTIES.items() if check is None] == []


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_does_what_it_states(name, pipe):
    fn, _ = ATTACKS[name]
    PROPERTIES[name](functools.partial(fn, pipe=pipe, steps=STEPS), pipe)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_identity_fails_the_property(name, pipe):
    with pytest.raises(AssertionError):
        PROPERTIES[name](identity, pipe)
