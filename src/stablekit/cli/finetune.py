"""``stablekit finetune``: fine-tune a model's UNet on a folder of images and captions (LoRA or full)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import model_and_device


@click.command("finetune")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Run folder (new, or this run's to resume): lora.safetensors for --mode lora, a model folder for full.",
)
@click.option("--mode", type=click.Choice(["lora", "full"]), default="lora", show_default=True)
@click.option("--rank", type=int, default=4, show_default=True, help="LoRA rank.")
@click.option("--steps", type=int, default=200, show_default=True, help="Optimizer steps.")
@click.option("--batch", type=int, default=8, show_default=True)
@click.option("--lr", type=float, default=None, help="Learning rate [default: 1e-3 for LoRA, 1e-4 full].")
@click.option("--warmup", type=int, default=10, show_default=True, help="Warm-up steps.")
@click.option("--seed", type=int, default=0, show_default=True, help="Batches, noise and timesteps.")
@click.option("--save-every", type=int, default=50, show_default=True, help="Checkpoint interval (steps).")
@click.option(
    "--freeze-guard",
    "mask",
    type=click.Path(path_type=Path),
    default=None,
    help="FreezeAsGuard mask from `stablekit attack freeze-guard`: its tensors stay frozen.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads.")
@model_and_device
def finetune_command(folder, out, mask, threads, model, device, **settings):
    """Fine-tune the model's UNet on FOLDER: images with same-named .txt captions, or a metadata.jsonl of
    {"file_name", "text"} lines. LoRA writes OUT/lora.safetensors for `generate --adapter`; full writes a
    model folder that --model and `stablekit.load` open. Run again to resume."""
    import torch

    from ..output import load_quietly
    from ..train.finetune import FinetuneConfig, read_folder, run

    config = FinetuneConfig(**settings)
    images, captions = read_folder(folder)
    frozen = _mask(mask)
    if threads:
        torch.set_num_threads(threads)
    pipe = load_quietly(model, device, dtype="float32")
    desc = run(pipe, str(model or "default"), images, captions, config, out, frozen)
    click.echo(f"finetune ({config.mode}): {config.steps} steps on {len(images)} images: {desc['written']}")


def _mask(path: Path | None) -> frozenset[str]:
    if path is None:
        return frozenset()
    from ..safety.freeze_guard import FreezeMask

    return frozenset(FreezeMask.load(path).frozen)
