"""Benchmark laundering forensics: the two-stage detector on pristine, laundered and generated images.

    stablekit bench forensics --json bench_out/forensics.json [--n 500]

Test sets (none seen in training; the detector is ``stablekit.provenance.laundering``'s shipped one):
* pristine: ``--n`` world renders with sensor noise (scenes of seed 777; training used 0) and ``--n``
  random crops of the held-out scikit-image photos (``TEST_PHOTOS``; training used ``TRAIN_PHOTOS``);
* laundered: each pristine image through the model's VAE (encoder mean, decoder);
* generated: ``--n`` text-to-image samples of held-out world captions (a fresh noise seed per image).

Measures: ROC AUC of stage 1 for pristine vs laundered (per source and pooled) and pristine vs all
synthetic; of stage 2 for laundered vs generated; the three-way label accuracy; each with a 95%
bootstrap interval over images (``--reps``). The same after JPEG at quality 90 of every image
(``--jpeg``; 0 skips). Targets: AUC >= 0.99 for pristine vs laundered and laundered vs generated.
Writes the JSON and a PNG of the score histograms.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common
import numpy as np


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench forensics", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=777, seed_help="held-out scene and prompt seed (training used 0)")
    p.add_argument("--n", type=int, default=500, help="images per set")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--jpeg", type=int, default=90, help="JPEG quality of the robustness row (0: none)")
    a = p.parse_args(args)
    if a.n < 2:
        p.error("--n must be at least 2")
    return a


def auc(neg: np.ndarray, pos: np.ndarray, reps: int, seed: int) -> dict:
    """ROC AUC of scores `pos` (label 1) against `neg` (label 0) with a 95% bootstrap interval."""
    ci95 = _common.two_sample_interval(_common.auc, pos, neg, reps, seed)
    return {"auc": round(_common.auc(pos, neg), 4), "ci95": ci95}


def evaluate(sets: dict, a) -> dict:
    """AUCs and label accuracy of the detector on `sets` (name -> images)."""
    from stablekit.eval.metrics import rate_interval
    from stablekit.provenance.laundering import logits

    lg = {k: logits(v) for k, v in sets.items()}
    s1 = {k: v[:, 0] for k, v in lg.items()}
    s2 = {k: v[:, 1] for k, v in lg.items()}
    pristine = np.r_[s1["pristine_world"], s1["pristine_photos"]]
    laundered1 = np.r_[s1["laundered_world"], s1["laundered_photos"]]
    laundered2 = np.r_[s2["laundered_world"], s2["laundered_photos"]]
    out = {
        "pristine_vs_laundered": auc(pristine, laundered1, a.reps, a.seed),
        "pristine_vs_laundered_world": auc(s1["pristine_world"], s1["laundered_world"], a.reps, a.seed),
        "pristine_vs_laundered_photos": auc(s1["pristine_photos"], s1["laundered_photos"], a.reps, a.seed),
        "pristine_vs_synthetic": auc(pristine, np.r_[laundered1, s1["generated"]], a.reps, a.seed),
        "laundered_vs_generated": auc(laundered2, s2["generated"], a.reps, a.seed),
    }
    truth = {"pristine": "pristine", "laundered": "laundered", "generated": "generated"}
    k = n = 0
    for name, v in lg.items():
        label = np.where(v[:, 0] < 0, "pristine", np.where(v[:, 1] >= 0, "generated", "laundered"))
        k += int((label == truth[name.split("_")[0]]).sum())
        n += len(label)
    out["label_accuracy"] = {"value": round(k / n, 4), "ci95": [round(x, 4) for x in rate_interval(k, n)], "n": n}
    return out


def jpeg_all(sets: dict, quality: int) -> dict:
    from stablekit.eval.attacks import jpeg

    return {k: jpeg(v, quality) for k, v in sets.items()}


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    from stablekit.eval.harness import bench_pipeline, heldout_prompts
    from stablekit.provenance import laundering as L

    t0 = time.perf_counter()
    pipe = bench_pipeline(a)
    _, prompts = heldout_prompts(a.n, 0, a.seed)
    sets = {
        "pristine_world": L.world_images(a.n, a.seed),
        "pristine_photos": L.photo_crops(L.TEST_PHOTOS, a.n, a.seed),
    }
    sets["laundered_world"] = L.launder(pipe, sets["pristine_world"])
    sets["laundered_photos"] = L.launder(pipe, sets["pristine_photos"])
    sets["generated"] = L.generated(pipe, prompts, a.seed, a.steps, a.guidance)
    res = {**_common.model_info(a, pipe), "args": {k: str(v) for k, v in vars(a).items()}}
    res["detector"] = L.load_detector()[1]
    res["clean"] = evaluate(sets, a)
    print(res["clean"], flush=True)
    if a.jpeg:
        res[f"jpeg{a.jpeg}"] = evaluate(jpeg_all(sets, a.jpeg), a)
    res["targets"] = {
        name: _common.target(r["auc"], r["ci95"], 0.99, ">=", a.n, 500)
        for name, r in res["clean"].items()
        if name in ("pristine_vs_laundered", "laundered_vs_generated")
    }
    res["runtime_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    _common.write_json(a.json, res)
    plot(sets, a.json.with_suffix(".png"))
    print(f"wrote {a.json} and {a.json.with_suffix('.png')}")
    return res


def plot(sets: dict, path):
    from stablekit.provenance.laundering import logits

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for name, images in sets.items():
        lg = logits(images)
        axes[0].hist(lg[:, 0], bins=30, alpha=0.5, label=name)
        if not name.startswith("pristine"):
            axes[1].hist(lg[:, 1], bins=30, alpha=0.5, label=name)
    axes[0].set_title("stage 1: synthetic logit", fontsize=9)
    axes[1].set_title("stage 2: generated logit", fontsize=9)
    axes[0].legend(fontsize=7)
    _common.save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:])
