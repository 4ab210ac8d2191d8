"""`stablekit bench training`: the training recipes side by side, from one initialisation and one rendered world,
for the same number of steps at a reduced size.

For every seed (the UNet's initialisation and every training draw; the world is the same for all) each recipe
trains a fresh UNet; at fixed checkpoints its EMA weights generate one image per held-out prompt (same noise for
every recipe), judged by the attribute classifier: mean attribute accuracy and the classifier Fréchet distance
to renders of the prompts' scenes. The loss curve, the training seconds per step and the steps each recipe needs
to reach plain's final accuracy are recorded. Each paper's claim is judged against plain on paired 95% intervals
over prompts (pooled over seeds): confirmed, refuted or inconclusive. JSON after every run; a PNG of the curves.

    stablekit bench training --json bench_out/training.json --size small --steps 300 --seeds 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import _common
import numpy as np
import torch

from stablekit.eval.harness import rnd

CLAIMS = {  # recipe: (the paper's claim, the measurement that tests it, the side it should be on vs plain)
    "immiscible": "faster training: higher accuracy at equal steps; plain's final accuracy in a third of the steps",
    "scalelong": "more stable, faster training: higher accuracy at equal steps, lower final loss",
    "corruption": "better quality and diversity: lower classifier FD and higher accuracy at equal steps",
}


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench training", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=0, seed_help="the world's data seed", model=False)
    p.add_argument("--recipes", nargs="+", default=["plain", "immiscible", "scalelong", "corruption"])
    p.add_argument("--seeds", type=int, default=1, help="training seeds per recipe")
    p.add_argument("--size", default="small", choices=["default", "small", "tiny"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--captions", type=int, default=400)
    p.add_argument("--variants", type=int, default=2)
    p.add_argument("--prompts", type=int, default=48, help="held-out prompts judged at each checkpoint")
    p.add_argument("--sample-steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=4.0)
    a = p.parse_args(args)
    if a.recipes[0] != "plain":
        p.error("--recipes must start with plain, the reference")
    a.checkpoints = sorted({max(1, a.steps // 3), max(1, 2 * a.steps // 3), a.steps})
    return a


def sample(pipe, unet, recipe, prompts: list[str], a) -> torch.Tensor:
    """Images of `prompts` from a copy of `unet` (the recipe's additions put on it) in the loaded pipeline."""
    from stablekit.eval.harness import generate

    net = copy.deepcopy(unet).eval()
    recipe.for_inference(net)
    pipe.unet = net
    images, _ = generate(pipe, prompts, steps=a.sample_steps, guidance=a.guidance, seed=a.seed, batch=a.prompts)
    return images


def run_one(name: str, seed: int, ctx: dict, a) -> dict:
    """One recipe, one seed: the loss curve, the seconds per training step, and at each checkpoint the judge's
    scores (per-prompt matches and features kept in `ctx` for the paired intervals)."""
    from stablekit.train import TrainConfig, recipe, train

    rec = recipe(name)
    config = TrainConfig(
        steps=a.steps, batch=a.batch, seed=seed, data_seed=a.seed, size=a.size, warmup=max(1, a.steps // 10),
        captions=a.captions, variants=a.variants,
    )  # fmt: skip
    points, eval_s = {}, [0.0]

    def evaluate(step: int, ema) -> None:
        if step in a.checkpoints:
            t0 = time.perf_counter()
            scores, m, feats = ctx["judge"].evaluate(sample(ctx["pipe"], ema, rec, ctx["prompts"], a))
            ctx["kept"][(name, seed, step)] = (m, feats)
            points[step] = {k: scores[k] for k in ("attr_acc_mean", "attr_acc_mean_ci95", "joint_acc", "fd_real")}
            eval_s[0] += time.perf_counter() - t0

    _, _, _, state = train(rec, ctx["data"], config, progress=False, callback=evaluate)
    losses = np.asarray(state["losses"])
    ctx["kept"][(name, seed, "loss")] = losses
    window = max(1, a.steps // 30)
    curve = [rnd(losses[i : i + window].mean()) for i in range(0, len(losses), window)]
    return {
        "params": rec.spec()["params"],
        "seconds_per_step": rnd((state["elapsed"] - eval_s[0]) / state["step"]),
        "loss_curve": curve,
        "loss_window": window,
        "final_third_loss": rnd(losses[-max(1, len(losses) // 3) :].mean()),
        "checkpoints": {str(k): v for k, v in points.items()},
    }


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    import stablekit
    from stablekit.eval.harness import Judge, heldout_prompts
    from stablekit.train import WorldData, build_unet

    scenes, prompts = heldout_prompts(a.prompts, 0, a.seed + 1)
    ctx = dict(
        data=WorldData.render(a.captions, a.variants, a.seed),
        pipe=stablekit.load(None, device="cpu"),
        prompts=prompts,
        judge=Judge(scenes, a.seed),
        kept={},
    )
    ctx["kept"]["real"] = ctx["judge"].real
    res = {
        "size": {"unet": a.size, "unet_parameters": sum(p.numel() for p in build_unet(a.size).parameters())},
        **{k: getattr(a, k) for k in ("steps", "batch", "captions", "variants", "prompts", "sample_steps")},
        "guidance": a.guidance,
        "data_seed": a.seed,
        "checkpoints": a.checkpoints,
        "runs": {},
    }
    for seed in range(a.seeds):
        for name in a.recipes:
            res["runs"].setdefault(name, {})[str(seed)] = run_one(name, seed, ctx, a)
            res["seeds_done"] = seed + 1 if name == a.recipes[-1] else seed
            res["claims"] = claims(ctx["kept"], res, a)
            _common.write_json(a.json, res)
    plot(res, a.json.with_suffix(".png"))
    print(_common.json.dumps(res["claims"], indent=1))
    return res


def verdict(ci, side: str) -> str:
    """confirmed when the interval of (recipe - plain) is wholly on the claimed `side` of 0, refuted when wholly on
    the other, else inconclusive."""
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
        np.concatenate([kept[(name, s, step)][0] for s in seeds]),
        torch.cat([kept[(name, s, step)][1] for s in seeds]),
    )


def claims(kept: dict, res: dict, a) -> dict:
    """Each recipe against plain over the seeds both finished: accuracy at equal steps, the first checkpoint's
    accuracy against plain's final one (the 3x mark), the FD, and the steps to reach plain's final accuracy."""
    from stablekit.eval.harness import paired_delta

    out, last, first = {}, a.steps, a.checkpoints[0]
    plain = res["runs"]["plain"]
    for name, runs in res["runs"].items():
        seeds = [int(s) for s in runs if s in plain and name != "plain"]
        if not seeds:
            continue
        m_p, f_p = pooled(kept, "plain", seeds, last)
        m_r, f_r = pooled(kept, name, seeds, last)
        acc = paired_delta(m_r, m_p)
        early = paired_delta(pooled(kept, name, seeds, first)[0], m_p)
        target = m_p.mean()
        reach = next((s for s in a.checkpoints if pooled(kept, name, seeds, s)[0].mean() >= target), None)
        out[name] = {
            "claim": CLAIMS.get(name, ""),
            "n_prompts": len(m_r),
            "seeds": len(seeds),
            "accuracy_delta_points_at_final": acc | {"verdict": verdict(acc["ci95"], ">")},
            f"accuracy_at_{first}_minus_plain_at_{last}_points": early | {"verdict": verdict(early["ci95"], ">=")},
            "fd_delta_at_final": fd_delta(f_r, f_p, kept["real"].repeat(len(seeds), 1)),
            "steps_to_plain_final_accuracy": reach,
            "speedup_in_steps": rnd(last / reach) if reach else None,
            "final_third_loss_delta": loss_delta(kept, name, seeds),
        }
    return out


def loss_delta(kept: dict, name: str, seeds: list[int]) -> dict:
    """Mean per-step loss difference (recipe - plain) over the last third of training, with a t interval over
    steps (steps are autocorrelated: the interval is optimistic)."""
    d = np.concatenate([kept[(name, s, "loss")] - kept[("plain", s, "loss")] for s in seeds])
    d = d[-max(2, len(d) // 3) :]
    ci = _common.mean_interval(d)
    return {"value": rnd(d.mean()), "ci95": ci, "verdict": verdict(ci, "<")}


def plot(res: dict, path) -> None:
    plt = _common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in res["runs"].items():
        r = runs["0"]
        xs = [(i + 0.5) * r["loss_window"] for i in range(len(r["loss_curve"]))]
        ax1.plot(xs, r["loss_curve"], label=name)
        steps = sorted(int(k) for k in r["checkpoints"])
        ax2.plot(steps, [r["checkpoints"][str(s)]["attr_acc_mean"] for s in steps], marker="o", label=name)
    ax1.set(xlabel="step", ylabel="training loss (seed 0)", yscale="log")
    ax2.set(xlabel="step", ylabel="mean attribute accuracy (seed 0)")
    ax1.legend()
    ax2.legend()
    fig.suptitle(f"training recipes, {res['size']['unet']} UNet, batch {res['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
