"""A training run in a folder: the run's description (``train.json``: recipe, parameters, paper, budget, seeds)
written first, the encoded world (``data.pt``) and the checkpoint (``checkpoint.pt``) as it goes, and at the end
a diffusers folder (EMA UNet, the shipped VAE, tokenizer and scheduler) that ``stablekit.load`` opens.

Running again with the same recipe and seeds resumes from the checkpoint (a larger budget continues training);
a folder that holds anything else is refused before anything is written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import StablekitError
from .base import Recipe, train
from .trainer import TrainConfig, WorldData

RUN_FILE = "train.json"
BUDGET = ("steps", "minutes", "save_every")  # may change when a run is resumed


def describe(recipe: Recipe, config: TrainConfig) -> dict:
    return dict(recipe.spec(), config=dataclasses.asdict(config))


def check_folder(out: Path, run: dict, run_file: str = RUN_FILE) -> bool:
    """True if `out` holds this run (described in its `run_file`) to resume, False if it is new (absent or empty);
    else a StablekitError."""
    if out.exists() and not out.is_dir():
        raise StablekitError(f"output '{out}' is a file; give a folder")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not (out / run_file).is_file():
        what = "another model" if (out / "model_index.json").exists() else "other files"
        raise StablekitError(f"output folder '{out}' holds {what}; give a new or empty folder")
    old = json.loads((out / run_file).read_text())
    same = {k: v for k, v in old.get("config", {}).items() if k not in BUDGET}
    if old.get("recipe") != run["recipe"] or old.get("params") != run["params"] or same != _fixed(run):
        raise StablekitError(
            f"output folder '{out}' holds a run of recipe {old.get('recipe')} {old.get('params')} with other settings;"
            " give a new folder to train another"
        )
    return True


def restore(pipe, folder: Path) -> None:
    """Put on `pipe`, just loaded from a recipe's exported `folder`, what the recipe recorded in its ``train.json``
    needs beyond the diffusers files (ScaleLong's skip scales, shortest path diffusion's sampler)."""
    from . import RECIPES

    run = json.loads((Path(folder) / RUN_FILE).read_text())
    if run.get("recipe") not in RECIPES:
        raise StablekitError(f"'{folder}' was trained with an unknown recipe '{run.get('recipe')}'")
    RECIPES[run["recipe"]](**run.get("params", {})).restore(pipe, Path(folder))


def _fixed(run: dict) -> dict:
    return {k: v for k, v in run["config"].items() if k not in BUDGET}


def run(recipe: Recipe, config: TrainConfig, out: Path, progress: bool = True) -> dict:
    """Train `recipe` under `config` in folder `out` (new, or this run's to resume) and export the model there;
    returns the run's description with the steps done and the final mean loss."""
    from diffusers import AutoencoderKL

    from ..default_model import WEIGHTS_DIR
    from ..default_model import train as teacher

    desc = describe(recipe, config)
    check_folder(out, desc)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(desc, indent=2))
    if not (out / "data.pt").exists():
        WorldData.render(config.captions, config.variants, config.data_seed).save(out / "data.pt")
    data = WorldData.load(out / "data.pt")
    _, ema, _, state = train(recipe, data, config, out / "checkpoint.pt", progress)
    vae = AutoencoderKL.from_pretrained(WEIGHTS_DIR / "vae")
    desc |= {
        "steps_done": state["step"],
        "final_loss": sum(state["losses"][-50:]) / max(1, len(state["losses"][-50:])),
    }
    teacher.export(out, vae, ema, data.scaling_factor, desc)
    (out / "memorized.json").unlink()  # the memorization set is not in a recipe's training data
    if hasattr(recipe, "export"):
        recipe.export(out)
    (out / RUN_FILE).write_text(json.dumps(desc, indent=2))
    return desc
