"""``stablekit distill``: train a few-step student of a model (a folder), an LCM-LoRA (a file) or a SpeedUpNet
adapter (a folder with the adapter file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from ..errors import StablekitError
from .common import check_output, given, model_and_device, refuse

METHODS = ("instaflow", "lcm-lora", "lora-cfg", "speedupnet")


@click.command("distill")
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="instaflow",
    show_default=True,
    help="instaflow (reflow then one-step distillation: a model folder), lcm-lora (latent consistency "
    "distillation into a LoRA file for `--accel lcm-lora:lora=FILE`) or lora-cfg (guidance distilled into a "
    "fused LoRA: a model folder that needs no guidance) or speedupnet (a cross-attention adapter for 4 steps without "
    "guidance, negative prompt kept: a folder with speedupnet.safetensors for `generate --adapter`).",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Folder (instaflow) or file.")
@click.option("--pairs", type=click.IntRange(min=1), default=4096, show_default=True, help="Teacher samples/images.")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=12, show_default=True, help="Teacher's steps.")
@click.option("--guidance", type=click.FloatRange(min=0), default=7.5, show_default=True, help="Teacher's guidance.")
@click.option("--iterations", type=click.IntRange(min=1), default=2000, show_default=True, help="Per stage.")
@click.option(
    "--distill-iterations",
    type=click.IntRange(min=1),
    default=None,
    help="instaflow's second stage [default: --iterations].",
)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True, help="AdamW lr.")
@click.option("--seed", default=0, show_default=True, help="Seed of the prompts, noise and batches.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="instaflow, speedupnet: keep finished stages here; a re-run resumes [default: OUTPUT.work, removed at "
    "the end].",
)
@click.option(
    "--minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="speedupnet: stop training after this many minutes (a re-run with the same --workdir resumes).",
)
@model_and_device
def distill_command(method, output, model, device, minutes, **settings):
    """Distill a model into a one-step student (InstaFlow), an LCM-LoRA or a SpeedUpNet adapter; print what was
    written."""
    from ..output import load_quietly

    guidance = settings["guidance"]
    if method != "speedupnet":
        refuse(given("minutes"), f"to --method {method}: its training has no time budget")
    if method == "lcm-lora":
        check_output(output, "lcm-lora.safetensors")
    elif method in ("lora-cfg", "speedupnet") and guidance < 1:
        raise StablekitError(f"--guidance {guidance}: the guidance to distil must be at least 1, e.g. 7.5")
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise StablekitError(f"output '{output}' exists and is not an empty folder; choose another -o or remove it")
    pipe = load_quietly(model, device, dtype="float32")
    if getattr(pipe, "unet", None) is None:
        raise StablekitError("the model has no UNet to distill")
    if method == "speedupnet":
        click.echo(str(_speedupnet(pipe, output, model, minutes, **settings)))
        return
    {"instaflow": _instaflow, "lcm-lora": _lcm_lora, "lora-cfg": _lora_cfg}[method](pipe, output, model, **settings)
    click.echo(str(output))


def _instaflow(
    pipe, output, model, pairs, teacher_steps, guidance, iterations, distill_iterations, batch, lr, seed, workdir
):
    from ..train import instaflow, students

    config = instaflow.Config(
        pairs=pairs,
        teacher_steps=teacher_steps,
        guidance=guidance,
        reflow_iterations=iterations,
        distill_iterations=iterations if distill_iterations is None else distill_iterations,
        batch=batch,
        lr=lr,
        seed=seed,
    )
    work = workdir or output.with_name(output.name + ".work")
    student, recipe = instaflow.distill(pipe, config, workdir=work)
    recipe["teacher"] = model or "stablekit-default"
    students.save_student(student, output, recipe)
    if workdir is None:
        shutil.rmtree(work)


def _lcm_lora(
    pipe, output, model, pairs, teacher_steps, guidance, iterations, distill_iterations, batch, lr, seed, workdir
):
    from ..train import lcm_distill

    refuse(
        given("teacher_steps", "guidance", "workdir"),
        "to --method lcm-lora: its teacher takes one DDIM step at a guidance drawn from [3, 15], and it has one stage",
    )
    config = lcm_distill.Config(images=pairs, iterations=iterations, batch=batch, lr=lr, seed=seed)
    lora, recipe = lcm_distill.distill(pipe, config)
    recipe["teacher"] = model or "stablekit-default"
    lcm_distill.save(pipe, lora, output, recipe)


def _lora_cfg(
    pipe, output, model, pairs, teacher_steps, guidance, iterations, distill_iterations, batch, lr, seed, workdir
):
    from ..train import guidance_lora, students

    refuse(
        given("teacher_steps", "workdir", "distill_iterations"),
        "to --method lora-cfg: it learns from noised world images in one stage",
    )
    config = guidance_lora.Config(
        images=pairs, iterations=iterations, batch=batch, lr=lr, guidance=guidance, seed=seed
    )
    student, recipe = guidance_lora.distill(pipe, config)
    recipe["teacher"] = model or "stablekit-default"
    students.save_student(student, output, recipe)


def _speedupnet(pipe, output, model, minutes, pairs, teacher_steps, guidance, iterations, distill_iterations, **rest):
    from ..train import speedupnet

    refuse(
        given("teacher_steps", "distill_iterations"),
        "to --method speedupnet: its teacher takes one guided DDIM step per iteration, in one stage",
    )
    config = speedupnet.Config(
        images=pairs, iterations=iterations, guidance=guidance, batch=rest["batch"], lr=rest["lr"], seed=rest["seed"]
    )
    work = rest["workdir"] or output.with_name(output.name + ".work")
    plugin, recipe = speedupnet.distill(pipe, config, workdir=work, minutes=minutes)
    recipe["teacher"] = model or "stablekit-default"
    plugin.meta["recipe"] = json.dumps(recipe)
    path = speedupnet.save(plugin, output, recipe)
    if recipe["iterations_done"] < iterations:
        click.echo(
            f"the time budget ended training at {recipe['iterations_done']}/{iterations} iterations; run again "
            f"with --workdir {work} to go on",
            err=True,
        )
    elif rest["workdir"] is None:
        shutil.rmtree(work)
    return path
