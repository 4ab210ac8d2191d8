"""The stablekit command line: generate (PNG + metadata, seeds, errors) and bench dispatch."""

from importlib.metadata import entry_points

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import stablekit
import stablekit.output
from stablekit import cli


@pytest.fixture
def out_dir(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@pytest.fixture
def generate(tiny_sd_path, out_dir):
    """Run `stablekit generate` on the tiny model at 32x32 with 2 steps; extra args go last."""

    def invoke(*args, prompt=("a red star",), output="img.png"):
        base = [
            "generate",
            *prompt,
            "-o",
            str(out_dir / output),
            "--model",
            str(tiny_sd_path),
            "--size",
            "32x32",
            "--steps",
            "2",
        ]
        return CliRunner().invoke(cli.cli, base + list(args))

    return invoke


def pixels(path) -> bytes:
    return np.asarray(Image.open(path).convert("RGB")).tobytes()


def test_generate_writes_png_with_metadata(generate, out_dir, tiny_sd_path):
    result = generate("--seed", "3", "--negative", "blurry", "--guidance", "5")
    assert result.exit_code == 0, result.output
    path = out_dir / "img.png"
    assert result.stdout.splitlines() == [str(path)]
    assert sorted(p.name for p in out_dir.iterdir()) == ["img.png"]  # no temp file left behind
    image = Image.open(path)
    assert image.size == (32, 32)
    assert image.text == {
        "prompt": "a red star",
        "seed": "3",
        "negative": "blurry",
        "steps": "2",
        "guidance": "5.0",
        "guidance_rescale": "0.0",
        "size": "32x32",
        "scheduler": "ddim",
        "model": str(tiny_sd_path),
        "plugins": "",
        "dtype": "float32",
        "stablekit": stablekit.__version__,
    }


def test_native_size_is_the_default(out_dir, tiny_sd_path):
    result = CliRunner().invoke(
        cli.cli,
        [
            "generate",
            "x",
            "-o",
            str(out_dir / "a.png"),
            "--model",
            str(tiny_sd_path),
            "--steps",
            "1",
            "--scheduler",
            "euler",
        ],
    )
    assert result.exit_code == 0, result.output
    image = Image.open(out_dir / "a.png")
    assert image.size == (32, 32)  # tiny UNet sample_size 16 x vae_scale_factor 2
    assert image.text["scheduler"] == "euler"


def test_same_seed_same_pixels_other_seed_differs(generate, out_dir):
    for name, seed in [("a.png", "7"), ("b.png", "7"), ("c.png", "8")]:
        assert generate("--seed", seed, output=name).exit_code == 0
    assert pixels(out_dir / "a.png") == pixels(out_dir / "b.png")
    assert pixels(out_dir / "a.png") != pixels(out_dir / "c.png")


def test_n_images_each_reproducible_alone(generate, out_dir):
    result = generate("--n", "2", "--seed", "5")
    assert result.exit_code == 0, result.output
    paths = [out_dir / "img-0.png", out_dir / "img-1.png"]
    assert result.stdout.splitlines() == [str(p) for p in paths]
    assert [Image.open(p).text["seed"] for p in paths] == ["5", "6"]
    assert pixels(paths[0]) != pixels(paths[1])
    assert generate("--seed", "6", output="alone.png").exit_code == 0
    assert pixels(paths[1]) == pixels(out_dir / "alone.png")


def test_several_prompts_one_file_each(generate, out_dir):
    result = generate("--steps", "1", prompt=("a red star", "a blue disc"))
    assert result.exit_code == 0, result.output
    assert [Image.open(out_dir / f"img-{i}.png").text["prompt"] for i in range(2)] == ["a red star", "a blue disc"]


BAD = {
    "missing model": ["--model", "{tmp}/no-such-model"],
    "non-model folder": ["--model", "{tmp}"],
    "size not multiple of 8": ["--size", "30x32"],
    "size not WxH": ["--size", "large"],
    "zero steps": ["--steps", "0"],
    "negative steps": ["--steps", "-3"],
    "steps not a number": ["--steps", "many"],
    "unknown scheduler": ["--scheduler", "warp-drive"],
    "output folder missing": ["-o", "{tmp}/nowhere/img.png"],
    "output not png": ["-o", "{tmp}/out/img.jpg"],
    "negative guidance": ["--guidance", "-1"],
    "guidance rescale out of range": ["--guidance-rescale", "2"],
    "zero images": ["--n", "0"],
}


@pytest.mark.parametrize("args", BAD.values(), ids=BAD.keys())
def test_bad_input_one_error_line_exit_2_no_file(generate, out_dir, args):
    result = generate(*[a.format(tmp=out_dir.parent) for a in args])
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert result.stdout == ""
    assert list(out_dir.iterdir()) == []
    assert not (out_dir.parent / "nowhere").exists()


@pytest.mark.parametrize("prompt", [(), ("",), ("", "  ")], ids=["none", "empty", "blank"])
def test_empty_prompt_is_an_error(generate, out_dir, prompt):
    result = generate(prompt=prompt)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no prompt") and len(result.stderr.splitlines()) == 1
    assert list(out_dir.iterdir()) == []


def test_unexpected_error_one_line_exit_1_or_traceback_in_debug(generate, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(stablekit.output, "load", broken)  # where the command line loads its pipeline
    result = generate()
    assert result.exit_code == 1 and result.stderr == "error: RuntimeError: boom\n"
    monkeypatch.setenv("STABLEKIT_DEBUG", "1")
    assert isinstance(generate().exception, RuntimeError)


def test_entry_point_prints_one_line_and_exits_2(capfd):
    [ep] = [ep for ep in entry_points(group="console_scripts") if ep.name == "stablekit"]
    assert ep.value == "stablekit.cli:main"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "x", "--steps", "0"])
    assert exit_.value.code == 2
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("error: --steps 0") and err.count("\n") == 1


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "echo_args.py").write_text("def main(args):\n    print('ARGS', args)\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "benchmarks"


@pytest.mark.parametrize("args", [["--steps", "3", "x"], ["--help"], []])
def test_bench_passes_args_through(bench_dir, args):
    result = CliRunner().invoke(cli.cli, ["bench", "echo-args", *args])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ARGS {args}\n"


def test_bench_unknown_name_lists_available(bench_dir):
    result = CliRunner().invoke(cli.cli, ["bench", "nope", "--fast"])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: unknown benchmark 'nope'") and "echo_args" in line


def test_every_command_of_the_lazy_table_loads_under_its_name():
    for name, (target, short) in cli.COMMANDS.items():
        command = cli.cli.get_command(None, name)
        assert command is not None and command.name == name, target
        assert short and len(short) < 80
