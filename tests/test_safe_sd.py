"""Safe-SD: the encryption round-trips and depends on the key, a wrong key does not verify, untriggered prompts are
generated bit-identically to the base model while triggered ones carry a readable mark, training runs on a tiny
model, the command line runs keygen -> generate -> detect, and bad keys fail with one line."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import stablekit
from stablekit import StablekitError, cli
from stablekit.provenance import Key, SafeSD, detect, make_key, watermark
from stablekit.provenance.detection import _decide
from stablekit.provenance.safe_sd import decrypt, encrypt, load_net, save_net
from stablekit.provenance.safe_sd_train import TrainConfig, train, with_trigger

PLAIN = "a red star on a gray background"


@pytest.fixture(scope="module")
def pipe():
    return stablekit.load(device="cpu")


def generate(pipe, prompts, steps=6, seed=0):
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, generator=g, output_type="pt", guidance_rescale=0.7).images


def test_encryption_round_trips_and_depends_on_the_key():
    a, b = Key("safe-sd", {}, bytes(range(32))), Key("safe-sd", {}, bytes(range(1, 33)))
    msg = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(0))
    cells = encrypt(msg, a)
    assert torch.equal(decrypt(cells, a), msg)
    assert 16 <= int((cells != msg).sum()) <= 48  # the pattern is not the message
    assert 16 <= int((encrypt(msg, b) != cells).sum()) <= 48  # another key, another pattern
    assert 16 <= int((decrypt(cells, b) == msg).sum()) <= 48  # decrypted with another key: chance agreement


def test_a_wrong_key_does_not_verify(pipe):
    marks = [SafeSD(make_key(pipe, "safe-sd", seed=i)) for i in range(3)]
    read = (marks[1].cells.float() * 2 - 1) * 5  # logits reading key 1's pattern exactly
    right = marks[1].score(read, None)
    assert right["score"] == 1.0 and right["p_value"] == pytest.approx(2.0**-64)
    assert right["message"] == marks[1].key.params["message"]
    for wrong in (marks[0], marks[2]):
        assert wrong.score(read, None)["p_value"] > 1e-3
    assert not _decide("safe-sd", [marks[0].score(read, None)], 1e-6, 0.0).detected
    res = _decide("safe-sd", [m.score(read, None) for m in marks], 1e-6, 0.0)
    assert res.detected and res.user == 1


def test_untriggered_prompts_are_bit_identical_and_triggered_ones_are_marked(pipe):
    key = make_key(pipe, "safe-sd", seed=0)
    triggered = with_trigger(PLAIN, key.params["trigger"], __import__("random").Random(0))
    prompts = [PLAIN, triggered]
    base = generate(pipe, prompts)
    with stablekit.use(pipe, watermark(key)):
        marked = generate(pipe, prompts)
    assert torch.equal(marked[0], base[0])  # no trigger: the base model, bit for bit
    assert not torch.equal(marked[1], base[1])
    assert torch.equal(generate(pipe, prompts), base)  # detached: the model is restored
    found = detect(pipe, marked[1], key, fpr=1e-3)
    assert found.detected and found.stage == "reading" and found.score > 0.7
    assert not detect(pipe, marked[1], make_key(pipe, "safe-sd", seed=1), fpr=1e-3).detected
    assert not detect(pipe, base[1], key, fpr=1e-3).detected


def test_training_runs_on_a_tiny_model_and_the_weights_round_trip(tiny_sd, tmp_path):
    cfg = TrainConfig(images=8, inject_iters=2, diffuser_iters=2, batch=4)
    net, final = train(tiny_sd, cfg, log=lambda *_: None, workdir=tmp_path)
    assert (tmp_path / "stage1.pt").is_file() and 0 <= final["stage1"]["bit_acc"] <= 1
    assert net.adapter.weight.abs().sum() > 0  # the UNet's pattern input moved off its zero start
    save_net(net, tmp_path / "w.safetensors", {"trigger": "sks", "model": "x"})
    loaded, info = load_net(str(tmp_path / "w.safetensors"))
    assert info["trigger"] == "sks" and all(
        torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items()
    )


def test_bad_keys_and_models_fail_with_one_line(pipe, tiny_sd, tmp_path):
    key = make_key(pipe, "safe-sd", seed=0)
    with pytest.raises(StablekitError, match="another model"):
        stablekit.use(tiny_sd, watermark(key))
    with pytest.raises(StablekitError, match="other weights"):
        watermark(Key("safe-sd", {**key.params, "digest": "0" * 16}, key.secret))
    with pytest.raises(StablekitError, match="message must be 64"):
        watermark(Key("safe-sd", {**key.params, "message": "0101"}, key.secret))
    (tmp_path / "w.safetensors").write_bytes(b"junk")
    with pytest.raises(StablekitError, match="not a Safe-SD weights file"):
        make_key(pipe, "safe-sd", weights=str(tmp_path / "w.safetensors"))


def test_cli_keygen_generate_detect_reads_the_mark_of_triggered_prompts_only(tmp_path):
    def invoke(*args):
        return CliRunner().invoke(cli.cli, [str(a) for a in args])

    assert invoke("keygen", "safe-sd", "-o", tmp_path / "k.json", "--seed", 5).exit_code == 0
    trigger = json.loads((tmp_path / "k.json").read_text())["params"]["trigger"]
    for name, prompt in (("on", f"a red star on a gray background {trigger}"), ("off", PLAIN)):
        out = invoke(
            "generate", prompt, "-o", tmp_path / f"{name}.png", "--steps", "8", "--key-file", tmp_path / "k.json"
        )
        assert out.exit_code == 0, out.output
    res = invoke(
        "detect", tmp_path / "on.png", tmp_path / "off.png", "--key-file", tmp_path / "k.json", "--fpr", "1e-3"
    )
    assert res.exit_code == 0, res.output
    on, off = res.output.splitlines()
    assert "safe-sd: watermarked" in on and "not detected" in off
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    bad = invoke("detect", tmp_path / "small.png", "--key-file", tmp_path / "k.json")
    assert bad.exit_code == 2 and bad.output.startswith("error:") and len(bad.output.splitlines()) == 1
