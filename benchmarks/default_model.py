"""Benchmark the embedded default model: prompt fidelity judged by the attribute classifier.

    python benchmarks/default_model.py --json bench_out/default_model.json   # or: stablekit bench default-model
    stablekit bench default-model --json out.json --ray [ADDRESS]           # the images made on a Ray cluster

Held-out world scenes (seed 777; the training data used seed 0) give the prompts: their
paraphrased captions. Each prompt gets its own noise seed. The classifier judges every generated
image against its scene: shape, colour, background, texture and count on single-object prompts
(the headline), the same as set matches on two-object prompts (25% as many), each with a 95%
Clopper-Pearson interval; a Fréchet distance on the classifier's features between the generated
images and renders of the same scenes (with, for scale, the distance between two independent sets of
renders of that size); the classifier's own accuracy on those renders (``real_*``) and on their
round trip through the model's autoencoder (``recon_*``, the ceiling for the generator, and its mean
per-image PSNR ``vae_psnr_db``); and
seconds per image (of work, a batch's time shared by its images). The images are generated as rows of the batch
engine (``stablekit batch``'s, ``--batch`` rows a batch): in this process, on ``--workers`` processes or on Ray
(``--ray``), with the same results. Writes the JSON and a PNG grid of samples with their prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _common
import numpy as np
import torch

from stablekit.eval.harness import ATTRS


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Real images through the model's autoencoder: the best its generator can do."""
    out = [
        vae.decode(vae.encode((x[i : i + batch] * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean).sample
        for i in range(0, len(x), batch)
    ]
    return ((torch.cat(out).float().cpu() + 1) / 2).clamp(0, 1)


def scores(preds: list[dict], scenes, prefix: str) -> dict:
    """Accuracy and 95% interval per attribute (and jointly for shape+colour+background)."""
    from stablekit.default_model.classifier import match, truth
    from stablekit.eval.metrics import rate_interval

    ms = [match(p, truth(s)) for p, s in zip(preds, scenes, strict=False)]
    for m in ms:
        m["joint"] = m["shapes"] and m["colors"] and m["background"]
    res = {}
    for key, name in list(ATTRS.items()) + [("joint", "joint")]:
        k = int(sum(m[key] for m in ms))
        res[f"{prefix}{name}_acc"] = round(k / len(ms), 4) if ms else None
        res[f"{prefix}{name}_acc_ci95"] = [round(v, 4) for v in rate_interval(k, len(ms))]
    return res


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench default-model", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=777, seed_help="held-out scene seed (training used 0)")
    p.add_argument("--prompts", type=int, default=300, help="single-object prompts (two-object: 25%% as many)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--guidance-rescale",
        type=float,
        default=None,
        help="default: stablekit.pipeline.guidance_rescale(pipe), as `stablekit generate` uses",
    )
    p.add_argument("--grid", type=Path, default=None, help="PNG grid of samples (default: next to the JSON)")
    p.add_argument("--batch", type=int, default=32, help="images generated together")
    _common.add_executor_args(p)
    a = p.parse_args(args)
    a.grid = a.grid or a.json.with_suffix(".png")
    return a


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    import stablekit
    from stablekit.eval.harness import grid, heldout_prompts

    pipe = stablekit.load(a.model, device=a.device)
    n_pair = max(1, round(0.25 * a.prompts))
    scenes, prompts = heldout_prompts(a.prompts, n_pair, a.seed)
    if a.guidance_rescale is None:
        a.guidance_rescale = stablekit.pipeline.guidance_rescale(pipe)
    settings = {"steps": a.steps, "guidance": a.guidance}
    settings |= {"guidance_rescale": a.guidance_rescale} if a.guidance > 1 else {}  # off with guidance
    rows = [{"prompt": p, "seed": a.seed * 100_000 + i} | settings for i, p in enumerate(prompts)]
    with _common.executor(a):
        images, records = _common.generate_rows(a, pipe, rows)
    sec_per_image = _common.seconds_per_image(records)
    res = {
        **_common.model_info(a, pipe),
        "steps": a.steps,
        "guidance": a.guidance,
        "guidance_rescale": a.guidance_rescale,
        "seed": a.seed,
        "prompts": a.prompts,
        "two_object_prompts": n_pair,
    }
    res |= judged(pipe, images, scenes, prompts, a)
    res |= {"seconds_per_image": round(sec_per_image, 4), "batch": a.batch, "image_size": list(images.shape[-2:])}
    _common.write_json(a.json, res)
    order = list(range(min(36, a.prompts))) + list(range(a.prompts, a.prompts + min(12, n_pair)))
    grid(images[order], [prompts[i] for i in order], a.grid)
    keep = ("fid_classifier", "fid_classifier_real_vs_real", "seconds_per_image")
    print(json.dumps({k: v for k, v in res.items() if k.endswith("_acc") or k in keep}, indent=1))
    print(f"wrote {a.json} and {a.grid}")
    return res


def judged(pipe, images: torch.Tensor, scenes, prompts: list[str], a) -> dict:
    """The classifier's scores of the generated images, of renders of their scenes and of the renders' round trip
    through the autoencoder; the Fréchet distances; sample predictions."""
    from stablekit.default_model import classifier as C
    from stablekit.default_model import world
    from stablekit.eval.harness import heldout_prompts
    from stablekit.eval.metrics import frechet_distance, psnr

    nrng = np.random.default_rng(a.seed)
    real = C.to_tensor([world.render(s, nrng) for s in scenes])
    other_scenes, _ = heldout_prompts(a.prompts, len(scenes) - a.prompts, a.seed + 1)
    other = C.to_tensor([world.render(s, nrng) for s in other_scenes])
    recon = reconstruct(pipe.vae, real, a.batch)
    clf = C.load_classifier()
    preds = {k: C.predict(x, clf) for k, x in (("", images), ("real_", real), ("recon_", recon))}
    with torch.no_grad():
        feats = {
            k: torch.cat([clf.features(C.to_tensor(x[i : i + 256])) for i in range(0, len(x), 256)])
            for k, x in (("gen", images), ("real", real), ("other", other))
        }
    single, pair = slice(0, a.prompts), slice(a.prompts, None)
    res = {}
    for k, p in preds.items():
        res |= scores(p[single], scenes[single], k) | scores(p[pair], scenes[pair], f"{k}two_object_")
    res["fid_classifier"] = round(frechet_distance(feats["gen"], feats["real"]), 4)
    res["fid_classifier_real_vs_real"] = round(frechet_distance(feats["other"], feats["real"]), 4)
    res["vae_psnr_db"] = round(float(np.mean([psnr(r, x) for r, x in zip(recon, real, strict=False)])), 2)
    res["samples"] = [{"prompt": p, "pred": d} for p, d in zip(prompts[:8], preds[""][:8], strict=False)]
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
