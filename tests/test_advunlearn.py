"""AdvUnlearn on the tiny pipeline: the inner attack, the outer erasure and retain terms, the adapter's file and its
refusals."""

import pytest
import torch
from conftest import make_tiny_sd, run

import stablekit
from stablekit.errors import StablekitError
from stablekit.pipeline import frozen
from stablekit.registry import load_adapter
from stablekit.safety import AdvUnlearn
from stablekit.safety.advunlearn import AdvUnlearnConfig, _LoRA, _Trainer, encoder_linears, replace_word
from stablekit.text import encode_ids, token_ids

PROMPTS = ["a red star on a gray background", "a striped red circle", "a red box on black"]
RETAIN = ["a blue star on a gray background", "a striped green circle", "a white box on black"]
FAST = dict(iterations=25, warmup=10, attack_steps=2, ref_steps=2, retain_batch=3, lr=1e-2)


def embeds(pipe, texts):
    return encode_ids(pipe, [token_ids(pipe, t) for t in texts])


@pytest.fixture(scope="module")
def trained(tiny_sd_path):
    pipe = stablekit.load(tiny_sd_path, device="cpu")
    return pipe, AdvUnlearn.train(pipe, "red", prompts=PROMPTS, retain=RETAIN, progress=False, **FAST)


def moved(pipe, edit, texts) -> float:
    """How far the edit moves the prompts' embeddings, relative to their norm."""
    before = embeds(pipe, texts)
    with stablekit.use(pipe, edit):
        return float((embeds(pipe, texts) - before).norm() / before.norm())


def test_the_retain_term_holds_the_retain_prompts(trained):
    pipe, edit = trained
    assert all(n.startswith("text_encoder.") for n in edit.deltas)  # the UNet is never edited
    free = AdvUnlearn.train(pipe, "red", prompts=PROMPTS, retain=RETAIN, progress=False, **FAST, retain_weight=0)
    assert moved(pipe, edit, PROMPTS) > 1e-3
    assert moved(pipe, edit, RETAIN) < 0.7 * moved(pipe, free, RETAIN)


def test_the_erasure_loss_falls(trained):
    """At fixed noisy latents, the edited encoder's prediction for the concept prompt is closer to ESD's target (away
    from the concept, past the prompt without it) than the original's."""
    pipe, edit = trained
    cfg = AdvUnlearnConfig(concepts=("red",), **FAST)
    ref = _Trainer(pipe, cfg, PROMPTS, RETAIN, None).references()
    g = torch.Generator().manual_seed(1)
    x = ref["concept"].repeat(4, 1, 1, 1)
    t = torch.randint(1000, (len(x),), generator=g)
    xt = pipe.scheduler.add_noise(x, torch.randn(x.shape, generator=g), t)
    with torch.no_grad():
        p = pipe.unet(xt, t, ref["e_concept"].repeat(4, 1, 1)).sample
        n = pipe.unet(xt, t, ref["e_anchor"].repeat(4, 1, 1)).sample
        target = n - (p - n)
        with stablekit.use(pipe, edit):
            q = pipe.unet(xt, t, embeds(pipe, PROMPTS).repeat(4, 1, 1)).sample
    assert (q - target).pow(2).mean() < 0.9 * (p - target).pow(2).mean()


def test_the_inner_attack_brings_the_concept_back(tiny_sd_path):
    """The adversary's PGD steps lower the diffusion loss of the concept image under the attacked prompt, and it
    replaces the concept word's token as well as the prefix."""
    pipe = stablekit.load(tiny_sd_path, device="cpu")
    cfg = AdvUnlearnConfig(concepts=("red",), **(FAST | {"attack_steps": 8, "attack_lr": 0.05}))
    trainer = _Trainer(pipe, cfg, PROMPTS, RETAIN, None)
    x0 = trainer.references()["concept"][:1]
    g = torch.Generator().manual_seed(0)
    lora = _LoRA({n.removeprefix("text_encoder."): m for n, m in trainer.linears.items()}, 4, g)

    def loss(slots, adv):
        from stablekit.latents import training_target

        gl = torch.Generator().manual_seed(5)
        xt, t, noise = trainer.noised(x0.repeat(16, 1, 1, 1), gl)
        with torch.no_grad():
            e = slots.encode(adv).expand(16, -1, -1)
            return torch.nn.functional.mse_loss(pipe.unet(xt, t, e).sample, training_target(trainer.sch, x0, noise, t))

    with frozen(pipe.unet, pipe.text_encoder), lora:
        state = {"adv": None}
        trainer.cfg = AdvUnlearnConfig(concepts=("red",), **(FAST | {"attack_steps": 1, "attack_lr": 1e-9}))
        slots, start = trainer.attack(0, x0, torch.Generator().manual_seed(3), state)
        trainer.cfg, state["adv"] = cfg, None
        slots, adv = trainer.attack(0, x0, torch.Generator().manual_seed(3), state)
        red = token_ids(pipe, "red")[1]
        assert len(slots.positions) == 2 and slots.row[slots.positions[1]] == red
        assert torch.equal(state["adv"], adv)
        assert loss(slots, adv) < loss(slots, start)


def test_save_load_is_exact_and_detach_restores(trained, tmp_path):
    pipe, edit = trained
    plain = run(pipe)
    with stablekit.use(pipe, edit):
        edited = run(pipe)
    assert not torch.equal(plain, edited) and torch.equal(run(pipe), plain)
    edit.save(tmp_path / "adv.safetensors")
    loaded = load_adapter(tmp_path / "adv.safetensors")
    assert isinstance(loaded, AdvUnlearn) and loaded.config == edit.config
    with stablekit.use(pipe, loaded):
        assert torch.equal(run(pipe), edited)


def test_refuses_another_model_and_bad_input(trained, tmp_path):
    pipe, edit = trained
    other = make_tiny_sd()
    with torch.no_grad():
        next(iter(encoder_linears(other.text_encoder).values())).weight.mul_(1.1)
    with pytest.raises(StablekitError, match="another model"):
        stablekit.use(other, edit)
    assert stablekit.attached(other) == []
    with pytest.raises(StablekitError, match="must each contain the concept"):
        AdvUnlearn.train(pipe, "red", prompts=["a blue star"], progress=False)
    for kw in (dict(concepts=[]), dict(concepts=["a", "b"]), dict(concepts=["a"], rank=0), dict(concepts=["a"], lr=0)):
        with pytest.raises(StablekitError):
            AdvUnlearnConfig(**kw)
    assert replace_word("a Red star, red", "red", "") == "a star,"


def test_cached_stages_give_the_uncached_result(tiny_sd_path, tmp_path):
    pipe = stablekit.load(tiny_sd_path, device="cpu")
    kw = dict(prompts=PROMPTS, retain=RETAIN, progress=False, **(FAST | {"iterations": 12, "warmup": 6}))
    plain = AdvUnlearn.train(pipe, "red", **kw)
    cached = AdvUnlearn.train(pipe, "red", cache=tmp_path, **kw)
    assert len(list(tmp_path.glob("*/*/checkpoint.pt"))) == 1 and len(list(tmp_path.glob("*/references.pt"))) == 1
    again = AdvUnlearn.train(pipe, "red", cache=tmp_path, **kw)  # read back, nothing left to train
    for edit in (cached, again):
        assert all(torch.equal(plain.deltas[n], edit.deltas[n]) for n in plain.deltas)


def test_erase_advunlearn_writes_an_adapter_that_generate_applies(tiny_sd_path, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from stablekit import cli

    def invoke(*args):
        return CliRunner().invoke(cli.cli, [str(a) for a in args])

    adapter, out = tmp_path / "adv.safetensors", tmp_path / "out"
    out.mkdir()
    args = ["--concept", "star", "--iterations", "2", "--lr", "1e-2", "--surrogate", "shape"]
    result = invoke("erase", "--method", "advunlearn", *args, "-o", adapter, "--model", tiny_sd_path)
    assert result.exit_code == 0 and result.stdout.endswith(f"{adapter}\n"), result.output
    assert load_adapter(adapter).config.surrogate == "shape" and load_adapter(adapter).config.iterations == 2
    gen = ["generate", "a star", "--model", tiny_sd_path, "--size", "32x32", "--steps", "2"]
    assert invoke(*gen, "--adapter", adapter, "-o", out / "a.png").exit_code == 0
    assert Image.open(out / "a.png").text["adapter"] == adapter.name
    bad = {  # one line, exit 2, nothing written
        "unknown concept": (["--concept", "dragon"], "unknown concept 'dragon'"),  # the default model's world
        "two concepts": (["--concept", "star", "--concept", "red", "--model", tiny_sd_path], "one --concept"),
        "spm option": (["--concept", "star", "--anchor-weight", "1", "--model", tiny_sd_path], "--anchor-weight"),
    }
    for argv, message in bad.values():
        result = invoke("erase", "--method", "advunlearn", *argv, "-o", out / "x.safetensors")
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (out / "x.safetensors").exists()
