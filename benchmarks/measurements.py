"""Benchmark reconstruction from linear measurements: compressed sensing and active subsampling with the embedded
model as the prior.

    stablekit bench measurements --json bench_out/measurements.json

Held-out 64x64 world scenes (seed 4242) are measured at each sampling ratio (the fraction of pixel values, or of
measured numbers per value) and reconstructed:

- pixel subsampling (random 2x2 cells): ``interp`` (linear interpolation of the measured pixels, nearest outside
  their hull: the classic baseline), ``random`` (the diffusion posterior sampler of ``restore/compressed_sensing.py``
  on the same cells) and ``ads`` (Active Diffusion Subsampling, ``restore/active_subsampling.py``: the same sampler
  choosing its cells during sampling, the same number of them);
- block Gaussian measurements (8x8 RGB cells): ``pinv`` (A^+ y, the minimum-norm image) and ``diffusion`` (the
  posterior sampler).

Per image: PSNR and SSIM against the original; means with Student-t 95% intervals over images. Targets, each on the
paired PSNR difference per image: ADS beats random subsampling at equal counts (the ADS paper's claim), and the
diffusion reconstruction beats the classic baseline of each operator (the compressed-sensing paper's direction).
"""

from __future__ import annotations

import argparse
import sys

import _common
import numpy as np
import torch


def parse(args: list[str]) -> argparse.Namespace:
    from stablekit.restore.compressed_sensing import CSConfig

    p = argparse.ArgumentParser(prog="stablekit bench measurements", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=4242, seed_help="held-out scene seed", model=False)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.15])
    for name in ("steps", "particles", "fit_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(CSConfig, name))
    return p.parse_args(args)


def interpolate(y: torch.Tensor, operator) -> torch.Tensor:
    """Linear interpolation of the measured pixels of `y` ((1, 3, H, W), [-1, 1]); nearest outside their hull."""
    from scipy.interpolate import griddata

    m = operator.pixels()[0, 0].numpy() > 0
    h, w = m.shape
    grid = np.mgrid[0:h, 0:w].transpose(1, 2, 0).reshape(-1, 2)
    known, values = np.argwhere(m), y[0].permute(1, 2, 0).numpy()[m]
    out = griddata(known, values, grid, method="linear")
    holes = np.isnan(out[:, 0])
    out[holes] = griddata(known, values, grid[holes], method="nearest")
    return torch.from_numpy(out.reshape(h, w, 3)).permute(2, 0, 1)[None].float()


def scores(out: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """PSNR and SSIM of (1, 3, H, W) images in [0, 1]."""
    from skimage.metrics import structural_similarity

    from stablekit.latents import psnr

    a, b = out[0].permute(1, 2, 0).double().numpy(), truth[0].permute(1, 2, 0).double().numpy()
    return psnr(a, b), structural_similarity(a, b, channel_axis=2, data_range=1.0)


def one_image(pipe, x: torch.Tensor, ratio: float, k: int, config) -> dict:
    """Every method on one image x ((1, 3, H, W), [-1, 1]) at `ratio`: outputs in [0, 1]."""
    from stablekit.restore.active_subsampling import active_subsampling
    from stablekit.restore.compressed_sensing import make_operator, reconstruct

    size = tuple(x.shape[-2:])
    cells = make_operator("pixels", ratio, size, seed=k)
    y = cells.measure(x)
    gauss = make_operator("gaussian", ratio, size, seed=k)
    yg = gauss.measure(x)
    return {
        "interp": (interpolate(y, cells).clamp(-1, 1) + 1) / 2,
        "random": reconstruct(pipe, cells, y, size, config)[0],
        "ads": active_subsampling(pipe, lambda op: op.measure(x), size, ratio, config)[0],
        "pinv": (gauss.pinv(yg, size).clamp(-1, 1) + 1) / 2,
        "diffusion": reconstruct(pipe, gauss, yg, size, config)[0],
    }


def summarise(raw: dict) -> dict:
    out = {}
    for name, metrics in raw.items():
        out[name] = {"n": len(metrics["psnr_db"])}
        for key, xs in metrics.items():
            out[name] |= {key: float(np.mean(xs)), f"{key}_ci95": _common.mean_interval(xs)}
    return out


def paired(raw: dict, better: str, worse: str, what: str) -> dict:
    diff = np.subtract(raw[better]["psnr_db"], raw[worse]["psnr_db"])
    return _common.target(
        float(diff.mean()), _common.mean_interval(diff), 0.0, ">", len(diff), 20, measure=f"paired PSNR {what} (dB)"
    )


def run_ratio(pipe, images: torch.Tensor, ratio: float, config, shown: dict) -> tuple[dict, dict]:
    from tqdm import tqdm

    raw = {}
    for k, x in enumerate(tqdm(images, desc=f"ratio {ratio}")):
        outs = one_image(pipe, x[None] * 2 - 1, ratio, k, config)
        for name, out in outs.items():
            psnr_db, ssim = scores(out, x[None])
            raw.setdefault(name, {"psnr_db": [], "ssim": []})
            raw[name]["psnr_db"].append(psnr_db)
            raw[name]["ssim"].append(ssim)
            if k < 4:
                shown.setdefault(ratio, {}).setdefault(name, []).append(out[0])
    targets = {
        f"ads_beats_random_{ratio}": paired(raw, "ads", "random", "ads - random subsampling"),
        f"diffusion_beats_interp_{ratio}": paired(raw, "random", "interp", "diffusion - interpolation, same cells"),
        f"diffusion_beats_pinv_{ratio}": paired(raw, "diffusion", "pinv", "diffusion - A^+ y, block Gaussian"),
    }
    return summarise(raw), targets


def plot(res: dict, shown: dict, images: torch.Tensor, path) -> None:
    plt = _common.pyplot()
    ratios = [float(r) for r in res["ratios"]]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, names in zip(axes, (("interp", "random", "ads"), ("pinv", "diffusion")), strict=True):
        for name in names:
            rows = [res["ratios"][str(r)]["methods"][name] for r in ratios]
            ci = np.array([row["psnr_db_ci95"] or [row["psnr_db"]] * 2 for row in rows]).T
            means = np.array([row["psnr_db"] for row in rows])
            ax.errorbar(ratios, means, yerr=[means - ci[0], ci[1] - means], label=name, capsize=3, marker="o")
        ax.set_xlabel("sampling ratio")
        ax.set_ylabel("PSNR (dB)")
        ax.legend(fontsize=7)
    axes[0].set_title("pixel subsampling", fontsize=9)
    axes[1].set_title("block Gaussian", fontsize=9)
    _common.save_figure(fig, path, dpi=110)
    plot_examples(shown, images, path.with_name(path.stem + "_examples.png"))


def plot_examples(shown: dict, images: torch.Tensor, path) -> None:
    plt = _common.pyplot()
    rows = [(r, name) for r in shown for name in shown[r]]
    cols = min(4, len(images))
    fig, axes = plt.subplots(len(rows) + 1, cols, figsize=(1.5 * cols, 1.5 * (len(rows) + 1)), squeeze=False)
    for j in range(cols):
        axes[0, j].imshow(images[j].permute(1, 2, 0).numpy())
        for i, (r, name) in enumerate(rows):
            axes[i + 1, j].imshow(shown[r][name][j].permute(1, 2, 0).clamp(0, 1).numpy())
    for i, label in enumerate(["original", *(f"{n} {r}" for r, n in rows)]):
        axes[i, 0].set_ylabel(label, fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    _common.save_figure(fig, path, dpi=100)


def main(args=None):
    from stablekit.restore import sr_net
    from stablekit.restore.compressed_sensing import CSConfig

    a = parse(sys.argv[1:] if args is None else args)
    _common.set_threads(a)
    config = CSConfig(steps=a.steps, particles=a.particles, fit_steps=a.fit_steps)
    pipe = embedded_pipeline()
    images = sr_net.world_images(a.images, a.seed)
    res = {"config": config.__dict__, "n": a.images, "ratios": {}, "targets": {}}
    shown = {}
    for ratio in a.ratios:
        methods, targets = run_ratio(pipe, images, ratio, config, shown)
        res["ratios"][str(ratio)] = {"methods": methods}
        res["targets"] |= targets
        _common.write_json(a.json, res)
    plot(res, shown, images, a.json.with_suffix(".png"))
    return res


def embedded_pipeline():
    import stablekit

    pipe = stablekit.load(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe
