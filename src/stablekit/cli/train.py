"""``stablekit train``: train the embedded model's UNet with a recipe into a resumable diffusers folder."""

from __future__ import annotations

from pathlib import Path

import click


class _TrainCommand(click.Command):
    """Its help ends with the recipes, their parameters and papers (from cli/defaults.py: no import of torch)."""

    def format_epilog(self, ctx, formatter):
        from .defaults import RECIPES

        with formatter.section("Recipes (--recipe NAME[:k=v,...])"):
            formatter.write_dl([(f"{n} ({params})", paper) for n, (params, paper) in RECIPES.items()])


@click.command("train", cls=_TrainCommand)
@click.option("--recipe", "spec", required=True, help="NAME[:k=v,...], one of the recipes below.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Run folder (new, or to resume).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (the learning rate decays over them).")
@click.option("--minutes", type=float, default=None, help="Time budget; with --steps, whichever ends first.")
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=5e-4, show_default=True)
@click.option("--warmup", type=int, default=100, show_default=True, help="Warm-up steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="UNet initialisation and training draws.")
@click.option("--data-seed", type=int, default=0, show_default=True, help="The rendered world.")
@click.option("--captions", type=int, default=1000, show_default=True, help="World captions to train on.")
@click.option("--variants", type=int, default=2, show_default=True, help="Images per caption.")
@click.option("--size", type=click.Choice(["default", "small", "tiny"]), default="default", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads.")
def train_command(spec, out, threads, **settings):
    """Train a fresh UNet of the embedded model on the rendered world with a recipe; write a diffusers folder to
    --out that `stablekit.load` opens. Run again with a larger budget to resume."""
    import torch

    from ..train import TrainConfig, recipe
    from ..train.folder import check_folder, describe, run

    rec = recipe(spec)
    config = TrainConfig(**settings)
    check_folder(out, describe(rec, config))
    if threads:
        torch.set_num_threads(threads)
    desc = run(rec, config, out)
    click.echo(f"{desc['recipe']}: {desc['steps_done']} steps, final loss {desc['final_loss']:.4f}: {out}")
