"""The accel benchmark's quality part: each entry against the uncached run on the default model (see
``accel.py``)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import _common
import torch
from _accel_methods import Method, count_macs, psnrs

from stablekit.eval.harness import Judge, bench_pipeline, paired_delta
from stablekit.eval.harness import rnd as _r


def quality(a, methods: list[Method], speed_res: dict | None, save) -> dict:
    """The quality part: the uncached run, then every method against it, `save(results so far)` after each."""
    from stablekit.eval.harness import generate, heldout_prompts

    pipe = _ddim_pipeline(a)
    scenes, prompts = heldout_prompts(a.prompts, 0, a.prompt_seed)
    judge = Judge(scenes, a.prompt_seed)
    gen = functools.partial(generate, pipe, prompts, guidance=a.guidance, seed=a.prompt_seed, batch=a.batch)
    with torch.inference_mode():  # warm-up, so that the first timed generation pays no one-time costs
        pipe(prompts[0], num_inference_steps=2, guidance_scale=a.guidance, output_type="latent")
    images, sec = gen(steps=a.quality_steps, desc="quality: uncached")
    ev, m, feats = judge.evaluate(images)
    ref = dict(images=images, sec=sec, m=m, feats=feats)
    ref["macs"] = count_macs(pipe, Method("uncached"), prompts[0], a.quality_steps, a.guidance)
    res = _header(a, pipe, judge, ref) | {
        "uncached": ev | {"seconds_per_image": _r(sec), "gmacs_per_image": _r(ref["macs"] / 1e9)},
        "entries": [],
    }
    speed_part = _speed_part_speedups(speed_res, a.quality_steps)
    for method in methods:
        row = _entry(a, pipe, method, gen, judge, ref, prompts[0])
        if method.label in speed_part and "error" not in row:
            row["speed_part_speedup"] = speed_part[method.label]
        res["entries"].append(row)
        save(res)
        keys = ("psnr_db_mean", "fd_vs_uncached", "attr_acc_mean", "attr_acc_delta", "mac_speedup_default_model")
        print(f"quality: {method.label}: " + json.dumps({k: row.get(k) for k in keys}), flush=True)
    return res


def _ddim_pipeline(a):
    from diffusers import DDIMScheduler

    pipe = bench_pipeline(a)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


def _header(a, pipe, judge: Judge, ref: dict) -> dict:
    from stablekit.eval.metrics import frechet_distance

    keys = ("timestep_spacing", "steps_offset", "clip_sample", "set_alpha_to_one")
    return {
        "model": str(a.model or "stablekit-default"),
        "scheduler": "DDIM " + json.dumps({k: pipe.scheduler.config[k] for k in keys}),
        "steps": a.quality_steps,
        "guidance": a.guidance,
        "prompts": a.prompts,
        "prompt_seed": a.prompt_seed,
        "image_size": list(ref["images"].shape[-2:]),
        "fd_real_vs_real": _r(frechet_distance(judge.real2, judge.real)),
    }


def _entry(a, pipe, method: Method, gen, judge: Judge, ref: dict, prompt: str) -> dict:
    """One method's images against the uncached ones (an error is recorded, and the run goes on)."""
    from stablekit.eval.metrics import frechet_distance

    steps = method.steps(a.quality_steps)
    row = {"label": method.label, "steps_run": steps}
    try:
        with method.attached(pipe):
            images, sec = gen(steps=steps, desc=f"quality: {method.label}")
        ev, mm, feats = judge.evaluate(images)
        macs = count_macs(pipe, method, prompt, a.quality_steps, a.guidance)
    except Exception as err:
        print(f"quality: {method.label} FAILED: {type(err).__name__}: {err}", flush=True)
        return row | {"error": f"{type(err).__name__}: {err}"}
    row |= psnrs(images, ref["images"]) | {"fd_vs_uncached": _r(frechet_distance(feats, ref["feats"]))} | ev
    ref_m = ref["m"]
    return row | {
        "attr_acc_delta": paired_delta(mm, ref_m),
        "joint_acc_delta_points": _r(100 * (mm[:, :3].all(1).mean() - ref_m[:, :3].all(1).mean())),
        "seconds_per_image": _r(sec),
        "wall_speedup_default_model": _r(ref["sec"] / sec),
        "mac_speedup_default_model": _r(ref["macs"] / macs) if macs else None,
    }


def _speed_part_speedups(speed_res: dict | None, steps: int) -> dict:
    """{label: {size, steps, speedup, mac_speedup, rounds}} from the speed part's largest size run at `steps` steps
    (``rounds``: the speed-up's every round, spread and interval)."""
    if not speed_res:
        return {}
    runs = sorted((r for r in speed_res["runs"] if r["steps"] == steps), key=lambda r: r["size"])
    if not runs:
        return {}
    run = runs[-1]
    return {
        e["label"]: {
            "unet": speed_res["unet"],
            "size": run["size"],
            "steps": steps,
            "speedup": e["speedup"]["median"],
            "mac_speedup": e.get("mac_speedup"),
            "rounds": e["speedup"],
        }
        for e in run["entries"]
        if "speedup" in e
    }


def plot_quality(res: dict, path: Path):
    plt = _common.pyplot()
    rows = [e for e in res["entries"] if "error" not in e]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    base = res["uncached"]["attr_acc_mean"]
    for ax, key, ylabel in (
        (axes[0], "attr_acc_mean", "mean attribute accuracy"),
        (axes[1], "psnr_db_mean", "PSNR to the uncached output (dB)"),
    ):
        for e in rows:
            if "speed_part_speedup" in e:
                x, marker = e["speed_part_speedup"]["speedup"], "o"
            else:
                x, marker = e.get("mac_speedup_default_model"), "^"
            if x is None:
                continue
            ax.scatter(x, e[key], marker=marker, color="tab:blue")
            ax.annotate(e["label"], (x, e[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("speedup: speed-part wall-clock (o; same steps, largest size) or default-model MAC ratio (^)")
        ax.set_ylabel(ylabel)
    axes[0].axhline(base, color="gray", lw=1, label="uncached")
    axes[0].axhspan(base - 0.02, base, color="gray", alpha=0.15, label="within 2 points")
    axes[0].scatter([1], [base], color="black", marker="s")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"default model, DDIM {res['steps']} steps, guidance {res['guidance']}, {res['prompts']} prompts", fontsize=10
    )
    _common.save_figure(fig, path)
