"""The asymmetric decoder: its construction from a VAE, the shipped decoder keeping known pixels on the embedded
model where the plain decoder cannot, its training data, and one-line errors."""

import random

import numpy as np
import pytest
import torch

import stablekit
from stablekit.default_model import world
from stablekit.edit import asymmetric_decoder as ad
from stablekit.edit.asymmetric_decoder_train import MASK_KINDS, random_mask
from stablekit.errors import StablekitError
from stablekit.latents import decode, encode_image, load_image, psnr, to_tensor


@pytest.fixture(scope="module")
def embedded():
    pipe = stablekit.load(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def scenes():
    """Held-out one-object world scenes (seed 4242; training used 0): (image, its object mask)."""
    out = []
    for image, _, scene in world.dataset(4, 4242, two_prob=0):
        out.append((image, world.object_mask(scene.objects[0])))
    return out


def test_a_full_mask_on_the_initial_decoder_is_the_vae_decoder(tiny_sd):
    """Built from a VAE, the extra blocks are identities: with nothing known, the output is the VAE's exactly; a
    known pixel changes it (the conditional branch is wired in)."""
    vae = tiny_sd.vae
    model = ad.AsymmetricDecoder.from_vae(vae).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(x).latent_dist.mean
    with torch.no_grad():
        plain = vae.decode(z).sample
        assert torch.equal(model(z, x, torch.ones(2, 1, 32, 32)), plain)
        assert not torch.allclose(model(z, x, torch.zeros(2, 1, 32, 32)), plain)
    deeper = [len(b.resnets) for b in model.decoder.up_blocks]
    assert deeper == [len(b.resnets) + 1 for b in vae.decoder.up_blocks]  # heavier than the original


def test_known_pixels_come_back_closer_than_the_plain_decoder(embedded, scenes):
    """With every pixel known, the shipped decoder reproduces the input better than the VAE's round trip."""
    gains = []
    for image, _ in scenes:
        z = encode_image(embedded, load_image(embedded, image))
        plain = psnr(decode(embedded, z, output_type="pt"), to_tensor(image))
        kept = psnr(ad.decode_keeping(embedded, z, image, np.zeros((64, 64)), output_type="pt"), to_tensor(image))
        gains.append(kept - plain)
    assert min(gains) > 0 and np.mean(gains) > 2, gains


def test_the_background_outside_the_mask_is_kept_and_a_full_mask_decodes_like_the_vae(embedded, scenes):
    """Decoding a latent of *another* image under an object mask: outside the (dilated) mask the output is the
    source's; with an all-ones mask it is close to the plain decoder's output."""
    image, mask = scenes[0]
    other = scenes[1][0]
    z_other = encode_image(embedded, load_image(embedded, other))
    region = torch.nn.functional.max_pool2d(torch.from_numpy(mask)[None, None], 5, 1, 2)[0, 0] > 0.01
    out = ad.decode_keeping(embedded, z_other, image, region.float(), output_type="pt")
    plain = decode(embedded, z_other, output_type="pt")
    outside = ~region
    src = to_tensor(image)
    assert psnr(out[:, outside], src[:, outside]) > psnr(plain[:, outside], src[:, outside]) + 10
    full = ad.decode_keeping(embedded, z_other, image, np.ones((64, 64)), output_type="pt")
    assert psnr(full, plain) > 30


def test_random_masks_cover_every_kind():
    rng = random.Random(0)
    scene = world.sample_scene(rng, two_prob=0)
    masks = [random_mask(rng, scene) for _ in range(200)]
    assert all(m.shape == (world.SIZE, world.SIZE) and set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    fractions = [m.mean() for m in masks]
    assert fractions.count(1.0) > 10 and fractions.count(0.0) > 5 and sum(0 < f < 1 for f in fractions) > 100
    assert set(MASK_KINDS) == {"object", "box", "stroke", "ones", "zeros"}


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_bad_input_is_one_line(embedded, scenes):
    image, mask = scenes[0]
    z = encode_image(embedded, load_image(embedded, image))
    with pytest.raises(StablekitError) as e:
        ad.decode_keeping(embedded, z, image, np.zeros((32, 64)))
    assert "64x32" in one_line(e) and "64x64" in one_line(e)
    with pytest.raises(StablekitError) as e:
        ad.decode_keeping(embedded, z[..., :8, :8], image, mask)
    assert "do not fit" in one_line(e)
    with pytest.raises(StablekitError) as e:
        stablekit.edit.edit(embedded, image, "a", "b", decoder="jpeg")
    assert "unknown decoder" in one_line(e)
    with pytest.raises(StablekitError) as e:
        stablekit.edit.edit(embedded, image, "a", "b", mask=mask)
    assert "asymmetric" in one_line(e)
    with pytest.raises(StablekitError) as e:
        stablekit.edit.edit(embedded, image, "a", "b", decoder="asymmetric", mask=mask[:60])
    assert "mask is 64x60" in one_line(e)


def test_a_decoder_for_another_vae_is_refused(tiny_sd):
    with pytest.raises(StablekitError) as e:
        ad.load_decoder(tiny_sd)
    assert "another VAE" in one_line(e)


def test_an_edit_with_the_asymmetric_decoder_keeps_the_background(embedded, scenes):
    """A recolouring edit (4 DDIM steps): outside the object the asymmetric decoder's output is closer to the
    source than the plain decoder's, with the given mask and with the mask found from the latents."""
    image, mask = scenes[0]
    region = torch.nn.functional.max_pool2d(torch.from_numpy(mask)[None, None], 5, 1, 2)[0, 0] > 0.01
    kw = dict(method="ddim", steps=4)
    plain = to_tensor(stablekit.edit.edit(embedded, image, "a star", "a blue star", **kw))
    given = to_tensor(stablekit.edit.edit(embedded, image, "a star", "a blue star", decoder="asymmetric",
                                          mask=region.numpy(), **kw))  # fmt: skip
    src = to_tensor(image)
    outside = ~region
    assert psnr(given[:, outside], src[:, outside]) > psnr(plain[:, outside], src[:, outside]) + 10
