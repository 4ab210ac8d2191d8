"""`stablekit bench training`: the training recipes side by side, from one initialisation and one rendered world,
for the same number of steps (and, read from the same runs, the same wall-clock) at a reduced size.

For every seed (the UNet's initialisation and every training draw; the world is the same for all) each recipe
trains a fresh UNet; at fixed checkpoints its EMA weights generate one image per held-out prompt (same noise for
every recipe, the recipe's own sampler), judged by the attribute classifier: mean attribute accuracy and the
classifier Fréchet distance to renders of the prompts' scenes. The loss curve, the training seconds per step and
the steps each recipe needs to reach plain's final accuracy are recorded. The final EMA UNet's representation is
measured too (benchmarks/_training_probes.py): a linear probe on the attribute labels, and the accuracy certified
under randomized smoothing of a linear head on the representation of noised latents; for plain, also of
denoise-then-classify with the attribute classifier. Each paper's claim is judged against plain (rRCM's against
denoise-then-classify) on paired 95% intervals over prompts or test images, pooled over seeds: confirmed, refuted
or inconclusive. Every finished run is cached beside the JSON (a rerun resumes); JSON after every run; a PNG.

    OMP_NUM_THREADS=1 stablekit bench training --json bench_out/training.json --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import _common
import _training_probes as P
import numpy as np
import torch

from stablekit.eval.harness import rnd

CLAIMS = {  # recipe: (the paper's claim, the measurements that test it)
    "immiscible": (
        "faster training: plain's final accuracy in a third of the steps (the paper's up to 3x)",
        ["accuracy_at_first_minus_plain_at_final"],
    ),
    "scalelong": (
        "more stable, faster training: higher accuracy at equal steps, lower loss",
        ["accuracy_delta_points_at_final", "final_third_loss_delta"],
    ),
    "corruption": (
        "better quality and diversity: lower classifier FD at equal steps",
        ["fd_delta_at_final"],
    ),
    "spd": (
        "better samples than the standard noise schedule: lower classifier FD (and higher accuracy) at equal steps",
        ["fd_delta_at_final", "accuracy_delta_points_at_final"],
    ),
    "umd": (
        "better representations (linear probe) than diffusion training alone",
        ["linear_probe_delta_points"],
    ),
    "rrcm": (
        "higher certified accuracy than denoise-then-classify with a diffusion model, at a fraction of its cost",
        ["certified_vs_denoise_classify_points"],
    ),
}
FIXED = ("recipes_all", "size", "steps", "batch", "captions", "variants", "prompts", "sample_steps", "guidance",
         "seed", "probe_train", "probe_test", "certify", "sigma", "n0", "n", "alpha")  # fmt: skip


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench training", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=0, seed_help="the world's data seed", model=False)
    p.add_argument("--recipes", nargs="+", default=["plain", "immiscible", "scalelong", "corruption", "spd", "umd",
                                                    "rrcm"])  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="training seeds per recipe")
    p.add_argument("--size", default="small", choices=["default", "small", "tiny"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--captions", type=int, default=400)
    p.add_argument("--variants", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts judged at each checkpoint")
    p.add_argument("--sample-steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--probe-train", type=int, default=384, help="latents the linear heads are fitted on")
    p.add_argument("--probe-test", type=int, default=128, help="latents the linear probe is tested on")
    p.add_argument("--certify", type=int, default=32, help="test latents certified under randomized smoothing")
    p.add_argument("--sigma", type=float, default=0.5, help="smoothing noise (latent space)")
    p.add_argument("--n0", type=int, default=8, help="noised copies that select the class")
    p.add_argument("--n", type=int, default=48, help="noised copies that bound its probability")
    p.add_argument("--alpha", type=float, default=0.01, help="the certificate's failure probability")
    p.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.125, 0.25, 0.5])
    p.add_argument("--cached-only", action="store_true", help="report the finished runs only; train nothing")
    a = p.parse_args(args)
    if a.recipes[0] != "plain":
        p.error("--recipes must start with plain, the reference")
    a.recipes_all = a.recipes
    a.checkpoints = sorted({max(1, a.steps // 3), max(1, 2 * a.steps // 3), a.steps})
    return a


def sample(pipe, unet, rec, prompts: list[str], a) -> torch.Tensor:
    """Images of `prompts` from a copy of `unet` (the recipe's additions put on it) with the recipe's sampler."""
    from stablekit.eval.harness import generate

    net = copy.deepcopy(unet).eval()
    rec.for_inference(net)
    scheduler = pipe.scheduler
    pipe.unet, pipe.scheduler = net, rec.sampler(scheduler)
    try:
        images, _ = generate(pipe, prompts, steps=a.sample_steps, guidance=a.guidance, seed=a.seed, batch=a.prompts)
    finally:
        pipe.scheduler = scheduler
    return images


def train_one(name: str, seed: int, ctx: dict, a) -> tuple[dict, dict, torch.nn.Module]:
    """One recipe, one seed: (its result, what the intervals need, its final EMA UNet with the recipe's additions)."""
    from stablekit.train import TrainConfig, recipe, train

    rec = recipe(name)
    config = TrainConfig(
        steps=a.steps, batch=a.batch, seed=seed, data_seed=a.seed, size=a.size, warmup=max(1, a.steps // 10),
        captions=a.captions, variants=a.variants,
    )  # fmt: skip
    points, kept, eval_s = {}, {"m": {}, "f": {}}, [0.0]

    def evaluate(step: int, ema) -> None:
        if step in a.checkpoints:
            t0 = time.perf_counter()
            scores, m, feats = ctx["judge"].evaluate(sample(ctx["pipe"], ema, rec, ctx["prompts"], a))
            kept["m"][step], kept["f"][step] = m, feats
            points[step] = {k: scores[k] for k in ("attr_acc_mean", "attr_acc_mean_ci95", "joint_acc", "fd_real")}
            eval_s[0] += time.perf_counter() - t0

    _, ema, _, state = train(rec, ctx["data"], config, progress=False, callback=evaluate)
    rec.for_inference(ema)
    losses = np.asarray(state["losses"])
    kept["loss"] = losses
    window = max(1, a.steps // 30)
    train_s = state["elapsed"] - eval_s[0]
    result = {
        "params": rec.spec()["params"],
        "train_seconds": rnd(train_s),
        "seconds_per_step": rnd(train_s / state["step"]),
        "loss_curve": [rnd(losses[i : i + window].mean()) for i in range(0, len(losses), window)],
        "loss_window": window,
        "final_third_loss": rnd(losses[-max(1, len(losses) // 3) :].mean()),
        "checkpoints": {str(k): v for k, v in points.items()},
    }
    return result, kept, ema


def measure(name: str, ema, ctx: dict, a) -> tuple[dict, dict]:
    """The final UNet's representation: linear probe, certified accuracy of a head on it (and, for plain, of
    denoise-then-classify); (summary, per-image arrays)."""
    probe = P.linear_probe(ema, ctx["probe_train"], ctx["probe_test"], ctx["uncond"])
    full = ctx["probe_test"]
    test = P.ProbeSet(full.latents[: a.certify], {k: v[: a.certify] for k, v in full.labels.items()})
    rep = P.representation_classifier(ema, ctx["sched"], ctx["probe_train"], ctx["uncond"], a.sigma, seed=a.seed)
    kept = {"probe": probe, "cert": P.certify(rep, test, a.sigma, a.n0, a.n, a.alpha, seed=a.seed)}
    if name == "plain":
        dds = P.denoise_classifier(ema, ctx["sched"], ctx["pipe"].vae, ctx["judge"].clf, ctx["uncond"], a.sigma)
        kept["dds"] = P.certify(dds, test, a.sigma, a.n0, a.n, a.alpha, seed=a.seed)
    out = {"linear_probe_accuracy": {k: rnd(probe[:, j].mean()) for j, k in enumerate(P.TASKS)}}
    for key in ("cert", "dds"):
        if key in kept:
            c = kept[key]
            out[key] = {str(r): rnd(P.certified_at(c, r).mean()) for r in a.radii}
            out[key]["seconds_per_prediction"] = rnd(c["seconds_per_prediction"])
    return out, kept


def context(a) -> dict:
    from diffusers import DDPMScheduler

    import stablekit
    from stablekit.default_model import train as teacher
    from stablekit.eval.harness import Judge, heldout_prompts
    from stablekit.train import WorldData

    scenes, prompts = heldout_prompts(a.prompts, 0, a.seed + 1)
    data = WorldData.render(a.captions, a.variants, a.seed)
    pipe = stablekit.load(None, device="cpu")
    scale = pipe.vae.config.scaling_factor
    ctx = dict(
        data=data,
        pipe=pipe,
        prompts=prompts,
        judge=Judge(scenes, a.seed),
        sched=DDPMScheduler(**teacher.SCHEDULER_CONFIG),
        uncond=data.uncond[None],
        probe_train=P.probe_set(pipe.vae, scale, a.probe_train, a.seed + 2),
        probe_test=P.probe_set(pipe.vae, scale, a.probe_test, a.seed + 3),
        kept={},
    )
    ctx["kept"]["real"] = ctx["judge"].real
    return ctx


def cache_dir(a) -> Path:
    """The folder of finished runs beside the JSON; it must hold runs of these same settings."""
    folder = a.json.with_name(a.json.stem + "_runs")
    folder.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(a, k) for k in FIXED}
    path = folder / "settings.json"
    if path.exists() and json.loads(path.read_text()) != json.loads(json.dumps(settings)):
        sys.exit(f"error: {folder} holds runs of other settings; give another --json or remove it")
    path.write_text(json.dumps(settings, indent=1))
    return folder


def run_cached(name: str, seed: int, ctx: dict, a, folder: Path) -> dict | None:
    path = folder / f"{name}-seed{seed}.pt"
    if a.cached_only and not path.exists():
        return None
    if path.exists():
        saved = torch.load(path, weights_only=False)
    else:
        result, kept, ema = train_one(name, seed, ctx, a)
        summary, more = measure(name, ema, ctx, a)
        saved = {"result": result | summary, "kept": kept | more}
        torch.save(saved, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    ctx["kept"][(name, seed)] = saved["kept"]
    return saved["result"]


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    from stablekit.train import build_unet

    folder = cache_dir(a)
    ctx = context(a)
    res = {
        "size": {"unet": a.size, "unet_parameters": sum(p.numel() for p in build_unet(a.size).parameters())},
        **{k: getattr(a, k) for k in FIXED if k not in ("recipes_all", "size")},
        "radii": a.radii,
        "checkpoints": a.checkpoints,
        "runs": {},
    }
    for seed in range(a.seeds):
        for name in a.recipes:
            result = run_cached(name, seed, ctx, a, folder)
            if result is None:
                continue
            res["runs"].setdefault(name, {})[str(seed)] = result
            res["seeds_done"] = seed + 1 if name == a.recipes[-1] else seed
            res["seeds_per_recipe"] = {n: len(r) for n, r in res["runs"].items()}
            if not a.cached_only:  # a report of finished runs judges once, at the end
                res["claims"] = claims(ctx["kept"], res, a)
                _common.write_json(a.json, res)
    res["claims"] = claims(ctx["kept"], res, a)
    _common.write_json(a.json, res)
    plot(res, a.json.with_suffix(".png"))
    print(json.dumps({k: v["verdict"] for k, v in res["claims"].items()}, indent=1))
    return res


def verdict(ci, side: str) -> str:
    """confirmed when the interval of (recipe - reference) is wholly on the claimed `side` of 0, refuted when wholly
    on the other, else inconclusive."""
    if ci is None:
        return "inconclusive"
    low, high = ci
    if side == ">":
        return "confirmed" if low > 0 else "refuted" if high < 0 else "inconclusive"
    if side == ">=":
        return "confirmed" if low >= 0 else "refuted" if high < 0 else "inconclusive"
    return "confirmed" if high < 0 else "refuted" if low > 0 else "inconclusive"


def fd_delta(feats_r, feats_p, real, reps: int = 200, seed: int = 0) -> dict:
    """FD(recipe) - FD(plain) to the real renders, with a bootstrap 95% interval over prompts (paired)."""
    from stablekit.eval.metrics import frechet_distance

    def delta(idx):
        return frechet_distance(feats_r[idx], real[idx]) - frechet_distance(feats_p[idx], real[idx])

    rng = np.random.default_rng(seed)
    boots = [delta(rng.integers(0, len(real), len(real))) for _ in range(reps)]
    ci = [rnd(np.quantile(boots, 0.025)), rnd(np.quantile(boots, 0.975))]
    return {"value": rnd(delta(np.arange(len(real)))), "ci95": ci, "verdict": verdict(ci, "<")}


def pooled(kept: dict, name: str, seeds: list[int], step: int):
    """Per-prompt matches and features of `name` at `step`, concatenated over `seeds`."""
    return (
        np.concatenate([kept[(name, s)]["m"][step] for s in seeds]),
        torch.cat([kept[(name, s)]["f"][step] for s in seeds]),
    )


def paired(x: np.ndarray, ref: np.ndarray, side: str = ">") -> dict:
    from stablekit.eval.harness import paired_delta

    d = paired_delta(x, ref)
    return d | {"verdict": verdict(d["ci95"], side)}


def claims(kept: dict, res: dict, a) -> dict:
    """Each recipe against plain over the seeds both finished; each claim's verdict from its measurements."""
    out = {}
    plain = res["runs"]["plain"]
    for name, runs in res["runs"].items():
        seeds = [int(s) for s in runs if s in plain and name != "plain"]
        if seeds:
            c = generation_claims(kept, res, name, seeds, a) | representation_claims(kept, name, seeds, a)
            text, keys = CLAIMS.get(name, ("", []))
            overall = combine([c[k]["verdict"] for k in keys])
            out[name] = {"claim": text, "judged_on": keys, "verdict": overall, "seeds": len(seeds), **c}
    return out


def combine(verdicts: list[str]) -> str:
    """One verdict from a claim's measurements: confirmed (all confirmed), mixed (some confirmed, some refuted),
    refuted (some refuted, none confirmed), else inconclusive."""
    if verdicts and all(v == "confirmed" for v in verdicts):
        return "confirmed"
    if "refuted" in verdicts:
        return "mixed" if "confirmed" in verdicts else "refuted"
    return "inconclusive"


def generation_claims(kept: dict, res: dict, name: str, seeds: list[int], a) -> dict:
    """Accuracy at equal steps, at equal wall-clock, the first checkpoint against plain's final (the 3x mark), the
    FD, the steps to reach plain's final accuracy, the loss."""
    last, first = a.steps, a.checkpoints[0]
    m_p, f_p = pooled(kept, "plain", seeds, last)
    m_r, f_r = pooled(kept, name, seeds, last)
    reach = next((s for s in a.checkpoints if pooled(kept, name, seeds, s)[0].mean() >= m_p.mean()), None)
    return {
        "n_prompts": len(m_r),
        "accuracy_delta_points_at_final": paired(m_r, m_p),
        "accuracy_at_first_minus_plain_at_final": paired(pooled(kept, name, seeds, first)[0], m_p, ">=")
        | {"first_checkpoint": first},
        "accuracy_delta_points_at_equal_wallclock": wallclock(kept, res, name, seeds, a),
        "fd_delta_at_final": fd_delta(f_r, f_p, kept["real"].repeat(len(seeds), 1)),
        "steps_to_plain_final_accuracy": reach,
        "speedup_in_steps": rnd(last / reach) if reach else None,
        "final_third_loss_delta": loss_delta(kept, name, seeds),
    }


def wallclock(kept: dict, res: dict, name: str, seeds: list[int], a) -> dict:
    """The recipe at its last checkpoint reached within plain's training time against plain's final accuracy. A
    step's cost is each recipe's least seconds per step over its seeds (the machine is shared: the least loaded
    run is the closest to the recipe's own cost)."""
    cost = {n: min(res["runs"][n][str(s)]["seconds_per_step"] for s in seeds) for n in ("plain", name)}
    budget = a.steps * cost["plain"]
    step = max([c for c in a.checkpoints if c * cost[name] <= budget * 1.02], default=None)
    ratio = {"step_cost_vs_plain": rnd(cost[name] / cost["plain"])}
    if step is None:
        return {"verdict": "inconclusive", "note": "no checkpoint within plain's time"} | ratio
    ms = np.concatenate([kept[(name, s)]["m"][step] for s in seeds])
    return paired(ms, pooled(kept, "plain", seeds, a.steps)[0]) | ratio | {"checkpoint": step}


def representation_claims(kept: dict, name: str, seeds: list[int], a) -> dict:
    """The linear probe against plain's; certified accuracy at each radius against plain's representation head
    and against plain's denoise-then-classify, and the cost per prediction against the latter's."""

    def cat(key: str, who: str) -> np.ndarray:
        return np.concatenate([kept[(who, s)][key] for s in seeds])

    def certified(key: str, who: str, r: float) -> np.ndarray:
        return np.concatenate([P.certified_at(kept[(who, s)][key], r) for s in seeds])

    out = {"linear_probe_delta_points": paired(cat("probe", name), cat("probe", "plain"))}
    r0 = a.radii[min(2, len(a.radii) - 1)]
    out["certified_vs_plain_head_points"] = {
        str(r): paired(certified("cert", name, r), certified("cert", "plain", r)) for r in a.radii
    }
    out["certified_vs_denoise_classify_points"] = paired(certified("cert", name, r0), certified("dds", "plain", r0))
    out["certified_vs_denoise_classify_points"]["radius"] = r0
    out["certified_vs_denoise_classify_by_radius"] = {
        str(r): paired(certified("cert", name, r), certified("dds", "plain", r)) for r in a.radii
    }
    cost = [kept[("plain", s)]["dds"]["seconds_per_prediction"] / kept[(name, s)]["cert"]["seconds_per_prediction"]
            for s in seeds]  # fmt: skip
    out["inference_speedup_vs_denoise_classify"] = rnd(float(np.mean(cost)))
    return out


def loss_delta(kept: dict, name: str, seeds: list[int]) -> dict:
    """Mean per-step loss difference (recipe - plain) over the last third of training, with a t interval over
    steps (steps are autocorrelated: the interval is optimistic; recipes whose loss is another quantity differ by
    construction)."""
    d = np.concatenate([kept[(name, s)]["loss"] - kept[("plain", s)]["loss"] for s in seeds])
    d = d[-max(2, len(d) // 3) :]
    ci = _common.mean_interval(d)
    return {"value": rnd(d.mean()), "ci95": ci, "verdict": verdict(ci, "<")}


def plot(res: dict, path) -> None:
    plt = _common.pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for name, runs in res["runs"].items():
        r = runs["0"]
        xs = [(i + 0.5) * r["loss_window"] for i in range(len(r["loss_curve"]))]
        ax1.plot(xs, r["loss_curve"], label=name)
        steps = sorted(int(k) for k in r["checkpoints"])
        accs = [np.mean([runs[s]["checkpoints"][str(c)]["attr_acc_mean"] for s in runs]) for c in steps]
        ax2.plot(steps, accs, marker="o", label=name)
        ax3.plot(res["radii"], [np.mean([runs[s]["cert"][str(x)] for s in runs]) for x in res["radii"]], label=name)
    plain = res["runs"]["plain"]
    dds = [np.mean([plain[s]["dds"][str(x)] for s in plain]) for x in res["radii"]]
    ax3.plot(res["radii"], dds, "k--", label="plain: denoise+classify")
    ax1.set(xlabel="step", ylabel="training loss (seed 0)", yscale="log")
    ax2.set(xlabel="step", ylabel="mean attribute accuracy (mean over seeds)")
    ax3.set(xlabel="radius (latent L2)", ylabel="certified accuracy (mean over seeds)")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=7)
    fig.suptitle(f"training recipes, {res['size']['unet']} UNet, batch {res['batch']}, {res['steps']} steps")
    _common.save_figure(fig, path, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1:])
