"""Benchmark quantization: quality of every method x bit-width on the embedded model, speed and weight memory on
an SD-1.5-architecture UNet.

    stablekit bench quant --json bench_out/quant.json                              # both parts, full size
    stablekit bench quant --json out.json --part quality --prompts 32 --samples 32 --iters 50   # reduced
    stablekit bench quant --json out.json --part speed --rounds 3 --peer onnxruntime

**Quality** (``--part quality``): the full-precision embedded model and each entry of :data:`ENTRIES` (the naive
baseline at every bit-width, PTQ4DM W8A8, Q-Diffusion W8A8/W4A8, QuEST W4A8/W4A4, SVDQuant W4A4 at the paper's
rank 32 and at rank 4, about the share of a layer that rank 32 is on SD, and PTQ4DM W8A8 on the int8 kernels)
generate images for ``--prompts`` held-out prompts with the same seeds (DDIM, ``--steps`` steps). All methods
calibrate on one set of full-precision trajectories. Per entry: attribute accuracy (the default model's
classifier) and its paired difference to full precision in points with a bootstrap 95% interval, the
classifier Frechet distance to full precision and to rendered scenes, PSNR to the full-precision image at the
same seed, the quantized weights' storage and the calibration time.

**Speed and memory** (``--part speed``, ``_quant_speed.py``): one UNet call (batch 2, as with guidance) on an
SD-1.5-architecture UNet with random weights at ``--size`` pixels (512: 64x64 latents), fp32, bf16, our W8A8 on
the int8 kernels and, with ``--peer onnxruntime``, ONNX Runtime's dynamic int8 quantization of the same UNet;
``--rounds`` rounds in a rotating order. Weight memory: the stored bytes of the UNet at W4A8 (packed 4-bit codes
and scales) and W8A8 over its fp32 parameters.

Targets (``benchmarks/_common.py``, judged on 95% intervals): attribute accuracy within 1 point of full
precision at W8A8 (best W8A8 method), within 3 points at W4A8 (best W4A8 method), within 6 points at W4A4 for
SVDQuant or QuEST; W8A8 at least 1.5x faster than fp32 and not slower than the peer; 4-bit weights at most 0.3x
of fp32 weight memory. Writes the JSON and PNGs beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import numpy as np

from stablekit.eval.harness import rnd as _r

ENTRIES = (  # (label, method spec without the calibration settings, run on the int8 kernels)
    ("naive w8a8", "naive:bits=w8a8", False),
    ("ptq4dm w8a8", "ptq4dm:bits=w8a8", False),
    ("ptq4dm w8a8 int8 kernels", "ptq4dm:bits=w8a8", True),
    ("qdiffusion w8a8", "qdiffusion:bits=w8a8", False),
    ("naive w4a8", "naive:bits=w4a8", False),
    ("qdiffusion w4a8", "qdiffusion:bits=w4a8", False),
    ("quest w4a8", "quest:bits=w4a8", False),
    ("naive w4a4", "naive:bits=w4a4", False),
    ("svdquant w4a4", "svdquant:bits=w4a4", False),
    ("svdquant w4a4 rank 4", "svdquant:bits=w4a4,rank=4", False),
    ("quest w4a4", "quest:bits=w4a4", False),
)
TARGET_POINTS = {"w8a8": -1.0, "w4a8": -3.0, "w4a4": -6.0}


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench quant", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=4242, seed_help="held-out prompt seed (training used 0)")
    p.add_argument("--part", choices=("quality", "speed", "all"), default="all")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts (quality)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (quality and calibration)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--calib-prompts", type=int, default=16, help="calibration prompts")
    p.add_argument("--samples", type=int, default=64, help="UNet calls kept for calibration")
    p.add_argument("--iters", type=int, default=100, help="Q-Diffusion and QuEST optimisation iterations")
    p.add_argument("--only", default=None, help="comma-separated labels of ENTRIES to run [default: all]")
    p.add_argument("--unet", choices=("sd15", "tiny"), default="sd15", help="speed part's UNet")
    p.add_argument("--size", type=int, default=512, help="speed part's image side")
    p.add_argument("--rounds", type=int, default=3, help="speed part's timed rounds")
    p.add_argument("--peer", choices=("none", "onnxruntime"), default="none", help="speed part's peer")
    return p.parse_args(args)


def entry_spec(spec: str, a) -> str:
    extra = f"samples={a.samples},steps={a.steps},prompts={a.calib_prompts}"
    if spec.startswith(("qdiffusion", "quest")):
        extra += f",iters={a.iters}"
    return f"{spec},{extra}"


def quality(a, save) -> dict:
    """Full precision, then every entry against it; `save(results so far)` after each."""
    from _accel_quality import _ddim_pipeline

    from stablekit.eval.harness import Judge, generate, heldout_prompts
    from stablekit.quant.calibration import CalibrationConfig, trajectories

    pipe = _ddim_pipeline(a)
    scenes, prompts = heldout_prompts(a.prompts, 0, a.seed)
    judge = Judge(scenes, a.seed)

    def gen(desc):
        return generate(pipe, prompts, steps=a.steps, guidance=a.guidance, seed=a.seed, desc=desc)[0]

    images = gen("full precision")
    ev, m, feats = judge.evaluate(images)
    ref = dict(images=images, m=m, feats=feats)
    t0 = time.perf_counter()
    traj = trajectories(pipe, CalibrationConfig(prompts=a.calib_prompts, steps=a.steps, guidance=a.guidance))
    res = {"model": str(a.model or "stablekit-default"), "prompts": a.prompts, "steps": a.steps,
           "guidance": a.guidance, "trajectories_s": _r(time.perf_counter() - t0), "full_precision": ev,
           "fp32_unet_bytes": sum(p.numel() * 4 for p in pipe.unet.parameters()), "entries": []}  # fmt: skip
    wanted = set(a.only.split(",")) if a.only else None
    for label, spec, int8 in ENTRIES:
        if wanted is None or label in wanted:
            res["entries"].append(_entry(pipe, label, entry_spec(spec, a), int8, traj, gen, judge, ref))
            save(res)
    res["targets"] = quality_targets(res)
    return res


def _entry(pipe, label, spec, int8, traj, gen, judge, ref) -> dict:
    from stablekit import use
    from stablekit.eval.harness import paired_delta
    from stablekit.eval.metrics import frechet_distance
    from stablekit.latents import psnr
    from stablekit.quant import method
    from stablekit.quant.int8 import to_int8

    t0 = time.perf_counter()
    q = method(spec).quantize(pipe, traj)
    seconds = time.perf_counter() - t0
    run_q = to_int8(q) if int8 else q
    with use(pipe, run_q):
        images = gen(label)
    ev, m, feats = judge.evaluate(images)
    ps = [psnr(x, y) for x, y in zip(images, ref["images"], strict=True)]
    row = {"label": label, "spec": spec, "bits": q.meta["bits"], "method": q.meta["method"]}
    row |= {"execution": run_q.execution(), "calibration_s": _r(seconds), "weight_bytes": q.storage_bytes()}
    row |= {"psnr_db_mean": _r(np.mean(ps)), "psnr_db_ci95": [_r(v) for v in _common.mean_interval(ps)]}
    row |= {
        "fd_vs_full_precision": _r(frechet_distance(feats, ref["feats"])),
        "attr_acc_delta": paired_delta(m, ref["m"]),
    }
    print(f"quality: {label}: {row['attr_acc_delta']} psnr {row['psnr_db_mean']}", flush=True)
    return row | ev


def quality_targets(res: dict) -> dict:
    """Per bit-width: the best eligible entry's paired accuracy difference judged against the threshold."""
    out = {}
    for bits, threshold in TARGET_POINTS.items():
        eligible = ("svdquant", "quest") if bits == "w4a4" else ("ptq4dm", "qdiffusion", "quest", "svdquant")
        rows = [e for e in res["entries"] if e["bits"] == bits and e["method"] in eligible]
        if not rows:
            continue
        best = max(rows, key=lambda e: e["attr_acc_delta"]["points"])
        d = best["attr_acc_delta"]
        key = f"{bits}_attr_acc_within_{-threshold:g}_points"
        out[key] = _common.target(d["points"], d["ci95"], threshold, ">=", res["prompts"], 32, entry=best["label"])
    return out


def plot_quality(res: dict, path: Path):
    plt = _common.pyplot()
    rows = res["entries"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    labels = [e["label"] for e in rows]
    y = np.arange(len(rows))
    d = [e["attr_acc_delta"] for e in rows]
    err = np.array([[x["points"] - x["ci95"][0], x["ci95"][1] - x["points"]] for x in d]).T
    axes[0].errorbar([x["points"] for x in d], y, xerr=err, fmt="o")
    for t in TARGET_POINTS.values():
        axes[0].axvline(t, color="gray", lw=0.8, ls="--")
    axes[0].set_xlabel("attribute accuracy minus full precision (points, paired 95% CI)")
    axes[1].barh(y, [e["psnr_db_mean"] for e in rows])
    axes[1].set_xlabel("PSNR to the full-precision image, same seed (dB)")
    for ax in axes:
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
    fig.suptitle(f"embedded model, DDIM {res['steps']} steps, {res['prompts']} held-out prompts", fontsize=10)
    _common.save_figure(fig, path)


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    res = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
    json_path = Path(a.json)
    if a.part in ("quality", "all"):
        res["quality"] = quality(a, lambda r: _common.write_json(json_path, res | {"quality": r}))
        plot_quality(res["quality"], json_path.with_name(json_path.stem + "-quality.png"))
    if a.part in ("speed", "all"):
        from _quant_speed import plot_speed, speed

        res["speed"] = speed(a, lambda r: _common.write_json(json_path, res | {"speed": r}))
        plot_speed(res["speed"], json_path.with_name(json_path.stem + "-speed.png"))
    _common.write_json(json_path, res)
    print(f"wrote {json_path}")
    return res
