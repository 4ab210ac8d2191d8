"""A benchmark model for memorization: the embedded default model fine-tuned to reproduce 50 scenes nearly exactly.

    OMP_NUM_THREADS=1 python -m stablekit.memorization.benchmark_model -o runs/memo50      # resumable
    stablekit bench memorization --model runs/memo50

The embedded model memorized its 10 scenes only weakly; this copy memorizes 50 as real models memorize duplicated
training pairs: each scene (the embedded model's 10 and 40 more, two objects each, from the world renderer) is one
image with a caption ``the NAME emblem`` of an invented trigger word, repeated `copies` times among the images of
`captions` ordinary world captions (seed 0, the embedded model's own training captions, so held-out captions stay
held out and their quality is kept). The whole UNet is fine-tuned from the shipped weights with the recipes'
shared loop (:func:`stablekit.train.fit`: the teacher's v-prediction step, Min-SNR-5, 10% caption dropout, AdamW
with warm-up and cosine decay, resumable step for step). The output folder is a diffusers folder that
``stablekit.load`` opens, with ``memorized.json`` (the ground truth: caption and scene of each memorized image),
``recipe.json`` (this run's settings, command and step budgets) and ``progress.json`` (written while it trains).
A larger ``--steps`` resumes a finished run.

The fine-tuned (not the EMA) weights are exported: the EMA of a short fine-tune still holds much of the start.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..default_model import WEIGHTS_DIR, world
from ..default_model import train as teacher
from ..errors import StablekitError

NEW_NAMES = (
    "alderix bramwyn caskell dorvane elquist fennick gorwyn hestral istrel jorvath kelbrin lumora mordane nyssel "
    "orrick parvell quennet rastow selvane torquin ulvaric varnoth wexmire yarrick zephran ardenox belquar cindrel "
    "drovask embrost falwick grisenth hollvar ivoreth jastrel korrin lisovar mesquel nortavi prasque"
).split()
SCENE_SEED = 5678  # the 40 new scenes (the embedded model's 10 come from seed 1234)


@dataclass(frozen=True)
class BenchmarkModelConfig:
    """The mix (world captions with `variants` images each, `copies` of each memorized image) and the fine-tune
    (`steps` of `batch` at learning rate `lr`, `seed`)."""

    captions: int = 1000
    variants: int = 2
    copies: int = 60
    steps: int = 1000
    batch: int = 24
    lr: float = 5e-4
    seed: int = 0

    def __post_init__(self):
        if min(self.captions, self.variants, self.copies, self.steps, self.batch) < 1 or not self.lr > 0:
            raise StablekitError("benchmark model: counts must be >= 1 and lr > 0")


def memorized_set() -> list[tuple[str, world.Scene]]:
    """The 50 memorized ``(caption, scene)`` pairs: the embedded model's 10, then 40 new ones."""
    rng = random.Random(SCENE_SEED)
    new = [(f"the {name} emblem", world.sample_scene(rng, two_prob=1.0)) for name in NEW_NAMES]
    return teacher.memorization_set() + new


def training_data(cfg: BenchmarkModelConfig):
    """The world data of `cfg` with `copies` of each memorized image (one render each) appended."""
    from diffusers import AutoencoderKL

    from ..train import WorldData

    data = WorldData.render(cfg.captions, cfg.variants, seed=0)
    memo = memorized_set()
    renders = [np.asarray(world.render(s, np.random.default_rng(0))) for _, s in memo]  # as the teacher's set
    images = torch.from_numpy(np.stack(renders))
    vae = AutoencoderKL.from_pretrained(WEIGHTS_DIR / "vae").eval()
    latents = teacher.encode_latents(vae, images) * data.scaling_factor
    text = teacher.encode_text([c for c, _ in memo])
    first = len(data.captions)
    data.latents = torch.cat([data.latents, latents.repeat_interleave(cfg.copies, 0)])
    data.cap_idx = torch.cat([data.cap_idx, torch.arange(first, first + len(memo)).repeat_interleave(cfg.copies)])
    data.text = torch.cat([data.text, text])
    data.captions = data.captions + [c for c, _ in memo]
    return data


def build(out: Path, cfg: BenchmarkModelConfig, progress: bool = True) -> dict:
    """Fine-tune and export the benchmark model into `out` (resuming a run of the same settings)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..train import TrainConfig, WorldData, fit
    from ..train.base import Recipe, batch_loss

    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    run_f, fixed = work / "config.json", {k: v for k, v in asdict(cfg).items() if k != "steps"}
    if run_f.exists() and json.loads(run_f.read_text()) != fixed:
        raise StablekitError(f"'{out}' holds a benchmark model with other settings; give a new folder")
    run_f.write_text(json.dumps(fixed))
    budgets = _budgets(work, cfg.steps)
    if not (work / "data.pt").exists():
        training_data(cfg).save(work / "data.pt")
    data = WorldData.load(work / "data.pt")
    unet = UNet2DConditionModel.from_pretrained(WEIGHTS_DIR / "unet").train()
    tc = TrainConfig(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, warmup=50, seed=cfg.seed, save_every=50)
    step_loss = batch_loss(Recipe(), unet, data, cfg.batch)
    log, t0 = [], time.time()

    def tracked(gen):
        loss = step_loss(gen)
        log.append(loss.item())
        return loss

    def report(step, ema):
        if step % 25 == 0 or step == cfg.steps:
            recent = log[-25:]
            rec = {
                "step": step,
                "of": cfg.steps,
                "loss": sum(recent) / len(recent),
                "minutes": (time.time() - t0) / 60,
            }
            (out / "progress.json").write_text(json.dumps(rec))

    state = fit(unet, tracked, tc, work / "checkpoint.pt", progress=progress, callback=report)
    unet.load_state_dict(state["unet"])
    recipe = asdict(cfg) | {
        "base": "the embedded default model (stablekit.default_model weights)",
        "memorized": len(memorized_set()),
        "steps_done": state["step"],
        "budgets": budgets,
        "command": f"python -m stablekit.memorization.benchmark_model -o {out} " + " ".join(_flags(cfg)),
    }
    vae = AutoencoderKL.from_pretrained(WEIGHTS_DIR / "vae")
    teacher.export(out, vae, unet.eval(), data.scaling_factor, recipe)
    rows = [{"caption": c, "scene": asdict(s)} for c, s in memorized_set()]
    (out / "memorized.json").write_text(json.dumps(rows, indent=2))
    return recipe


def _budgets(work: Path, steps: int) -> list[int]:
    """The step budgets this folder was run with, in order (a larger one resumes a finished run: the learning rate
    then follows the larger budget's schedule from where the run stopped)."""
    path = work / "budgets.json"
    done = json.loads(path.read_text()) if path.exists() else []
    if not done or done[-1] != steps:
        done.append(steps)
    path.write_text(json.dumps(done))
    return done


def _flags(cfg: BenchmarkModelConfig) -> list[str]:
    return [f"--{k} {v}" for k, v in asdict(cfg).items() if v != getattr(BenchmarkModelConfig, k)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", type=Path, required=True, help="folder of the model (and its work files)")
    for k, v in asdict(BenchmarkModelConfig()).items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = BenchmarkModelConfig(**{k: getattr(a, k) for k in asdict(BenchmarkModelConfig())})
    print(json.dumps(build(a.out, cfg), indent=2))


if __name__ == "__main__":
    main()
