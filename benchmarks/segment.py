"""Benchmark foreground segmentation: DiffDIS (the diffusion UNet's features + a light head) against the same head
on the image alone, scored against the world renderer's exact masks.

    stablekit bench segment --json bench_out/segment.json

Held-out world scenes (seed 4242; the heads were trained on seed 0) with faint sensor noise. Per image: IoU of the
predicted and true foreground, and the boundary F-measure (precision and recall of boundary pixels matched within
``--tolerance`` pixels). Means with Student-t 95% intervals; the targets compare DiffDIS with the pixel head image by
image (paired differences, > 0), the direction the paper claims for diffusion features.
"""

from __future__ import annotations

import argparse
import sys

import _common
import numpy as np
import torch
import torch.nn.functional as F


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench segment", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=4242, seed_help="held-out scene seed (training used 0)", model=False)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--tolerance", type=int, default=1, help="boundary match distance in pixels")
    return p.parse_args(args)


def boundary_f(pred: torch.Tensor, true: torch.Tensor, tol: int) -> float:
    """Boundary F-measure of two (1, 1, H, W) binary masks, boundaries matched within `tol` pixels."""
    from stablekit.restore.diffdis import edges

    bp, bt = edges(pred) > 0, edges(true) > 0
    k = 2 * tol + 1
    near_t, near_p = F.max_pool2d(bt.float(), k, 1, tol) > 0, F.max_pool2d(bp.float(), k, 1, tol) > 0
    if not bp.any() or not bt.any():
        return float(bp.any() == bt.any())
    precision, recall = (bp & near_t).sum() / bp.sum(), (bt & near_p).sum() / bt.sum()
    return float(0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))


def iou(pred: torch.Tensor, true: torch.Tensor) -> float:
    union = (pred.bool() | true.bool()).sum()
    return float((pred.bool() & true.bool()).sum() / union) if union else 1.0


def evaluate(pipe, images, masks, path, tol: int) -> tuple[dict, torch.Tensor]:
    from stablekit.restore.diffdis import load, segment

    head, config = load(path)
    start = _common.clock()
    pred = (segment(pipe, images, head, config) > 0.5).float()
    seconds = (_common.clock() - start) / len(images)
    raw = {
        "iou": [iou(p[None], t[None]) for p, t in zip(pred, masks, strict=True)],
        "boundary_f": [boundary_f(p[None], t[None], tol) for p, t in zip(pred, masks, strict=True)],
    }
    summary = {"n": len(images), "seconds_per_image": round(seconds, 4), "unet_calls": 0 if config.pixels else 1}
    for k, xs in raw.items():
        summary |= {k: float(np.mean(xs)), f"{k}_ci95": _common.mean_interval(xs), f"_{k}": xs}
    return summary, pred


def plot(images, masks, preds: dict, path) -> None:
    plt = _common.pyplot()
    cols = min(6, len(images))
    rows = [("image", images), ("truth", masks), *preds.items()]
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols, 1.5 * len(rows)), squeeze=False)
    for i, (name, xs) in enumerate(rows):
        for j in range(cols):
            x = xs[j].permute(1, 2, 0).numpy()
            axes[i, j].imshow(x if x.shape[-1] == 3 else x[..., 0], cmap="gray")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(name, fontsize=7)
    _common.save_figure(fig, path, dpi=100)


def main(args=None):
    import stablekit
    from stablekit.restore import diffdis

    a = parse(sys.argv[1:] if args is None else args)
    _common.set_threads(a)
    pipe = stablekit.load(device="cpu")
    images, masks = diffdis.scenes(a.images, a.seed)
    res, preds, raw = {"n": a.images, "tolerance": a.tolerance, "methods": {}, "targets": {}}, {}, {}
    for name, path in (("diffdis", diffdis.HEAD), ("pixel_head", diffdis.PIXEL_HEAD)):
        summary, preds[name] = evaluate(pipe, images, masks, path, a.tolerance)
        raw[name] = {k: summary.pop(f"_{k}") for k in ("iou", "boundary_f")}
        res["methods"][name] = summary
    for key in ("iou", "boundary_f"):
        diff = np.subtract(raw["diffdis"][key], raw["pixel_head"][key])
        res["targets"][f"diffdis_beats_pixel_head_{key}"] = _common.target(
            float(diff.mean()), _common.mean_interval(diff), 0.0, ">", len(diff), 20,
            measure=f"paired {key} difference diffdis - pixel head",
        )  # fmt: skip
    _common.write_json(a.json, res)
    plot(images, masks, preds, a.json.with_suffix(".png"))
    return res
