"""WOUAF: fingerprints baked into the VAE decoder's weights equal the per-sample modulation used in training,
detach restores the model, a read is scored against each user's fingerprint with a binomial p-value, the command
line runs keygen -> generate -> detect, and bad keys fail with one line."""

import json
import random

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy import stats

import stablekit
from stablekit import StablekitError, cli
from stablekit.latents import decode
from stablekit.provenance import WOUAF, Key, detect, make_key, watermark
from stablekit.provenance.wouaf import FingerprintNet, decoder_convs
from stablekit.provenance.wouaf_train import TrainConfig, augment, train

PROMPTS = ["a red star on a gray background"]


@pytest.fixture(scope="module")
def pipe():
    return stablekit.load(device="cpu")


def random_net(vae, bits=16) -> FingerprintNet:
    torch.manual_seed(0)
    net = FingerprintNet({n: c.in_channels for n, c in decoder_convs(vae).items()}, bits, 32, 32)
    for a in net.affine:
        torch.nn.init.normal_(a.weight, std=0.1)
    return net


def test_baked_weights_equal_the_modulated_decoder_and_detach_restores_it(tiny_sd):
    vae = tiny_sd.vae
    net = random_net(vae)
    phi = torch.randint(0, 2, (2, 16))
    z = torch.randn(2, 4, 4, 4)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        plain = vae.decode(z).sample
        with net.modulated(vae, phi):
            hooked = vae.decode(z).sample
    edits = [stablekit.WeightEdit(net.deltas(vae, p)) for p in phi]
    for i, edit in enumerate(edits):
        with stablekit.use(tiny_sd, edit), torch.no_grad():
            baked = vae.decode(z[i : i + 1]).sample
        assert torch.allclose(baked, hooked[i : i + 1], atol=1e-5)
    assert (hooked[0] - hooked[1]).abs().mean() > 1e-3 and (hooked - plain).abs().mean() > 1e-3
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())


def test_training_augments_with_straight_through_jpeg_and_learns(tiny_sd):
    cfg = TrainConfig(bits=8, width=16, images=16, iters=2, batch=4, window=4, jpeg=(50, 50), noise=0.0, blur=0.0)
    x = torch.rand(8, 3, 16, 16, requires_grad=True)
    y = augment(x, cfg, random.Random(0))
    assert y.shape == x.shape and not torch.equal(y, x)
    y.sum().backward()
    assert (x.grad > 0).float().mean() > 0.5  # gradients pass through JPEG and crops
    net, final = train(tiny_sd, cfg, log=lambda *_: None)
    assert 0 <= final["bit_acc"] <= 1 and final["mse"] > 0  # the modulation changed the images


def test_scores_attribute_a_perfect_read_to_its_user_with_a_binomial_p_value(pipe):
    from stablekit.provenance.detection import _decide

    marks = [WOUAF(make_key(pipe, "wouaf", seed=i)) for i in range(5)]
    read = (marks[3].fingerprint.float() * 2 - 1) * 5  # logits that read user 3's fingerprint exactly
    res = _decide("wouaf", [m.score(read, None) for m in marks], 1e-6, 0.0)
    assert res.user == 3 and res.detected and res.score == 1.0 and res.p_value == pytest.approx(5 * 2.0**-32)
    flipped = read.clone()
    flipped[:10] *= -1  # ten bits wrong: 22 of 32 match
    s = marks[3].score(flipped, None)
    assert s["matches"] == 22 and s["p_value"] == pytest.approx(float(stats.binom.sf(21, 32, 0.5)))
    g = torch.Generator().manual_seed(0)
    null = [marks[0].score(torch.randn(32, generator=g), None)["p_value"] for _ in range(400)]
    assert 0.005 <= sum(p <= 0.05 for p in null) / 400 <= 0.1  # random reads: p-values about uniform


def test_wouaf_is_a_weight_edit_not_an_initial_latents_plugin(pipe):
    mark = WOUAF(make_key(pipe, "wouaf", seed=0))
    z = torch.randn(1, 4, 16, 16)
    with stablekit.use(pipe, mark, watermark(make_key(pipe, "gaussian-shading", seed=0))):  # no conflict
        marked_image = decode(pipe, z)
    assert marked_image.tobytes() != decode(pipe, z).tobytes()
    assert len(mark.fingerprint) == mark.net.bits == 32


def test_bad_keys_and_models_fail_with_one_line(pipe, tiny_sd, tmp_path):
    key = make_key(pipe, "wouaf", seed=0)
    with pytest.raises(StablekitError, match="another model"):
        stablekit.use(tiny_sd, watermark(key))
    forged = Key("wouaf", {**key.params, "digest": "0" * 16}, key.secret)
    with pytest.raises(StablekitError, match="other fingerprint weights"):
        watermark(forged)
    with pytest.raises(StablekitError, match="not a WOUAF weights file"):
        (tmp_path / "w.safetensors").write_bytes(b"junk")
        make_key(pipe, "wouaf", weights=str(tmp_path / "w.safetensors"))
    with pytest.raises(StablekitError, match="64x64"):
        detect(pipe, Image.new("RGB", (32, 32)), key)


def test_cli_keygen_generate_detect_reads_the_fingerprint(tmp_path):
    def invoke(*args):
        return CliRunner().invoke(cli.cli, [str(a) for a in args])

    for u in (0, 1):
        assert invoke("keygen", "wouaf", "-o", tmp_path / f"u{u}.json", "--seed", u).exit_code == 0
    out = invoke("generate", PROMPTS[0], "-o", tmp_path / "a.png", "--steps", "8", "--key-file", tmp_path / "u1.json")
    assert out.exit_code == 0, out.output
    args = ["--key-file", tmp_path / "u0.json", "--key-file", tmp_path / "u1.json", "--fpr", "1e-3", "--json"]
    res = invoke("detect", tmp_path / "a.png", *args)
    assert res.exit_code == 0, res.output
    found = json.loads(res.output)[0]
    assert found["method"] == "wouaf" and found["stage"] == "reading" and len(found["message"]) == 32
    assert found["key_file"] in (str(tmp_path / "u0.json"), str(tmp_path / "u1.json"))
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    bad = invoke("detect", tmp_path / "small.png", "--key-file", tmp_path / "u0.json")
    assert bad.exit_code == 2 and bad.output.startswith("error:") and len(bad.output.splitlines()) == 1
