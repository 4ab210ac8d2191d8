"""``stablekit batch``: batch generation, locally or on Ray."""

from __future__ import annotations

from pathlib import Path

import click

from .common import model_and_device


@click.command("batch")
@click.argument("jobs", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for images/ and the manifest.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes (with --ray: actors) [default: 1; with --ray, one per GPU, else one per node].",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Run on Ray: alone, a local Ray instance; with an ADDRESS (auto, HOST:6379, ray://HOST:10001), that cluster.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads per worker.")
@model_and_device
def batch_command(jobs, out, workers, ray_address, threads, model, device):
    """Generate every row of JOBS (JSON lines) into --out, skipping rows already there; print a summary."""
    from .. import batch

    summary = batch.run(jobs, out, model=model, device=device, workers=workers, threads=threads, ray=ray_address)
    click.echo(
        f"{summary['written']} written, {summary['skipped']} already done, of {summary['rows']} rows: "
        f"{summary['manifest']}"
    )
