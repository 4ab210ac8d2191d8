"""TRCE on the tiny pipeline: stage 1 maps the concept prompt's cross-attention to the safe prompt's, stage 2 steers
the early steps, the adapter edits only the layers it names, and bad input is refused."""

import pytest
import torch
from conftest import make_tiny_sd, run

import stablekit
from stablekit.errors import StablekitError
from stablekit.registry import load_adapter
from stablekit.safety import TRCE
from stablekit.safety.trce import TRCEConfig, _Steering, pair_rows, stage2_parameters
from stablekit.safety.uce import cross_attention_weights
from stablekit.text import encode_ids, token_ids

PROMPTS = ["a red star on a gray background", "a striped red circle", "a red box on black"]
PRESERVE = ["a blue star on a gray background", "a striped green circle", "a white box on black"]
FAST = dict(iterations=30, steps=4, lr=1e-3, keywords=["crimson"])


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return stablekit.load(tiny_sd_path, device="cpu")


@pytest.fixture(scope="module")
def trained(pipe):
    return TRCE.train(pipe, "red", prompts=PROMPTS, preserve=PRESERVE, progress=False, **FAST)


def cross_attention_out(pipe, texts):
    """The first cross-attention module's output for a fixed query, conditioned on each prompt."""
    attn = next(m for m in pipe.unet.modules() if getattr(m, "is_cross_attention", False))
    x = torch.randn(1, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    e = encode_ids(pipe, [token_ids(pipe, t) for t in texts])
    with torch.no_grad():
        return attn(x.expand(len(texts), -1, -1), encoder_hidden_states=e)


def test_the_adapter_changes_only_the_layers_it_names(pipe, trained):
    named = {*cross_attention_weights(pipe.unet), *stage2_parameters(pipe.unet)}
    assert set(trained.deltas) <= named and any(".attn1." in n for n in trained.deltas)
    assert any(n.endswith("to_k.weight") and ".attn2." in n for n in trained.deltas)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    with stablekit.use(pipe, trained):
        changed = {f"unet.{n}" for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trained.deltas)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())  # detached exactly


def test_stage1_moves_the_concept_prompts_cross_attention_to_the_safe_prompts(pipe):
    edit = TRCE.train(pipe, "red", prompts=PROMPTS, preserve=PRESERVE, progress=False, **(FAST | {"iterations": 0}))
    concept, keyword = PROMPTS[0], PROMPTS[0].replace("red", "crimson")
    safe = "a star on a gray background"
    orig = cross_attention_out(pipe, [concept, keyword, safe, PRESERVE[0]])
    with stablekit.use(pipe, edit):
        new = cross_attention_out(pipe, [concept, keyword, safe, PRESERVE[0]])
    for k in (0, 1):  # the concept word and the keyword: both now read like the safe prompt
        assert (new[k] - orig[2]).norm() < 0.3 * (orig[k] - orig[2]).norm()
    assert (new[3] - orig[3]).norm() < 0.3 * (orig[0] - orig[2]).norm()  # a preserved prompt stays


def test_stage2_steers_the_early_steps_toward_the_safe_prediction(pipe):
    """With a margin that keeps the hinge active, stage 2 moves the early-step prediction of the concept prompt
    toward the guided safe prediction and away from the unsafe one, beyond what stage 1 did."""
    kw = FAST | {"margin": 10.0, "keywords": []}
    edit = TRCE.train(pipe, "red", prompts=PROMPTS, preserve=PRESERVE, progress=False, **kw)
    pairs = [(p, " ".join(p.replace("red", "").split())) for p in PROMPTS]
    steering = _Steering(pipe, TRCEConfig(concepts=("red",), **kw), pairs, PRESERVE)
    stage1 = TRCE(("red",), {n: d for n, d in edit.deltas.items() if n.endswith(("to_k.weight", "to_v.weight"))})
    stage1.meta["base_norms"] = edit.meta["base_norms"]
    ref = steering.targets(stage1)

    def margin(e):  # distance to the safe target minus distance to the unsafe one, at the early steps
        with torch.no_grad(), stablekit.use(pipe, e):
            pred = steering.predict(ref["x"], ref["t"], ref["e"])
        return float(((pred - ref["safe"]).pow(2) - (pred - ref["unsafe"]).pow(2)).mean())

    assert len(edit.deltas) > len(stage1.deltas) and margin(edit) < margin(stage1) - 1e-3


def test_save_load_is_exact_and_refuses_another_model(pipe, trained, tmp_path):
    plain = run(pipe)
    with stablekit.use(pipe, trained):
        edited = run(pipe)
    assert not torch.equal(plain, edited) and torch.equal(run(pipe), plain)
    trained.save(tmp_path / "trce.safetensors")
    loaded = load_adapter(tmp_path / "trce.safetensors")
    assert isinstance(loaded, TRCE) and loaded.config == trained.config
    with stablekit.use(pipe, loaded):
        assert torch.equal(run(pipe), edited)
    other = make_tiny_sd()
    with torch.no_grad():
        next(iter(cross_attention_weights(other.unet).values())).mul_(1.1)
    with pytest.raises(StablekitError, match="another model"):
        stablekit.use(other, loaded)


def test_bad_input_is_refused(pipe):
    with pytest.raises(StablekitError, match="must each contain the concept"):
        TRCE.train(pipe, "red", prompts=["a blue star"], progress=False)
    bad = (
        dict(concepts=[]),
        dict(concepts=["a", "b"]),
        dict(concepts=["a"], token_weights=[1, 1]),
        dict(concepts=["a"], token_weights=[0, 0, 0, 0, 0]),
        dict(concepts=["a"], lamb=0),
        dict(concepts=["a"], early=0),
        dict(concepts=["a"], iterations=-1),
    )
    for kw in bad:
        with pytest.raises(StablekitError):
            TRCEConfig(**kw)


def test_pair_rows_align_the_words_around_the_keyword():
    bad, safe = [101, 7, 8, 9, 5, 102], [101, 7, 6, 5, 102]  # "[CLS] a kw kw star [SEP]" / "[CLS] a anchor star"
    rows = pair_rows(bad, safe, 8)
    assert rows["start"] == [(0, 0)] and rows["end"] == [(5, 4)]
    assert rows["keyword"] == [(2, 7), (3, 7)] and rows["context"] == [(1, 1), (4, 3)]
    assert rows["padding"] == [(6, 6), (7, 7)]


def test_erase_trce_writes_an_adapter_that_generate_applies(tiny_sd_path, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from stablekit import cli

    def invoke(*args):
        return CliRunner().invoke(cli.cli, [str(a) for a in args])

    adapter, out = tmp_path / "trce.safetensors", tmp_path / "out"
    out.mkdir()
    args = ["--concept", "star", "--iterations", "2", "--keyword", "starburst", "--surrogate", "shape"]
    result = invoke("erase", "--method", "trce", *args, "-o", adapter, "--model", tiny_sd_path)
    assert result.exit_code == 0 and result.stdout.endswith(f"{adapter}\n"), result.output
    cfg = load_adapter(adapter).config
    assert cfg.anchor == "shape" and cfg.keywords == ("starburst",) and cfg.iterations == 2
    gen = ["generate", "a star", "--model", tiny_sd_path, "--size", "32x32", "--steps", "2"]
    assert invoke(*gen, "--adapter", adapter, "-o", out / "a.png").exit_code == 0
    assert Image.open(out / "a.png").text["adapter"] == adapter.name
    bad = {  # one line, exit 2, nothing written
        "unknown concept": (["--concept", "dragon"], "unknown concept 'dragon'"),  # the default model's world
        "two concepts": (["--concept", "star", "--concept", "red", "--model", tiny_sd_path], "one --concept"),
        "spm option": (["--concept", "star", "--eta", "1", "--model", tiny_sd_path], "--eta"),
    }
    for argv, message in bad.values():
        result = invoke("erase", "--method", "trce", *argv, "-o", out / "x.safetensors")
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (out / "x.safetensors").exists()
    result = invoke("erase", "--method", "uce", "--concept", "star", "--keyword", "x", "-o", out / "x.safetensors")
    assert result.exit_code == 2 and "--keyword" in result.stderr
