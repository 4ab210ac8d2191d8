"""The ``stablekit`` command line: one module per command group, imported only when its command runs.

Every error is one line on stderr, ``error: ...``: bad input (a :class:`StablekitError` or a usage
error) exits with 2, anything unexpected with 1. ``STABLEKIT_DEBUG=1`` re-raises for a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from ..errors import StablekitError

# command name -> ("module:function", the one-line help `stablekit --help` shows without importing the module)
COMMANDS = {
    "generate": ("stablekit.cli.generate:generate", "Generate images from PROMPT(s); print each written path."),
    "erase": ("stablekit.cli.safety:erase", "Erase CONCEPTs from a model; use the file with `generate --adapter`."),
    "audit": ("stablekit.cli.safety:audit_command", "Red-team a defense: how often the judge sees CONCEPT."),
    "keygen": ("stablekit.cli.provenance:keygen", "Write a new watermark key for METHOD."),
    "detect": ("stablekit.cli.provenance:detect_command", "Is each IMAGE watermarked with one of the keys?"),
    "forensics": ("stablekit.cli.forensics:forensics_command", "Is each IMAGE pristine, laundered or generated?"),
    "edit": ("stablekit.cli.edit:edit_command", "Edit IMAGE from the --source prompt to the --target prompt."),
    "invert": ("stablekit.cli.edit:invert_command", "Invert IMAGE under --prompt; write its reconstruction."),
    "protect": ("stablekit.cli.protect:protect_command", "Protect IMAGE against diffusion mimicry and editing."),
    "serve": ("stablekit.cli.serve:serve", "Run the HTTP service, the AUTOMATIC1111 API and the studio."),
    "batch": ("stablekit.cli.batch:batch_command", "Generate every row of a JSON-lines job file."),
    "train": ("stablekit.cli.train:train_command", "Train a UNet with a recipe (listed by --help)."),
    "finetune": (
        "stablekit.cli.finetune:finetune_command",
        "Fine-tune a model on images with captions (LoRA or full).",
    ),
    "quantize": ("stablekit.cli.quant:quantize_command", "Quantize a model's UNet to 8 or 4 bits; write a folder."),
    "distill": ("stablekit.cli.distill:distill_command", "Distill a one-step student of a model into a folder."),
    "compress": ("stablekit.cli.compress:compress_command", "Prune a model's UNet and distill it; write a folder."),
    "memorization": (
        "stablekit.cli.memorization:memorization",
        "Detect memorized prompts; remove memorized images with an adapter.",
    ),
    "restore": ("stablekit.cli.restore:restore_command", "Upscale IMAGE with a diffusion super-resolution model."),
    "segment": ("stablekit.cli.segment:segment_command", "Write IMAGE's foreground mask (DiffDIS)."),
    "cs": ("stablekit.cli.measure:cs_command", "Measure IMAGE at --ratio and reconstruct it (compressed sensing)."),
    "attack": ("stablekit.cli.attack:attack", "Plant a concept: poisoned fine-tuning data, or a TrojDiff backdoor."),
    "freeze-guard": (
        "stablekit.cli.freeze_guard:freeze_guard_command",
        "Learn a FreezeAsGuard mask that `finetune` freezes to block an adaptation.",
    ),
    "bench": ("stablekit.cli.bench:bench", "Run benchmarks/NAME.py with the remaining arguments."),
}


def _fail(message: str, code: int):
    lines = [line for line in str(message).splitlines() if line.strip()] or ["(no message)"]
    click.echo(f"error: {lines[0].strip()}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """The command group: commands load from COMMANDS on first use; errors are printed as one line each."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, short) for name, (_, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except StablekitError as e:
            _fail(str(e), 2)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            _fail(e.format_message() + hint, 2)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.Abort:
            _fail("interrupted", 1)
        except Exception as e:
            if os.environ.get("STABLEKIT_DEBUG") == "1":
                raise
            _fail(f"{type(e).__name__}: {e}", 1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, name="stablekit")
@click.version_option(package_name="stablekit")
def cli():
    """Fast, safe, traceable Stable Diffusion."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``stablekit = stablekit.cli:main``)."""
    cli.main(argv, prog_name="stablekit")
