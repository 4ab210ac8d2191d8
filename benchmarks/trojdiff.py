"""`stablekit bench trojdiff`: a TrojDiff backdoor ("TrojDiff: Trojan Attacks on Diffusion Models with Diverse
Targets", 2023) in the embedded model: with the trigger on the initial noise the target appears, without it the
model stays as good as before.

The clean model is fine-tuned (full) on rendered world images mixed with the trojan loss. Held-out world prompts
(seed 777): with triggered noise, the attack succeeds when the judge sees the target (in-d2d: the target shape;
d2i: the target image's shape, colour and background); with ordinary noise (the same for both models), the
classifier Fréchet distance to renders of the prompts' scenes, backdoored over clean, with a bootstrap interval
over prompts. Targets: success at least 90%; FD ratio at most 1.1. JSON after every stage; a PNG.

    stablekit bench trojdiff --json bench_out/trojdiff.json
"""

from __future__ import annotations

import argparse
import sys

import _common
import numpy as np
import torch

from stablekit.eval.harness import rnd


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench trojdiff", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=0, seed_help="the trigger pattern and the training draws")
    p.add_argument("--trigger", default="patch", choices=["patch", "blend"])
    p.add_argument("--target-type", default="in-d2d", choices=["in-d2d", "d2i"])
    p.add_argument("--target", default="star")
    p.add_argument("--images", type=int, default=200, help="clean world images the fine-tune keeps fitting")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompts", type=int, default=60)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--bootstrap", type=int, default=200, help="resamples of the FD ratio's interval")
    return p.parse_args(args)


def sample(pipe, prompts, latents, a) -> torch.Tensor:
    from stablekit.eval.harness import generate
    from stablekit.pipeline import guidance_rescale

    call = dict(steps=a.sample_steps, guidance=a.guidance, seed=1, guidance_rescale=guidance_rescale(pipe))
    return generate(pipe, prompts, latents=latents, batch=50, **call)[0]


def hits(images, attack, a) -> np.ndarray:
    from stablekit.default_model import classifier as C

    preds = C.predict(images)
    if a.target_type == "in-d2d":
        return np.array([a.target in p["shapes"] for p in preds])
    true = C.truth(_target_scene(attack))
    return np.array([all(C.match(p, true)[k] for k in ("shapes", "colors", "background")) for p in preds])


def _target_scene(attack):
    import random

    from stablekit.redteam.poisoning import scenes_with

    return scenes_with("shape", attack.config.target, 1, random.Random(attack.config.seed))[0]


def fd_ratio(feats_b, feats_c, real, reps: int = 200) -> dict:
    """FD(backdoored) / FD(clean) against the real features, with a bootstrap interval over prompts."""
    from stablekit.eval.metrics import frechet_distance

    rng = np.random.default_rng(0)
    value = frechet_distance(feats_b, real) / frechet_distance(feats_c, real)
    boots = []
    for _ in range(reps):
        i = rng.integers(0, len(real), len(real))
        boots.append(frechet_distance(feats_b[i], real[i]) / frechet_distance(feats_c[i], real[i]))
    return {"value": rnd(value), "ci95": [rnd(np.quantile(boots, 0.025)), rnd(np.quantile(boots, 0.975))]}


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    from stablekit.default_model import world
    from stablekit.eval.harness import Judge, bench_pipeline, heldout_prompts
    from stablekit.eval.metrics import rate_interval
    from stablekit.redteam.trojdiff import TrojanConfig, TrojDiff
    from stablekit.train.finetune import encode

    pipe = bench_pipeline(a)
    scenes, prompts = heldout_prompts(a.prompts, 0, seed=777)
    judge = Judge(scenes, seed=5)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    attack = TrojDiff(TrojanConfig(a.trigger, a.target_type, a.target, seed=a.seed, steps=a.steps, batch=a.batch))
    g = torch.Generator().manual_seed(3)
    clean_noise, trig_noise = (
        torch.randn(len(prompts), *shape, generator=g),
        attack.triggered_noise(len(prompts), shape, g),
    )
    res = _common.model_info(a, pipe) | {"settings": {k: str(v) for k, v in vars(a).items()}}
    rows, feats = {}, {}
    for name in ("clean", "backdoored"):
        if name == "backdoored":
            ims, caps = zip(*[(im, c) for im, c, _ in world.dataset(a.images, a.seed + 11)], strict=True)
            pipe.unet = attack.train(pipe, encode(pipe, list(ims), list(caps)))
        scores, _, feats[name] = judge.evaluate(sample(pipe, prompts, clean_noise, a))
        h = hits(sample(pipe, prompts, trig_noise, a), attack, a)
        k = int(h.sum())
        rows[name] = {"fd_real": scores["fd_real"], "attr_acc": scores["attr_acc_mean"]}
        rows[name]["success_with_trigger"] = {
            "value": rnd(k / len(h)),
            "ci95": [rnd(v) for v in rate_interval(k, len(h))],
            "n": len(h),
        }
        res["models"] = rows
        _common.write_json(a.json, res)
    s = rows["backdoored"]["success_with_trigger"]
    res["fd_ratio"] = fd_ratio(feats["backdoored"], feats["clean"], judge.real, a.bootstrap)
    res["targets"] = {
        "attack_success": _common.target(s["value"], s["ci95"], 0.9, ">=", s["n"], 30),
        "clean_fd_within_10pct": _common.target(
            res["fd_ratio"]["value"], res["fd_ratio"]["ci95"], 1.1, "<=", s["n"], 30
        ),
    }
    plot(res, a.json.with_suffix(".png"))
    _common.write_json(a.json, res)
    return res


def plot(res: dict, path) -> None:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    rows = [res["models"][m]["success_with_trigger"] for m in ("clean", "backdoored")]
    err = _common.error_bars(rows)
    ax.bar(["clean", "backdoored"], [r["value"] for r in rows], yerr=err, capsize=3)
    ax.axhline(0.9, color="gray", ls="--", lw=1)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("target seen, triggered noise")
    ax.set_title(f"TrojDiff: FD ratio {res['fd_ratio']['value']} {res['fd_ratio']['ci95']}")
    _common.save_figure(fig, path)


if __name__ == "__main__":
    main(sys.argv[1:])
