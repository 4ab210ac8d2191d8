"""Plugins from the command line: `generate --accel/--scheduler NAME:k=v`, `keygen`, `generate --watermark`,
`detect`; one-line errors for bad specs and key files."""

import json
import stat

import numpy as np
import pytest
from click.testing import CliRunner
from diffusers import DDIMScheduler
from PIL import Image

import stablekit
from stablekit import CATALOGUE, cli
from stablekit.registry import parse

METHODS = ("tree-ring", "gaussian-shading", "seal")


@pytest.fixture
def out_dir(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def invoke(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args])


@pytest.fixture
def generate(tiny_sd_path, out_dir):
    def run(*args, output="img.png"):
        return invoke(
            "generate",
            "a red star",
            "-o",
            out_dir / output,
            "--model",
            tiny_sd_path,
            "--size",
            "32x32",
            "--steps",
            "3",
            *args,
        )

    return run


@pytest.fixture(scope="module")
def keys(tiny_sd_path, tmp_path_factory):
    """One seeded key file per method, made by `stablekit keygen`, and a second gaussian-shading key."""
    d = tmp_path_factory.mktemp("keys")
    made = {}
    for name, spec, seed in [*((m, m, 1) for m in METHODS), ("other", "gaussian-shading:channel_copies=2", 2)]:
        result = invoke("keygen", spec, "-o", d / f"{name}.json", "--model", tiny_sd_path, "--seed", seed)
        assert result.exit_code == 0, result.output
        assert result.stdout == f"{d / name}.json\n"
        made[name] = d / f"{name}.json"
    return made


def pixels(path) -> bytes:
    return np.asarray(Image.open(path).convert("RGB")).tobytes()


def one_line_error(result, out_dir, *fragments):
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and all(f in line for f in fragments), line
    assert result.stdout == "" and list(out_dir.iterdir()) == []


def test_deepcache_is_recorded_and_changes_pixels_only_when_it_skips(generate, out_dir):
    for name, args in [
        ("plain.png", []),
        ("dc2.png", ["--accel", "deepcache:interval=2"]),
        ("dc1.png", ["--accel", "deepcache:interval=1"]),
    ]:
        result = generate(*args, output=name)
        assert result.exit_code == 0, result.output
    text = Image.open(out_dir / "dc2.png").text
    assert text["plugins"] == "deepcache" and text["accel"] == "deepcache:interval=2"
    assert pixels(out_dir / "dc2.png") != pixels(out_dir / "plain.png")  # step 1 of 3 reuses step 0's features
    assert pixels(out_dir / "dc1.png") == pixels(out_dir / "plain.png")  # a key step every step: nothing skipped


def test_scheduler_parameters_reach_its_config(generate, out_dir, tiny_sd_path, monkeypatch):
    monkeypatch.setitem(
        CATALOGUE["scheduler"], "later-ddim", DDIMScheduler
    )  # a name added after import, as sampling/ will
    pipe = stablekit.load(tiny_sd_path, device="cpu", scheduler="later-ddim:timestep_spacing=trailing")
    assert type(pipe.scheduler) is DDIMScheduler and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.steps_offset == 1  # the rest of the model's config is kept
    assert generate("--scheduler", "later-ddim", output="leading.png").exit_code == 0
    result = generate(
        "--scheduler",
        "ddim:timestep_spacing=trailing",
        "--accel",
        "feature-inheritance:blocks=[mid_block],interval=2",
        output="trailing.png",
    )
    assert result.exit_code == 0, result.output
    text = Image.open(out_dir / "trailing.png").text
    assert text["scheduler"] == "ddim:timestep_spacing=trailing" and text["plugins"] == "feature-inheritance"
    assert pixels(out_dir / "trailing.png") != pixels(out_dir / "leading.png")


def test_spec_values_follow_annotations_and_defaults():
    assert parse("deepcache:interval=4,center=1,schedule=[0,2]", CATALOGUE["accel"], "accel")[2] == {
        "interval": 4,
        "center": 1.0,
        "schedule": [0, 2],
    }
    assert parse("feature-inheritance:blocks=mid_block", CATALOGUE["accel"], "accel")[2] == {"blocks": ["mid_block"]}
    assert parse(" encoder-propagation : interval = none ", CATALOGUE["accel"], "accel")[2] == {"interval": None}
    assert parse("dpm++:use_karras_sigmas=yes,solver_order=3", CATALOGUE["scheduler"], "scheduler")[2] == {
        "use_karras_sigmas": True,
        "solver_order": 3,
    }
    assert type(parse("deepcache:center=1", CATALOGUE["accel"], "accel")[2]["center"]) is float


BAD_SPECS = {
    "unknown accel": (["--accel", "warp"], ["unknown accel 'warp'", "deepcache, encoder-propagation, feature-inh"]),
    "unknown parameter": (["--accel", "deepcache:intervall=2"], ["no parameter 'intervall'", "interval=3, branch=0"]),
    "not an int": (["--accel", "deepcache:interval=fast"], ["interval='fast' is not an int", "default 3"]),
    "float for int": (["--accel", "deepcache:interval=2.5"], ["is not an int"]),
    "not k=v": (["--accel", "deepcache:interval"], ["'interval' is not k=v"]),
    "set twice": (["--accel", "deepcache:branch=0,branch=1"], ["sets branch twice"]),
    "rejected by the plugin": (["--accel", "deepcache:interval=0"], ["interval must be at least 1"]),
    "conflict": (["--accel", "deepcache", "--accel", "encoder-propagation"], ["conflicts with", "attach only one"]),
    "unknown scheduler": (["--scheduler", "warp:x=1"], ["unknown scheduler 'warp'", "ddim"]),
    "scheduler parameter": (["--scheduler", "ddim:eta=1"], ["scheduler ddim has no parameter 'eta'"]),
    "scheduler bool": (["--scheduler", "ddim:clip_sample=maybe"], ["is not true or false"]),
    "scheduler choice": (["--scheduler", "ddim:timestep_spacing=odd"], ["'trailing'"]),
}


@pytest.mark.parametrize("args, fragments", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_spec_one_line_exit_2_no_file(generate, out_dir, args, fragments):
    one_line_error(generate(*args), out_dir, *fragments)


@pytest.mark.parametrize("method", METHODS)
def test_keygen_generate_detect_round_trip(generate, out_dir, keys, tiny_sd_path, method):
    assert stat.S_IMODE(keys[method].stat().st_mode) == 0o600
    result = generate("--key-file", keys[method])  # the key's method is implied
    assert result.exit_code == 0, result.output
    path = out_dir / "img.png"
    assert Image.open(path).text["plugins"] == method
    base = ["detect", path, "--model", tiny_sd_path, "--steps", "3"]
    result = invoke(*base, "--key-file", keys[method])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{path}: {method}: ") and "score" in result.stdout and "p-value" in result.stdout
    assert ("message" in result.stdout) == (method == "gaussian-shading")
    other = ["--key-file", keys["other"]] if method == "gaussian-shading" else []  # two keys: which one matched
    result = invoke(*base, "--key-file", keys[method], *other, "--json")
    assert result.exit_code == 0, result.output
    [found] = json.loads(result.stdout)
    assert found["image"] == str(path) and found["method"] == method and found["fpr"] == 1e-6
    assert isinstance(found["detected"], bool) and 0 <= found["p_value"] <= 1 and found["seconds"] > 0
    assert isinstance(found["score"], float)
    if method == "gaussian-shading":
        assert found["user"] in (0, 1) and found["key_file"] == str([keys[method], keys["other"]][found["user"]])
        assert set(found["message"]) <= {"0", "1"} and len(found["message"]) >= 64
    else:
        assert found["user"] is None and found["key_file"] == str(keys[method])


def test_key_errors_one_line_exit_2_no_file(generate, out_dir, keys, tiny_sd_path, tmp_path):
    (tmp_path / "corrupt.json").write_text('{"format": "stablekit-watermark-key"')
    (tmp_path / "wrong.json").write_text(keys["tree-ring"].read_text().replace('"radius"', '"radios"'))
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    detect = ["detect", "--model", tiny_sd_path, "--steps", "3"]
    cases = [
        (generate("--watermark", "seal", "--key-file", keys["tree-ring"]), ["holds a tree-ring key, not seal"]),
        (generate("--watermark", "seal"), ["needs --key-file"]),
        (generate("--key-file", tmp_path / "corrupt.json"), ["not a valid stablekit watermark key file"]),
        (generate("--key-file", tmp_path / "wrong.json"), ["key is corrupt"]),
        (generate("--key-file", tmp_path / "missing.json"), ["does not exist", "stablekit keygen"]),
        (generate("--key-file", keys["tree-ring"], "--size", "64x64"), ["is for 32x32 images"]),
        (invoke(*detect, tmp_path / "big.png", "--key-file", keys["seal"]), ["64x64 but the key is for 32x32"]),
        (invoke(*detect, tmp_path / "big.png", "--key-file", tmp_path / "corrupt.json"), ["not a valid"]),
        (
            invoke(*detect, tmp_path / "big.png", "--key-file", keys["seal"], "--key-file", keys["tree-ring"]),
            ["give keys of one method and size"],
        ),
        (invoke(*detect, tmp_path / "big.png", "--key-file", keys["seal"], "--fpr", "0"), ["--fpr 0"]),
        (invoke("keygen", "tree-ring", "-o", keys["seal"]), ["exists", "--force"]),
        (invoke("keygen", "tree-ring:radius=99", "-o", out_dir / "k.json", "--model", tiny_sd_path), ["radius"]),
        (invoke("keygen", "tree-ring:size=9", "-o", out_dir / "k.json"), ["no parameter 'size'", "radius=none"]),
        (invoke("keygen", "ring", "-o", out_dir / "k.json"), ["unknown watermark method 'ring'", "seal"]),
        (invoke("keygen", "seal", "-o", out_dir / "k.txt"), ["must be a .json file"]),
    ]
    for result, fragments in cases:
        one_line_error(result, out_dir, *fragments)
    assert json.loads(keys["seal"].read_text())["method"] == "seal"  # not overwritten


def test_guard_is_recorded_and_changes_the_image(generate, out_dir):
    for name, args in [("plain.png", []), ("guarded.png", ["--guard", "safree:concepts=[star],detect=false"])]:
        result = generate(*args, output=name)
        assert result.exit_code == 0, result.output
    text = Image.open(out_dir / "guarded.png").text
    assert text["plugins"] == "safree" and text["guard"] == "safree:concepts=[star],detect=false"
    assert pixels(out_dir / "guarded.png") != pixels(out_dir / "plain.png")


def test_unknown_guard_is_one_line(generate, out_dir):
    one_line_error(generate("--guard", "nope"), out_dir, "nope", "safree")
    assert not list(out_dir.iterdir())


def test_erase_writes_an_adapter_that_generate_applies(generate, out_dir, tiny_sd_path, tmp_path):
    adapter = tmp_path / "no-star.safetensors"
    result = invoke("erase", "--concept", "star", "--preserve", "circle", "-o", adapter, "--model", tiny_sd_path)
    assert result.exit_code == 0 and result.stdout == f"{adapter}\n", result.output
    assert generate(output="plain.png").exit_code == 0
    result = generate("--adapter", adapter, output="erased.png")
    assert result.exit_code == 0, result.output
    assert Image.open(out_dir / "erased.png").text["adapter"] == adapter.name
    assert pixels(out_dir / "erased.png") != pixels(out_dir / "plain.png")


def test_erase_spm_writes_a_membrane_that_generate_applies(generate, out_dir, tiny_sd_path, tmp_path, monkeypatch):
    from stablekit.registry import load_adapter
    from stablekit.safety import SPM

    seen, train = {}, SPM.train.__func__
    monkeypatch.setattr(SPM, "train", classmethod(lambda cls, *a, **kw: seen.update(kw) or train(cls, *a, **kw)))
    membrane = tmp_path / "spm-star.safetensors"
    result = invoke(
        "erase",
        "--method",
        "spm",
        "--concept",
        "star",
        "--iterations",
        "3",
        "--lr",
        "1e-3",
        "--anchor-weight",
        "1",
        "--eta",
        "2",
        "--surrogate",
        "shape",
        "-o",
        membrane,
        "--model",
        tiny_sd_path,
    )
    assert result.exit_code == 0 and result.stdout.endswith(f"{membrane}\n"), result.output
    assert seen == {"iterations": 3, "lr": 1e-3, "anchor_weight": 1.0, "eta": 2.0, "surrogate": "shape"}
    assert isinstance(load_adapter(membrane), SPM)
    assert generate(output="plain.png").exit_code == 0
    assert generate("--adapter", membrane, output="spm.png").exit_code == 0
    assert pixels(out_dir / "spm.png") != pixels(out_dir / "plain.png")
    assert generate("--adapter", membrane, "--spm-multiplier", "0", output="spm0.png").exit_code == 0
    assert pixels(out_dir / "spm0.png") == pixels(out_dir / "plain.png")  # a membrane at strength 0 is no membrane


def test_erase_and_adapter_errors_are_one_line(generate, out_dir, tiny_sd_path, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    one_line_error(generate("--adapter", bad), out_dir, "bad.safetensors")
    one_line_error(generate("--adapter", tmp_path / "missing.safetensors"), out_dir, "does not exist")
    one_line_error(generate("--spm-multiplier", "2"), out_dir, "--adapter")

    def erase(*args):
        return invoke("erase", *args, "-o", tmp_path / "a.safetensors", "--model", tiny_sd_path)

    one_line_error(erase("--method", "spm", "--concept", "star", "--concept", "red"), out_dir, "one --concept")
    one_line_error(erase("--concept", " "), out_dir, "--concept")
    one_line_error(erase("--concept", "star", "--surrogate", "shape"), out_dir, "--surrogate")
    one_line_error(erase("--method", "spm", "--concept", "star", "--eta", "0"), out_dir, "--eta")
    assert not list(out_dir.iterdir()) and not (tmp_path / "a.safetensors").exists()


def test_audit_reports_before_and_after_attack(out_dir, tmp_path):
    result = invoke(
        "audit",
        "--concept",
        "red",
        "--defense",
        "negative",
        "--prompts",
        "3",
        "--steps",
        "2",
        "--json",
        out_dir / "audit.json",
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("red under negative")]
    assert len(lines) == 2 and "before attack" in lines[0] and "after arithmetic" in lines[1]
    res = json.loads((out_dir / "audit.json").read_text())
    assert res["direct"]["n"] == 3 and res["attack_arithmetic"]["pre_attack"] == res["direct"]
    assert set(res["attack_arithmetic"]["by_composition"]) == {"negated", "word", "paraphrases"}


def test_audit_errors_are_one_line(out_dir, tmp_path):
    one_line_error(invoke("audit", "--concept", "nudity"), out_dir, "unknown concept", "star")
    one_line_error(invoke("audit", "--concept", "star", "--attack", "nope"), out_dir, "unknown attack", "arithmetic")
    one_line_error(
        invoke("audit", "--concept", "star", "--defense", "spm", "--adapter", tmp_path / "no.safetensors"),
        out_dir,
        "does not exist",
    )
    one_line_error(
        invoke("audit", "--concept", "star", "--defense", "uce", "--adapter", tmp_path / "x"), out_dir, "--defense spm"
    )
    one_line_error(
        invoke("audit", "--concept", "star", "--defense", "safree", "--spm-multiplier", "2"), out_dir, "--defense spm"
    )
