"""`stablekit bench finetune`: does `stablekit finetune` teach the embedded model a new word, LoRA and full, and
what does it cost the rest of the model?

The set: world images of a star captioned with a new word in its place (``"a red zorblat on a gray
background"``). Held-out prompts with the word (other scenes): how often the judge sees a star, before and after
(target: at least 80% after). Held-out world prompts without it: attribute accuracy against the base model's,
paired per prompt in points. Also the training seconds and the size of what is written. JSON after every mode;
a PNG of the rates.

    stablekit bench finetune --json bench_out/finetune.json
"""

from __future__ import annotations

import argparse
import sys
import time

import _common
import numpy as np
from _finetune_sets import domain_set, rate, success

from stablekit.eval.harness import rnd


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench finetune", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=0, seed_help="the fine-tunes' draws")
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=40, help="held-out prompts with the new word, and world prompts")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    return p.parse_args(args)


def clean_accuracy(pipe, a) -> np.ndarray:
    """Per held-out world prompt (seed 777): the judge's mean attribute accuracy."""
    from stablekit.eval.harness import Judge, generate, heldout_prompts
    from stablekit.pipeline import guidance_rescale

    scenes, prompts = heldout_prompts(a.prompts, 0, seed=777)
    call = dict(steps=a.sample_steps, guidance=a.guidance, seed=2, guidance_rescale=guidance_rescale(pipe))
    images, _ = generate(pipe, prompts, batch=50, **call)
    return Judge(scenes, seed=5).matches(images).mean(1)


def run_mode(pipe, mode: str, a, base_acc: np.ndarray, prompts: list[str]) -> dict:
    from stablekit.train.finetune import FinetuneConfig, encode, finetune
    from stablekit.train.lora_adapter import LoRAAdapter

    config = FinetuneConfig(mode=mode, steps=a.steps, batch=a.batch, seed=a.seed)
    t0 = time.perf_counter()
    unet = finetune(pipe, encode(pipe, *domain_set("forbidden", a.images, seed=100)), config)
    seconds = time.perf_counter() - t0
    written = LoRAAdapter.from_peft(unet).factors if mode == "lora" else dict(unet.named_parameters())
    size = sum(t.numel() * 4 for v in written.values() for t in (v if isinstance(v, tuple) else (v,)))
    original, pipe.unet = pipe.unet, unet
    try:
        row = {"learned": rate(success(pipe, "forbidden", prompts, a)), "train_seconds": rnd(seconds)}
        diff = 100 * (clean_accuracy(pipe, a) - base_acc)
    finally:
        pipe.unet = original
    row["clean_accuracy_delta_points"] = {
        "value": rnd(diff.mean()),
        "ci95": _common.mean_interval(diff),
        "n": len(diff),
    }
    row["written_mb"] = rnd(size / 1e6)
    return row


def plot(res: dict, path) -> None:
    plt = _common.pyplot()
    names = ["base", *res["modes"]]
    rows = [res["base"]["learned"], *(m["learned"] for m in res["modes"].values())]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    err = _common.error_bars(rows)
    ax.bar(names, [r["value"] for r in rows], yerr=err, capsize=3)
    ax.axhline(0.8, color="gray", ls="--", lw=1)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("judge sees a star for 'zorblat'")
    ax.set_title(f"finetune: {res['settings']['images']} images, {res['settings']['steps']} steps")
    _common.save_figure(fig, path)


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    from stablekit.eval.harness import bench_pipeline

    pipe = bench_pipeline(a)
    prompts = domain_set("forbidden", a.prompts, seed=777)[1]
    res = _common.model_info(a, pipe) | {"settings": {k: str(v) for k, v in vars(a).items()}}
    res["base"] = {"learned": rate(success(pipe, "forbidden", prompts, a))}
    base_acc = clean_accuracy(pipe, a)
    res["base"]["clean_accuracy"] = rnd(base_acc.mean())
    res["modes"], res["targets"] = {}, {}
    for mode in a.modes:
        res["modes"][mode] = row = run_mode(pipe, mode, a, base_acc, prompts)
        learned = row["learned"]
        res["targets"][mode] = _common.target(learned["value"], learned["ci95"], 0.8, ">=", learned["n"], 30)
        _common.write_json(a.json, res)
    plot(res, a.json.with_suffix(".png"))
    _common.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
