"""Benchmark memorization: detection by the text-conditional noise magnitude, and removal of memorized images.

    stablekit bench memorization --json bench_out/memorization.json [--heldout 1000 --quality-prompts 200]
    stablekit bench memorization --json bench_out/memo50.json --model runs/memo50      # the benchmark model

Ground truth (``stablekit.memorization.ground_truth``): the model's memorized captions (the embedded model's 10
scenes duplicated in its training data, or the ``memorized.json`` of a ``--model`` folder such as the benchmark
model's 50, ``python -m stablekit.memorization.benchmark_model``), ``--paraphrases`` of each that keep the trigger
word, and held-out world captions (seed 4242 for detection, 4343 for quality; the models trained on seed 0's, the
adapters contrast with seed 2026's).

Detection (Wen et al., ICLR 2024): each prompt's score after the first step, averaged over all ``--steps`` steps,
and at the first step with a non-zero SNR alone (the adaptation to zero-terminal-SNR models; one generation per
prompt). The held-out captions are split in two halves: the calibration
half fixes the decision threshold at its ``1 - --fpr`` quantile (with ``--write-threshold`` it is written to
``stablekit/memorization/thresholds.json``, what ``stablekit memorization detect`` ships); the test half gives
the false-positive rate at it. AUC of memorized (and of paraphrased) captions against all held-out captions, with
a bootstrap 95% interval (positives and negatives resampled separately), TPR at 1% FPR on the ROC, and seconds
per prompt.

Mitigation: a generation is memorized when its SSIM (scikit-image, colour, 7x7 window) to its scene's memorized
render exceeds a threshold fixed on held-out data: the 99th percentile, over the quality prompts' generations, of
the largest SSIM to any memorized render. Memorized captions get ``--memo-seeds`` generations each, before and
after each method: the shared-subspace pruning, NeMo and MemControl adapters (``stablekit memorization mitigate``)
and the baseline's prompt-embedding adjustment; attribute accuracy of ``--quality-prompts`` held-out prompts (the
attribute classifier, paired bootstrap of the difference) measures the collateral damage.

Targets: detection AUC >= 0.99 after the first step (memorized vs held-out); subspace pruning leaves every
memorized scene below the threshold, with at most 1 point of attribute accuracy lost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common
import numpy as np
import torch

from stablekit.eval.harness import Judge, bench_pipeline, generate, paired_delta, rnd
from stablekit.eval.metrics import rate_interval

METHODS = ("subspace", "nemo", "memcontrol", "prompt-adjustment")


def scores(pipe, a, prompts: list[str]) -> tuple[np.ndarray, float]:
    """``(len(prompts), steps)`` magnitudes and seconds per prompt."""
    from stablekit.memorization import noise_magnitude

    t0 = time.perf_counter()
    s = noise_magnitude(pipe, prompts, steps=a.steps, num_inference_steps=a.steps, seed=a.seed, batch=a.batch)
    return s, (time.perf_counter() - t0) / len(prompts)


def detection_at(mem, para, held, a) -> dict:
    """Detection measures for one score (one value per prompt)."""
    half = len(held) // 2
    calib, test = held[:half], held[half:]
    thr = float(np.quantile(calib, 1 - a.fpr))
    return {
        "auc": rnd(_common.auc(mem, held)),
        "auc_ci95": _common.two_sample_interval(_common.auc, mem, held),
        "auc_paraphrases": rnd(_common.auc(para, held)),
        "auc_paraphrases_ci95": _common.two_sample_interval(_common.auc, para, held),
        "tpr_at_1pct_fpr": rnd(_common.tpr_at(mem, held, 0.01)),
        "tpr_at_1pct_fpr_ci95": _common.two_sample_interval(lambda p, n: _common.tpr_at(p, n, 0.01), mem, held),
        "threshold": rnd(thr),
        "test_fpr": rnd(float(np.mean(test > thr))),
        "test_fpr_ci95": [rnd(v) for v in rate_interval(int(np.sum(test > thr)), len(test))],
        "memorized_flagged": int(np.sum(mem > thr)),
        "paraphrases_flagged": int(np.sum(para > thr)),
        "n": {"memorized": len(mem), "paraphrases": len(para), "heldout": len(held), "calibration": half},
    }


def detection(pipe, a) -> dict:
    from stablekit.memorization import ground_truth as G
    from stablekit.memorization import informative_start

    mem = [c for c, _ in G.memorized(a.model)]
    para = [p for c in mem for p in G.paraphrases(c)[: a.paraphrases]]
    held = [c for c, _ in G.heldout(a.heldout, 4242)]
    s_mem, _ = scores(pipe, a, mem)
    s_para, _ = scores(pipe, a, para)
    s_held, sec_all = scores(pipe, a, held)
    out = {"seconds_per_prompt_all_steps": rnd(sec_all)}
    for label, k in (("first_step", 1), ("all_steps", a.steps)):
        out[label] = detection_at(*(s[:, :k].mean(1) for s in (s_mem, s_para, s_held)), a)
    start = informative_start(pipe, a.steps)
    out["informative_step"] = detection_at(*(s[:, start] for s in (s_mem, s_para, s_held)), a) | {"step": start}
    out["auc_per_step"] = [rnd(_common.auc(s_mem[:, k], s_held[:, k])) for k in range(a.steps)]
    t0 = time.perf_counter()
    scores_1 = _first_step_cost(pipe, a, held[: min(len(held), 64)])
    out["seconds_per_prompt_first_step"] = rnd((time.perf_counter() - t0) / scores_1)
    named = {"memorized": s_mem, "paraphrases": s_para, "heldout": s_held}
    out["scores"] = {k: [[rnd(x) for x in row] for row in v] for k, v in named.items()}
    return out


def _first_step_cost(pipe, a, prompts) -> int:
    from stablekit.memorization import noise_magnitude

    noise_magnitude(pipe, prompts, steps=1, num_inference_steps=a.steps, seed=a.seed, batch=a.batch)
    return len(prompts)


def ssim_to(images: torch.Tensor, renders: list[np.ndarray]) -> np.ndarray:
    """``(len(images), len(renders))`` SSIM of each generation (N, 3, H, W in [0, 1]) to each render (uint8)."""
    from skimage.metrics import structural_similarity

    ims = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return np.array([[structural_similarity(im, r, channel_axis=2) for r in renders] for im in ims])


def generations(pipe, a, prompts, plugins=()) -> torch.Tensor:
    from stablekit import use

    with use(pipe, *plugins):
        return generate(pipe, prompts, steps=a.steps, guidance=a.guidance, seed=a.seed, batch=a.batch)[0]


def adapter(pipe, a, method: str):
    from stablekit.memorization import PromptAdjustment, ground_truth, localize, memcontrol, prune

    mem = [c for c, _ in ground_truth.memorized(a.model)]
    ref = [c for c, _ in ground_truth.heldout(100, 2026)]
    t0 = time.perf_counter()
    plugin = {
        "subspace": lambda: prune(pipe, mem, ref, max_fraction=a.subspace_fraction),
        "nemo": lambda: localize(pipe, mem, ref),
        "memcontrol": lambda: memcontrol(pipe, mem, ref),
        "prompt-adjustment": lambda: PromptAdjustment(),
    }[method]()
    return plugin, time.perf_counter() - t0


def memorization_rate(sims: np.ndarray, threshold: float) -> dict:
    k, n = int(np.sum(sims > threshold)), len(sims)
    return {"rate": rnd(k / n), "ci95": [rnd(v) for v in rate_interval(k, n)], "k": k, "n": n}


def mitigation(pipe, a) -> dict:
    from stablekit.default_model import world
    from stablekit.memorization import ground_truth as G

    memo = G.memorized(a.model)
    renders = [np.asarray(world.render(s)) for _, s in memo]
    held = G.heldout(a.quality_prompts, 4343)
    judge = Judge([s for _, s in held], a.seed)
    mem_prompts = [c for c, _ in memo for _ in range(a.memo_seeds)]
    which = np.repeat(np.arange(len(memo)), a.memo_seeds)
    base_q = generations(pipe, a, [c for c, _ in held])
    threshold = float(np.quantile(ssim_to(base_q, renders).max(1), 0.99))
    base_stats, base_m, _ = judge.evaluate(base_q)
    rows = {"none": _row(ssim_to(generations(pipe, a, mem_prompts), renders), which, threshold, base_stats)}
    for method in a.methods:
        plugin, secs = adapter(pipe, a, method)
        stats, m, _ = judge.evaluate(generations(pipe, a, [c for c, _ in held], [plugin]))
        sims = ssim_to(generations(pipe, a, mem_prompts, [plugin]), renders)
        rows[method] = _row(sims, which, threshold, stats) | {
            "attr_acc_delta": paired_delta(m, base_m),
            "seconds_to_make": rnd(secs),
            "plugin": repr(plugin),
        }
        if method == "memcontrol":  # the masks tried, the one chosen, and its scores
            rows[method]["search"] = {k: json.loads(plugin.meta[k]) for k in ("search", "final")}
            rows[method]["search"]["mask"] = plugin.meta["mask"]
        print(method, rows[method]["memorization"], rows[method]["attr_acc_delta"], flush=True)
    return {"ssim_threshold": rnd(threshold), "methods": rows}


def _row(sims: np.ndarray, which: np.ndarray, threshold: float, stats: dict) -> dict:
    own = sims[np.arange(len(sims)), which]
    per_scene = [rnd(float(own[which == i].max())) for i in range(sims.shape[1])]
    return {
        "memorization": memorization_rate(own, threshold),
        "scenes_above": int(sum(v > threshold for v in per_scene)),
        "max_ssim_per_scene": per_scene,
        "attr_acc_mean": stats["attr_acc_mean"],
        "attr_acc_mean_ci95": stats["attr_acc_mean_ci95"],
    }


def targets(res: dict) -> dict:
    out = {}
    det = res.get("detection")
    if det:
        for label in ("first_step", "informative_step"):
            d = det[label]
            n = d["n"]["memorized"]
            out[f"detection_auc_{label}"] = _common.target(d["auc"], d["auc_ci95"], 0.99, ">=", n, 10)
    rows = res.get("mitigation", {}).get("methods", {})
    if "subspace" in rows:
        r = rows["subspace"]
        delta = r["attr_acc_delta"]
        out["subspace"] = _common.combined(
            {
                "every_scene_below": _common.exact(r["scenes_above"] == 0, scenes_above=r["scenes_above"]),
                "accuracy_loss": _common.target(delta["points"], delta["ci95"], -1.0, ">=", None, 0),
            }
        )
    return out


def plot(res: dict, path):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    det = res.get("detection")
    if det:
        s = {k: np.asarray(v) for k, v in det["scores"].items()}
        start = det["informative_step"]["step"]
        for label, cols in (("first step", [0]), ("all steps", slice(None)), (f"step {start + 1} alone", [start])):
            neg = np.sort(s["heldout"][:, cols].mean(1))
            pos = s["memorized"][:, cols].mean(1)
            thr = np.r_[np.inf, neg[::-1]]
            axes[0].step([np.mean(neg > t) for t in thr], [np.mean(pos > t) for t in thr], label=label)
        axes[0].set(
            xlabel="false-positive rate (held-out)", ylabel="true-positive rate (memorized)", title="detection"
        )
        axes[0].legend()
    rows = res.get("mitigation", {}).get("methods", {})
    axes[1].bar(list(rows), [r["memorization"]["rate"] for r in rows.values()])
    axes[1].set(ylabel="memorization rate", title="mitigation")
    _common.save_figure(fig, path, dpi=100)


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench memorization", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=0)
    p.add_argument("--heldout", type=int, default=1000, help="held-out captions for detection")
    p.add_argument("--paraphrases", type=int, default=5, help="paraphrases per memorized caption (at most 5)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (detection over all of them too)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate the threshold is fixed at")
    p.add_argument("--quality-prompts", type=int, default=200, help="held-out prompts for accuracy and SSIM")
    p.add_argument("--memo-seeds", type=int, default=4, help="generations per memorized caption")
    p.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    p.add_argument("--subspace-fraction", type=float, default=0.2, help="most of a layer's neurons pruned")
    p.add_argument("--no-detection", dest="detection", action="store_false")
    p.add_argument("--no-mitigation", dest="mitigation", action="store_false")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--write-threshold", action="store_true", help="ship the first-step threshold for `detect`")
    return p.parse_args(args)


def main(args: list[str]) -> dict:
    a = parse(args)
    if a.write_threshold and a.model is not None:
        raise SystemExit("--write-threshold ships the embedded model's thresholds: not with --model")
    _common.set_threads(a)
    pipe = bench_pipeline(a)
    keys = (
        "seed",
        "heldout",
        "steps",
        "guidance",
        "fpr",
        "quality_prompts",
        "paraphrases",
        "memo_seeds",
        "methods",
        "subspace_fraction",
    )
    res = _common.model_info(a, pipe) | {"settings": {k: getattr(a, k) for k in keys}}
    if a.detection:
        res["detection"] = detection(pipe, a)
        _common.write_json(a.json, res)
        if a.write_threshold:
            write_threshold(res["detection"], a)
    if a.mitigation:
        res["mitigation"] = mitigation(pipe, a)
    res["targets"] = targets(res)
    _common.write_json(a.json, res)
    plot(res, a.json.with_suffix(".png"))
    print(json.dumps(res["targets"], indent=2))
    print(f"wrote {a.json} and {a.json.with_suffix('.png')}")
    return res


def write_threshold(det: dict, a) -> None:
    from stablekit.memorization.noise_magnitude import THRESHOLDS, threshold_key
    from stablekit.output import write_atomically

    recs = {}
    where = (("first_step", 1, 0), ("all_steps", a.steps, 0), ("informative_step", 1, det["informative_step"]["step"]))
    for label, k, start in where:
        d = det[label]
        recs[threshold_key(k, start)] = {
            "value": d["threshold"],
            "fpr": a.fpr,
            "num_inference_steps": a.steps,
            "calibration": f"{d['n']['calibration']} held-out world captions (seed 4242), one generation each",
            "command": f"stablekit bench memorization --heldout {a.heldout} --steps {a.steps} --write-threshold",
        }
    text = json.dumps({"noise_magnitude": recs}, indent=2) + "\n"
    write_atomically(THRESHOLDS, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
