"""Options that do not apply are refused with one line and exit 2, never swallowed; --model and --device are the same
option on every command that loads a pipeline."""

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from stablekit import cli

NOT_APPLYING = {
    "protect encoder --prompt": (
        ["protect", "{image}", "--method", "encoder", "--prompt", "a red star"],
        "--prompt does not apply to --method encoder",
    ),
    "erase uce --iterations": (
        ["erase", "--concept", "star", "--iterations", "10"],
        "--iterations does not apply to --method uce",
    ),
    "erase uce --lr and --anchor-weight": (
        ["erase", "--concept", "star", "--lr", "1e-3", "--anchor-weight", "1"],
        "--lr and --anchor-weight do not apply to --method uce",
    ),
    "erase uce --surrogate": (["erase", "--concept", "star", "--surrogate", "shape"], "--surrogate does not apply"),
    "audit arithmetic --iterations": (
        ["audit", "--concept", "star", "--iterations", "5"],
        "--iterations does not apply to --attack arithmetic",
    ),
    "generate --negative without guidance": (
        ["generate", "a red star", "--guidance", "1", "--negative", "blue"],
        "--negative does not apply at --guidance 1",
    ),
    "generate --guidance-rescale without guidance": (
        ["generate", "a red star", "--guidance", "0.5", "--guidance-rescale", "0.7"],
        "--guidance-rescale does not apply at --guidance 0.5",
    ),
}


@pytest.mark.parametrize("args, message", NOT_APPLYING.values(), ids=NOT_APPLYING.keys())
def test_option_that_does_not_apply_is_refused(tmp_path, tiny_sd_path, args, message):
    Image.new("RGB", (32, 32), "gray").save(tmp_path / "in.png")
    out = tmp_path / "out"
    out.mkdir()
    suffix = ".safetensors" if args[0] == "erase" else ".json" if args[0] == "audit" else ".png"
    output = ["--json"] if args[0] == "audit" else ["-o"]
    argv = [a.format(image=tmp_path / "in.png") for a in args] + [*output, str(out / f"x{suffix}")]
    result = CliRunner().invoke(cli.cli, [*argv, "--model", str(tiny_sd_path), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert result.stdout == "" and list(out.iterdir()) == []


def test_the_same_options_at_their_defaults_are_accepted(tmp_path, tiny_sd_path):
    """Refusal looks at what the command line gave, not at values: the defaults of those options never refuse."""
    out = tmp_path / "img.png"
    base = ["generate", "a red star", "--model", str(tiny_sd_path), "--size", "32x32", "--steps", "1", "-o", str(out)]
    result = CliRunner().invoke(cli.cli, [*base, "--guidance", "1"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).text["guidance"] == "1.0"


def loading_commands() -> dict[str, click.Command]:
    commands = {name: cli.cli.get_command(None, name) for name in cli.COMMANDS}
    return {name: c for name, c in commands.items() if any(p.name == "model" for p in c.params)}


def test_model_and_device_are_one_option_everywhere():
    commands = loading_commands()
    assert set(commands) >= {"generate", "erase", "audit", "keygen", "detect", "edit", "invert", "protect"}
    for name in ("model", "device"):
        options = [next((p for p in c.params if p.name == name), None) for c in commands.values()]
        present = [o for o in options if o is not None]
        assert len({(o.opts[0], o.help, o.default) for o in present}) == 1, name
    assert all(any(p.name == "device" for p in c.params) for n, c in commands.items() if n != "keygen")
