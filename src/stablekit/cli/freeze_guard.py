"""``stablekit freeze-guard``: learn a FreezeAsGuard mask, the UNet tensors `finetune --freeze-guard` keeps frozen."""

from __future__ import annotations

from pathlib import Path

import click

from .common import check_output, model_and_device


@click.command("freeze-guard")
@click.option("--forbidden", required=True, type=click.Path(path_type=Path), help="Images + captions to block.")
@click.option("--legal", required=True, type=click.Path(path_type=Path), help="Images + captions to keep working.")
@click.option("--ratio", default=0.5, show_default=True, help="Share of UNet tensors frozen.")
@click.option("--legal-weight", default=1.0, show_default=True, help="Weight of the legal domain's score.")
@click.option("--steps", default=60, show_default=True, help="Steps of the simulated fine-tune.")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Mask file (.json) to write.")
@model_and_device
def freeze_guard_command(forbidden, legal, ratio, legal_weight, steps, seed, output, model, device):
    """Learn which UNet tensors to freeze so that fine-tuning on the --forbidden set (folders in the format of
    `stablekit finetune`) fails while fine-tuning on the --legal set works; write the mask for
    `stablekit finetune --freeze-guard`."""
    from ..output import load_quietly
    from ..safety.freeze_guard import FreezeConfig, FreezeMask
    from ..train.finetune import read_folder

    config = FreezeConfig(ratio=ratio, legal_weight=legal_weight, steps=steps, seed=seed)
    check_output(output, "guard.json")
    bad, good = read_folder(forbidden), read_folder(legal)
    pipe = load_quietly(model, device, dtype="float32")
    mask = FreezeMask.learn(pipe, bad, good, config)
    mask.save(output)
    click.echo(f"{len(mask.frozen)} of {len(mask.scores)} UNet tensors frozen: {output}")
