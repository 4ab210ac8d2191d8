"""Options, checks and helpers shared by the command modules."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from ..errors import StablekitError

MODEL_HELP = "Diffusers folder, .safetensors/.ckpt file or hub id [default: the embedded model]."


def model_option(f):
    """--model, shared by every command that loads a pipeline."""
    return click.option("--model", default=None, help=MODEL_HELP)(f)


def model_and_device(f):
    """--model and --device, shared by every command that runs a pipeline."""
    device = click.option("--device", default=None, help="cuda, mps or cpu [default: the best available].")
    return model_option(device(f))


def dtype_option(f):
    """--dtype: the precision the pipeline is loaded and run in."""
    return click.option(
        "--dtype",
        default=None,
        metavar="float32|bfloat16|float16",
        help="Precision of the weights and the computation [default: float16 on CUDA, else float32].",
    )(f)


def spm_multiplier_option(f):
    """--spm-multiplier, shared by the commands that attach SPM membranes (generate, audit)."""
    return click.option(
        "--spm-multiplier",
        type=click.FloatRange(min=0),
        default=1.0,
        show_default=True,
        help="Multiply each SPM membrane's strength (its facilitated transport) by this.",
    )(f)


def decoder_steps_option(f):
    """--decoder-steps, shared by the commands that invert images to latents (detect, edit, invert)."""
    return click.option("--decoder-steps", default=0, show_default=True, help="Decoder-inversion steps (0: off).")(f)


def given(*names: str) -> list[str]:
    """The options among the parameter `names` that the command line gave (not left at their defaults), as --flags."""
    ctx = click.get_current_context()
    sources = {name: ctx.get_parameter_source(name) for name in names}
    return [
        f"--{name.replace('_', '-')}" for name, src in sources.items() if src not in (None, ParameterSource.DEFAULT)
    ]


def refuse(flags: list[str], reason: str) -> None:
    """A one-line error if any of `flags` was given: they do not apply, and are never silently ignored."""
    if flags:
        raise StablekitError(f"{' and '.join(flags)} {'do' if len(flags) > 1 else 'does'} not apply {reason}")


def output_paths(output: Path, count: int) -> list[Path]:
    """Where `count` images go: `output` itself for one, ``stem-0.png, stem-1.png, ...`` beside it for more."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def check_output(output: Path, example: str = "out.png") -> None:
    if output.is_dir():
        raise StablekitError(f"output '{output}' is a folder; give a file name, e.g. -o {output / example}")
    suffix = Path(example).suffix
    if output.suffix.lower() != suffix:
        raise StablekitError(f"output '{output}' must be a {suffix} file, e.g. -o {example}")
    if not output.parent.is_dir():
        raise StablekitError(f"output folder '{output.parent}' does not exist; create it or choose another -o")
