"""DoCo on the tiny pipeline: the concept-preserving gradient surgery, the adapter's layers and file, the trainer's
cache, and its refusals."""

import random

import pytest
import torch

import stablekit
from stablekit.errors import StablekitError
from stablekit.registry import load_adapter
from stablekit.safety import DoCo
from stablekit.safety.doco import (
    DoCoConfig,
    _clipped,
    _Deltas,
    _Trainer,
    cross_attention_kv,
    discriminator,
    predicted_x0,
    preserve_gradient,
)

PROMPTS = ["a red star on a gray background", "a striped red circle", "a red box on black"]
RETAIN = ["a blue star on a gray background", "a striped green circle", "a white box on black"]
FAST = dict(iterations=12, warmup=4, batch=2, ref_steps=2, lr=1e-2, dlr=1e-3)


@pytest.fixture(scope="module")
def trained(tiny_sd_path):
    pipe = stablekit.load(tiny_sd_path, device="cpu")
    return pipe, DoCo.train(pipe, "red", anchor="blue", prompts=PROMPTS, retain=RETAIN, progress=False, **FAST)


def test_preserve_gradient_removes_exactly_the_conflicting_component():
    g = torch.Generator().manual_seed(0)
    conflicts = 0
    for _ in range(50):
        grad, keep = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
        out = preserve_gradient(grad, keep)
        before, after = float((grad * keep).sum()), float((out * keep).sum())
        if before < 0:
            conflicts += 1
            assert abs(after) < 1e-4 * float(grad.norm() * keep.norm())  # the component along keep is gone
            assert torch.allclose(out - grad, (out - grad).flatten()[0] / keep.flatten()[0] * keep, atol=1e-5)
        else:
            assert torch.equal(out, grad)  # no conflict: untouched
    assert 10 < conflicts < 40
    half = preserve_gradient(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]), scale=0.5)
    assert torch.allclose(half, torch.tensor([1.0, -0.5]))


def test_the_trainers_unlearning_gradient_no_longer_fights_preservation(tiny_sd):
    """On the tiny pipeline's real gradients: some cross-attention tensors' adversarial gradient points against the
    preservation gradient; after the surgery none does (and the check fails without it)."""
    cfg = DoCoConfig(concepts=("red",), anchor="blue", **FAST)
    trainer = _Trainer(tiny_sd, cfg, PROMPTS, RETAIN, None)
    ref = trainer.references()
    deltas = _Deltas(trainer.layers)
    with torch.no_grad():
        for t in deltas.tensors.values():
            t.normal_(0, 0.05, generator=torch.Generator().manual_seed(t.numel()))
    disc = discriminator(4)
    grads = {}
    xt, t = trainer.noised(ref["anchor"][:2], torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(list(deltas.tensors.values()), lr=0.0)  # the deltas stay where they are
    with deltas:
        for surgery in (False, True):
            trainer.cfg = DoCoConfig(concepts=("red",), anchor="blue", surgery=surgery, retain_weight=0, **FAST)
            fake = predicted_x0(trainer.sch, xt, tiny_sd.unet(xt, t, ref["e_concept"][:2]).sample, t)
            trainer.generator_step(fake, ref, deltas, disc, opt, torch.Generator().manual_seed(2), random.Random(3))
            grads[surgery] = [p.grad.clone() for p in deltas.tensors.values()]
    keep = _keep_gradients(tiny_sd, trainer, ref, deltas)
    dots = {s: [float((a * b).sum()) for a, b in zip(grads[s], keep, strict=True)] for s in grads}
    assert min(dots[False]) < 0  # there is something to remove
    assert all(d >= -1e-6 * float(k.norm() * a.norm()) for d, k, a in zip(dots[True], keep, grads[True], strict=True))


def _keep_gradients(pipe, trainer, ref, deltas):
    """The (clipped) preservation gradient generator_step computes with the same draws."""
    rng, g = random.Random(3), torch.Generator().manual_seed(2)
    idx = rng.sample(range(len(trainer.retain)), min(trainer.cfg.batch, len(trainer.retain)))
    xr, tr = trainer.noised(ref["retain"][idx], g)
    with deltas:
        with torch.no_grad():
            deltas.on = False
            want = pipe.unet(xr, tr, ref["e_retain"][idx]).sample
            deltas.on = True
        loss = torch.nn.functional.mse_loss(pipe.unet(xr, tr, ref["e_retain"][idx]).sample, want)
        return _clipped(torch.autograd.grad(loss, list(deltas.tensors.values())), trainer.cfg.max_grad_norm)


def test_the_adapter_changes_only_the_cross_attention_keys_and_values(trained, tmp_path):
    pipe, edit = trained
    names = {f"{n}.weight" for n in cross_attention_kv(pipe.unet)}
    assert set(edit.deltas) == names and all(edit.deltas[n].abs().max() > 0 for n in names)
    before = {
        f"{c}.{n}": p.detach().clone()
        for c in ("unet", "text_encoder", "vae")
        for n, p in getattr(pipe, c).named_parameters()
    }
    path = tmp_path / "doco.safetensors"
    edit.save(path)
    loaded = load_adapter(path)  # through registry.ADAPTERS, as `generate --adapter` reads it
    assert isinstance(loaded, DoCo) and loaded.config == edit.config and loaded.config.anchor == "blue"
    with stablekit.use(pipe, loaded):
        now = {
            f"{c}.{n}": p.detach()
            for c in ("unet", "text_encoder", "vae")
            for n, p in getattr(pipe, c).named_parameters()
        }
        changed = {n for n in before if not torch.equal(before[n], now[n])}
        assert changed == names
    assert all(torch.equal(before[n], p) for n, p in now.items())  # detached bit for bit


def test_the_cache_resumes_to_the_same_adapter(tiny_sd, tmp_path):
    kw = dict(anchor="blue", prompts=PROMPTS, retain=RETAIN, progress=False, **(FAST | {"iterations": 6}))
    plain = DoCo.train(tiny_sd, "red", **kw)
    cached = DoCo.train(tiny_sd, "red", cache=tmp_path, **kw)
    again = DoCo.train(tiny_sd, "red", cache=tmp_path, **kw)  # read back, nothing left to train
    for edit in (cached, again):
        assert all(torch.equal(plain.deltas[n], edit.deltas[n]) for n in plain.deltas)


def test_bad_input_is_refused(tiny_sd, tmp_path):
    bad = [
        dict(concepts=("red",), anchor="red"),
        dict(concepts=("red", "star")),
        dict(concepts=("red",), warmup=300, iterations=300),
        dict(concepts=("red",), lr=0),
        dict(concepts=("",)),
    ]
    for kw in bad:
        with pytest.raises(StablekitError):
            DoCoConfig(**kw)
    with pytest.raises(StablekitError, match="must each contain"):
        DoCo.train(tiny_sd, "red", anchor="blue", prompts=["a blue star"], progress=False)
    other = tmp_path / "w.safetensors"
    stablekit.plugins.WeightEdit({"unet.x": torch.zeros(1)}, {"method": "uce"}).save(other)
    with pytest.raises(StablekitError, match="not a DoCo adapter"):
        DoCo.load(other)


def test_erase_doco_writes_an_adapter_that_generate_applies(tiny_sd_path, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from stablekit import cli

    def invoke(*args):
        return CliRunner().invoke(cli.cli, [str(a) for a in args])

    adapter, out = tmp_path / "doco.safetensors", tmp_path / "out"
    out.mkdir()
    args = ["--concept", "star", "--anchor", "circle", "--iterations", "2", "--model", tiny_sd_path]
    result = invoke("erase", "--method", "doco", *args, "-o", adapter)
    assert result.exit_code == 0 and result.stdout.endswith(f"{adapter}\n"), result.output
    assert load_adapter(adapter).config.anchor == "circle" and load_adapter(adapter).config.iterations == 2
    gen = ["generate", "a star", "--model", tiny_sd_path, "--size", "32x32", "--steps", "2"]
    assert invoke(*gen, "--adapter", adapter, "-o", out / "a.png").exit_code == 0
    assert Image.open(out / "a.png").text["adapter"] == adapter.name
    bad = {  # one line, exit 2, nothing written
        "unknown concept": (["--method", "doco", "--concept", "dragon"], "unknown concept 'dragon'"),
        "no anchor": (["--method", "doco", "--concept", "star", "--model", tiny_sd_path], "--anchor"),
        "anchor is concept": (
            [
                "--method",
                "doco",
                "--concept",
                "star",
                "--anchor",
                "star",
                "--iterations",
                "2",
                "--model",
                tiny_sd_path,
            ],
            "anchor",
        ),
        "spm option": (["--method", "doco", "--concept", "star", "--eta", "2"], "--eta"),
        "anchor elsewhere": (["--method", "uce", "--concept", "star", "--anchor", "circle"], "--anchor"),
    }
    for argv, message in bad.values():
        result = invoke("erase", *argv, "-o", out / "x.safetensors")
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and message in result.stderr, (
            result.output
        )
        assert len(result.stderr.strip().splitlines()) == 1 and not (out / "x.safetensors").exists()
