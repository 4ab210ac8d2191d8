"""Benchmark super-resolution: ResShift against bicubic interpolation and the plain diffusion baseline.

    python benchmarks/restore.py --json bench_out/restore.json   # or: stablekit bench restore

High-resolution 64x64 images -- held-out scenes of the embedded world (seed 4242; training used 0) and crops of
scikit-image photos never trained on -- are reduced 4x by anti-aliased bicubic filtering and restored by: bicubic
interpolation (the degraded input at full size), ResShift at its 4 steps (its stochastic chain, its deterministic
chain from random noise, and that chain from its optimal boundary condition, ``restore/obc.py``), the conditional
diffusion baseline (same network, data and training budget) at 50 DDIM steps and at ``--obc-steps``, each from
random noise and from its optimal boundary condition. Per image: PSNR
and SSIM (scikit-image) against the original, and a perceptual distance: the L2 distance between the attribute
classifier's features of the output and of the original, divided by the feature norm of the original. Per method:
network calls and seconds per image.
Intervals are Student-t 95% intervals over images; the target compares ResShift with the baseline image by image
(the paired PSNR difference): "matches or beats" is met when the whole interval is above -0.25 dB; each boundary
condition must beat its model's random start at equal steps (paired PSNR difference above 0).

With ``--edits N``, PixelMan moves the object of N held-out world scenes (see ``_restore_edit.py``); with
``--asym N``, the asymmetric decoder against the VAE's on reconstruction, edits and text-to-image
(see ``_restore_asymvq.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _common
import _restore_asymvq
import _restore_edit
import numpy as np
import torch

MATCH_MARGIN_DB = 0.25


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench restore", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=4242, seed_help="held-out scene seed (training used 0)", model=False)
    p.add_argument("--images", type=int, default=64, help="held-out world scenes to upscale (0: no super-resolution)")
    p.add_argument("--photos", type=int, default=48, help="crops of the held-out scikit-image photos (0: none)")
    p.add_argument("--baseline-steps", type=int, default=50, help="DDIM steps of the diffusion baseline")
    p.add_argument("--obc-steps", type=int, default=10, help="DDIM steps of the optimal-boundary-condition sampler")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--edits", type=int, default=40, help="world scenes whose object PixelMan moves (0: none)")
    p.add_argument(
        "--asym", type=int, default=32, help="scenes, edits and prompts for the asymmetric decoder (0: none)"
    )
    p.add_argument("--asym-steps", type=int, default=10, help="diffusion steps of its edits and generations")
    return p.parse_args(args)


def per_image(out: torch.Tensor, hr: torch.Tensor, classifier) -> dict[str, list[float]]:
    """PSNR, SSIM and the classifier-feature distance of each output image to its original."""
    from skimage.metrics import structural_similarity

    from stablekit.latents import psnr

    with torch.no_grad():
        fo, fh = classifier.features(out), classifier.features(hr)
    dist = ((fo - fh).norm(dim=1) / fh.norm(dim=1)).tolist()
    a, b = out.permute(0, 2, 3, 1).double().numpy(), hr.permute(0, 2, 3, 1).double().numpy()
    return {
        "psnr_db": [psnr(x, y) for x, y in zip(a, b, strict=True)],
        "ssim": [structural_similarity(x, y, channel_axis=2, data_range=1.0) for x, y in zip(a, b, strict=True)],
        "feature_distance": dist,
    }


def run_method(name: str, fn, lr: torch.Tensor, a) -> tuple[torch.Tensor, int, float]:
    """All images restored by `fn` in batches: outputs, network calls per image, seconds per image."""
    outs, calls = [], 0
    start = _common.clock()
    for i in range(0, len(lr), a.batch):
        out, calls = fn(lr[i : i + a.batch], seed=a.seed + i)
        outs.append(out)
    return torch.cat(outs), calls, (_common.clock() - start) / len(lr)


def methods(a) -> dict:
    from stablekit.restore import obc, resshift, sr_diffusion, sr_net

    resshift_net = sr_net.load_net(sr_net.WEIGHTS / "resshift_x4.safetensors")
    baseline_net = sr_net.load_net(sr_net.WEIGHTS / "sr_diffusion_x4.safetensors")
    out = {
        "bicubic": lambda lr, seed: (sr_net.upsample(lr), 0),
        "resshift": lambda lr, seed: resshift.super_resolve(lr, resshift_net, seed=seed),
        "resshift_ode": lambda lr, seed: random_start(resshift_net, lr, seed),
        "obc_resshift": lambda lr, seed: obc.super_resolve(lr, resshift_net, obc.load_boundary("resshift")),
    }
    boundary = obc.load_boundary("sr_diffusion")
    for steps in dict.fromkeys((a.baseline_steps, a.obc_steps)):
        config = sr_diffusion.SRDiffusionConfig(steps=steps)
        out[f"diffusion_{steps}"] = lambda lr, seed, c=config: sr_diffusion.super_resolve(
            lr, baseline_net, config=c, seed=seed
        )
        out[f"obc_diffusion_{steps}"] = lambda lr, seed, k=steps: obc.super_resolve(
            lr, baseline_net, boundary, model="sr_diffusion", steps=k
        )
    return out


def random_start(net, lr: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
    """ResShift's deterministic chain from random noise: the plain start the boundary condition replaces."""
    from stablekit.restore import resshift, sr_net

    chain = resshift.ResShift()
    y0 = sr_net.upsample(lr) * 2 - 1
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(seed))
    return ((chain.sample_ode(net, y0, noise) + 1) / 2).clamp(0, 1), chain.config.steps


def paired_target(sets: dict, better: str, worse: str, threshold: float, measure: str) -> dict:
    diff = np.subtract(sets[better]["psnr_db"], sets[worse]["psnr_db"])
    side = ">" if threshold == 0 else ">="
    return _common.target(
        float(diff.mean()), _common.mean_interval(diff), threshold, side, len(diff), 20, measure=measure
    )


def summarise(scores: dict[str, list[float]], calls: int, seconds: float) -> dict:
    out = {"n": len(scores["psnr_db"]), "network_calls": calls, "seconds_per_image": round(seconds, 4)}
    for k, xs in scores.items():
        out[k] = float(np.mean(xs))
        out[f"{k}_ci95"] = _common.mean_interval(xs)
    return out


def evaluate_set(hr: torch.Tensor, a, classifier) -> tuple[dict, dict, dict]:
    """Every method on one set: summaries, per-image scores, and the outputs of the first images."""
    from stablekit.restore import sr_net

    lr = sr_net.degrade(hr)
    summary, raw, shown = {}, {}, {}
    for name, fn in methods(a).items():
        out, calls, seconds = run_method(name, fn, lr, a)
        raw[name] = per_image(out, hr, classifier)
        summary[name] = summarise(raw[name], calls, seconds)
        shown[name] = out[:6]
    return summary, raw, shown


def targets(raw: dict, a) -> dict:
    base = f"diffusion_{a.baseline_steps}"
    out = {}
    for name, sets in raw.items():
        out[f"resshift_matches_{base}_{name}"] = paired_target(
            sets, "resshift", base, -MATCH_MARGIN_DB, "paired PSNR difference resshift - baseline (dB)"
        )
        out[f"resshift_beats_bicubic_{name}"] = paired_target(
            sets, "resshift", "bicubic", 0.0, "paired PSNR difference resshift - bicubic (dB)"
        )
        for plain in ("resshift", "resshift_ode"):
            out[f"obc_resshift_beats_{plain}_{name}"] = paired_target(
                sets, "obc_resshift", plain, 0.0, f"paired PSNR difference obc - {plain}, 4 steps each (dB)"
            )
        for steps in dict.fromkeys((a.obc_steps, a.baseline_steps)):
            out[f"obc_beats_diffusion_{steps}_{name}"] = paired_target(
                sets, f"obc_diffusion_{steps}", f"diffusion_{steps}", 0.0,
                f"paired PSNR difference obc - plain random-start sampler at {steps} steps (dB)",
            )  # fmt: skip
    return out


def plot(res: dict, shown: dict, hr: torch.Tensor, path: Path) -> None:
    plt = _common.pyplot()
    names = list(shown)
    fig, axes = plt.subplots(len(names) + 1, 6, figsize=(9, 1.6 * (len(names) + 1)))
    for j in range(min(6, len(hr))):
        axes[0, j].imshow(hr[j].permute(1, 2, 0).numpy())
        for i, name in enumerate(names):
            axes[i + 1, j].imshow(shown[name][j].permute(1, 2, 0).numpy())
    for i, name in enumerate(["original", *names]):
        psnr = res["sets"]["world"][name]["psnr_db"] if name in res["sets"]["world"] else None
        axes[i, 0].set_ylabel(name + (f"\n{psnr:.2f} dB" if psnr else ""), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def super_resolution(a, res: dict) -> None:
    """The super-resolution part: every method on the world and photo sets, the plot and the targets."""
    from stablekit.default_model.classifier import load_classifier
    from stablekit.restore import sr_net

    classifier = load_classifier().eval()
    sets = {"world": sr_net.world_images(a.images, a.seed)}
    if a.photos:
        sets["photos"] = sr_net.photo_crops(sr_net.HELDOUT_PHOTOS, a.photos, a.seed)
    res |= {"scale": sr_net.SCALE, "heldout_photos": list(sr_net.HELDOUT_PHOTOS), "sets": {}}
    raw = {}
    for name, hr in sets.items():
        res["sets"][name], raw[name], shown = evaluate_set(hr, a, classifier)
        if name == "world":
            plot(res, shown, hr, a.json.with_suffix(".png"))
        _common.write_json(a.json, res)
    res["targets"] |= targets(raw, a)


def main(args=None):
    a = parse(sys.argv[1:] if args is None else args)
    _common.set_threads(a)
    res = {"targets": {}}
    if a.images:
        super_resolution(a, res)
        _common.write_json(a.json, res)
    if a.edits:
        res["pixelman"] = _restore_edit.run(embedded_pipeline(), a.edits, a.seed)
        res["targets"] |= res["pixelman"]["targets"]
        _restore_edit.plot(res["pixelman"], a.json.with_name(a.json.stem + "_pixelman.png"))
        _common.write_json(a.json, res)
    if a.asym:
        res["asymmetric_decoder"], shown = _restore_asymvq.run(embedded_pipeline(), a)
        res["targets"] |= res["asymmetric_decoder"]["targets"]
        _common.write_json(a.json, res)
        _restore_asymvq.plot(res["asymmetric_decoder"], shown, a.json.with_name(a.json.stem + "_asymmetric.png"))
    return res


def embedded_pipeline():
    import stablekit

    pipe = stablekit.load(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":
    main()
