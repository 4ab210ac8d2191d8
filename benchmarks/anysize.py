"""Benchmark generation beyond the native size: MultiDiffusion, shifted tiles, fixed tiles and plain generation.

    python benchmarks/anysize.py --json bench_out/anysize.json   # or: stablekit bench anysize

**Quality** (the embedded default model at ``--size``, larger than its native 64x64): held-out single-object
captions (seed 777), one noise seed per prompt, the same for every method. Methods: plain generation at the larger
size, MultiDiffusion (its defaults: native windows every eighth of a window), shifted tiles, and fixed tiles
(MultiDiffusion with the stride equal to the window: non-overlapping tiles that never move, the seam reference).
Per image:

* **seam score** -- along each tile border of the last step (for plain generation: the native-size grid), the
  median absolute pixel difference across it over that across the nearby lines: about 1 without seams, above 1
  where the borders show;
* **judge accuracy on crops** -- the attribute classifier on each native-size crop of the image: the share of
  shape, colour and background judgements that match the prompt's scene;
* **UNet calls** (counted at the UNet's first layer, whatever hooks wrap it) and wall-clock seconds.

**Compute** (an SD-1.5-architecture pipeline of random weights at ``--sd15-size``, ``--sd15-steps`` steps, no
decoding): UNet calls and seconds per method (MultiDiffusion's seconds estimated from one timed native-size call
times its counted windows).

Target: shifted tiles at no more than half MultiDiffusion's UNet calls (counted: exact) with a seam score no worse
(the 95% interval of the per-prompt difference shifted - MultiDiffusion at most ``--seam-margin``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common
import numpy as np
import torch

from stablekit.eval.harness import rnd

METHODS = ("plain", "multidiffusion", "shifted-tiles", "fixed-tiles")


def make_plugin(name: str, seed: int, size: int):
    """The plugin of method `name` (None: plain generation); `size` is the UNet's native latent side."""
    from stablekit.accel import MultiDiffusion, ShiftedTiles

    if name == "multidiffusion":
        return MultiDiffusion()
    if name == "shifted-tiles":
        return ShiftedTiles(seed=seed)
    if name == "fixed-tiles":
        return MultiDiffusion(stride=size)
    return None


def borders(plugin, size: int, width: int, height: int, scale: int) -> tuple[set[int], set[int]]:
    """Pixel rows and columns (the first pixel after a border) where the last step's tiles meet; for plain
    generation, or a last step run as one tile, the native-size grid (`size` latent pixels)."""
    grid = [
        (t, t + size, c, c + size) for t in range(0, height // scale, size) for c in range(0, width // scale, size)
    ]
    for windows in ([] if plugin is None else plugin.history[-1], grid):
        rows = {w[k] * scale for w in windows for k in (0, 1)} & set(range(1, height))
        cols = {w[k] * scale for w in windows for k in (2, 3)} & set(range(1, width))
        if rows or cols:
            return rows, cols
    return set(), set()


def seam_score(image: torch.Tensor, rows: set[int], cols: set[int], eps: float = 1 / 255) -> float | None:
    """Per border line, the median over its pixels of the |difference| across it over the median of the
    differences across the lines 2 to 4 pixels away on either side (each plus `eps`, a grey level), averaged over
    the border lines: about 1 without a seam, well above 1 where a tile border shows along the line (an object's
    edge crossing it touches too few of its pixels to move the median). None without borders."""
    ratios = []
    for axis, lines in ((1, rows), (2, cols)):
        diff = image.diff(dim=axis).abs().mean(0)
        diff = diff if axis == 1 else diff.T  # row i: the differences between lines i and i + 1
        for line in sorted(lines):
            near = [j for o in (2, 3, 4) for j in (line - 1 - o, line - 1 + o) if 0 <= j < len(diff)]
            ratios.append(float((diff[line - 1].median() + eps) / (diff[near].median() + eps)))
    return float(np.mean(ratios)) if ratios else None


def crop_accuracy(image: torch.Tensor, scene, native: int, clf) -> float:
    """The share of shape, colour and background judgements on the native-size crops (a grid of them, the last
    row and column flush with the edges) that match `scene`."""
    from stablekit.accel.multidiffusion import starts
    from stablekit.default_model import classifier as C

    _, h, w = image.shape
    crops = [
        image[:, t : t + native, c : c + native] for t in starts(h, native, native) for c in starts(w, native, native)
    ]
    preds = C.predict(torch.stack(crops), clf)
    true = C.truth(scene)
    return float(np.mean([[C.match(p, true)[k] for k in ("shapes", "colors", "background")] for p in preds]))


class CallCounter:
    """Real UNet forwards: its first convolution runs once in each."""

    def __init__(self, unet):
        self.n = 0
        unet.conv_in.register_forward_hook(self._count)

    def _count(self, *_):
        self.n += 1


def generate_one(pipe, counter, plugin, prompt: str, seed: int, a) -> tuple[torch.Tensor, int, float]:
    """One image (3, H, W) in [0, 1] with `plugin` attached, its UNet calls and seconds."""
    from stablekit import use

    counter.n = 0
    g = torch.Generator("cpu").manual_seed(seed)
    t0 = time.perf_counter()
    with use(pipe, *([plugin] if plugin else [])), torch.inference_mode():
        out = pipe(
            prompt,
            width=a.width,
            height=a.height,
            num_inference_steps=a.steps,
            guidance_scale=a.guidance,
            generator=g,
            output_type="pt",
        ).images[0]
    return out.float().clamp(0, 1), counter.n, time.perf_counter() - t0


def quality(a, pipe) -> tuple[dict, dict]:
    """Per-method lists of per-image measures on the embedded model, and the first prompt's images."""
    from stablekit.default_model import classifier as C
    from stablekit.eval.harness import heldout_prompts

    scenes, prompts = heldout_prompts(a.prompts, 0, a.seed)
    clf = C.load_classifier()
    counter = CallCounter(pipe.unet)
    size = pipe.unet.config.sample_size
    scale = pipe.vae_scale_factor
    per = {m: {"seam": [], "crop_acc": [], "unet_calls": [], "seconds": []} for m in METHODS}
    samples = {}
    for i, (scene, prompt) in enumerate(zip(scenes, prompts, strict=True)):
        for m in METHODS:
            plugin = make_plugin(m, a.seed + i, size)
            image, calls, secs = generate_one(pipe, counter, plugin, prompt, a.seed * 100_000 + i, a)
            per[m]["seam"].append(seam_score(image, *borders(plugin, size, a.width, a.height, scale)))
            per[m]["crop_acc"].append(crop_accuracy(image, scene, size * scale, clf))
            per[m]["unet_calls"].append(calls)
            per[m]["seconds"].append(secs)
            samples.setdefault(m, image)
        print(f"anysize: {i + 1}/{len(prompts)}", flush=True)
    return per, samples


def summarize(per: dict) -> dict:
    out = {}
    for m, xs in per.items():
        out[m] = {key: {"mean": rnd(float(np.mean(v))), "ci95": _common.mean_interval(v)} for key, v in xs.items()} | {
            "n": len(xs["seam"])
        }
    return out


def timed_call(pipe, counter, plugin, width: int, height: int, a) -> dict:
    """UNet calls and seconds of `a.sd15_steps` steps at `width` x `height` with `plugin`, without decoding."""
    from stablekit import use

    counter.n = 0
    t0 = time.perf_counter()
    with use(pipe, *([plugin] if plugin else [])), torch.inference_mode():
        pipe(
            "a photograph of a city at night",
            width=width,
            height=height,
            output_type="latent",
            num_inference_steps=a.sd15_steps,
            generator=torch.Generator().manual_seed(a.seed),
        )
    out = {"unet_calls": counter.n, "seconds": rnd(time.perf_counter() - t0)}
    print(f"anysize compute: {type(plugin).__name__} at {width}x{height}: {out}", flush=True)
    return out


def compute(a) -> dict:
    """UNet calls and seconds per method on the SD-1.5-architecture pipeline (random weights), no decoding.
    MultiDiffusion's calls are its windows counted by the plugin itself, its seconds those calls times one
    native-size call's (timed): running its many windows would take most of a CPU's hour at 1024x1024."""
    from _accel_speed import speed_pipeline

    from stablekit import use

    pipe = speed_pipeline(a.sd15_unet)
    counter = CallCounter(pipe.unet)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = {
        m: timed_call(pipe, counter, make_plugin(m, a.seed, 0), a.sd15_width, a.sd15_height, a)
        for m in ("plain", "shifted-tiles")
    }
    one = timed_call(pipe, counter, None, native, native, a)
    md = make_plugin("multidiffusion", a.seed, 0)
    with use(pipe, md):
        f = pipe.vae_scale_factor
        windows = len(md.windows(a.sd15_height // f, a.sd15_width // f, 0))
    out["multidiffusion"] = {
        "unet_calls": windows * a.sd15_steps,
        "seconds": rnd(windows * one["seconds"]),
        "estimated": f"{windows} windows x {one['seconds']} s for {a.sd15_steps} native-size step(s)",
    }
    return {"unet": a.sd15_unet, "size": f"{a.sd15_width}x{a.sd15_height}", "steps": a.sd15_steps} | out


def targets(per: dict, margin: float) -> dict:
    md = np.asarray(per["multidiffusion"]["unet_calls"], dtype=float)
    st = np.asarray(per["shifted-tiles"]["unet_calls"], dtype=float)
    diff = np.asarray(per["shifted-tiles"]["seam"]) - np.asarray(per["multidiffusion"]["seam"])
    calls = _common.exact(bool((st <= 0.5 * md).all()), ratio=rnd(float(st.sum() / md.sum())))
    seams = _common.target(
        rnd(float(diff.mean())),
        _common.mean_interval(diff),
        margin,
        "<=",
        len(diff),
        8,
        measure="seam score, shifted tiles - MultiDiffusion, per prompt",
    )
    return {"shifted_half_the_calls_seams_no_worse": _common.combined({"calls": calls, "seam": seams})}


def plot(res: dict, samples: dict, path: Path) -> None:
    plt = _common.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), gridspec_kw={"height_ratios": [2, 1]})
    q = res["quality"]
    for ax, key, title in ((axes[0, 0], "seam", "seam score (1 = none)"), (axes[0, 1], "unet_calls", "UNet calls")):
        means = [q[m][key]["mean"] for m in METHODS]
        ci = [q[m][key]["ci95"] or [v, v] for m, v in zip(METHODS, means, strict=True)]
        err = np.abs(np.array(ci).T - np.array(means))
        ax.bar(METHODS, means, yerr=err, capsize=4)
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    strip = torch.cat([samples[m] for m in METHODS], dim=2).permute(1, 2, 0).numpy()
    axes[1, 0].imshow(strip)
    axes[1, 0].set_title(" | ".join(METHODS), fontsize=8)
    axes[1, 0].axis("off")
    axes[1, 1].axis("off")
    _common.save_figure(fig, path, dpi=110)


def parse(args: list[str]) -> argparse.Namespace:
    from stablekit.output import parse_size

    p = argparse.ArgumentParser(prog="stablekit bench anysize", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=777, seed_help="held-out scene seed (training used 0)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", default="128x64", help="WxH of the quality part")
    p.add_argument("--sd15-size", default="1024x1024", help="WxH of the compute part")
    p.add_argument("--sd15-steps", type=int, default=1)
    p.add_argument("--sd15-unet", choices=("sd15", "tiny"), default="sd15", help="tiny: a small UNet for tests")
    p.add_argument("--seam-margin", type=float, default=0.05, help="how much higher a seam score is 'no worse'")
    a = p.parse_args(args)
    a.width, a.height = parse_size(a.size)
    a.sd15_width, a.sd15_height = parse_size(a.sd15_size, "--sd15-size")
    return a


def main(args: list[str]) -> dict:
    from stablekit.eval.harness import bench_pipeline

    a = parse(args)
    _common.set_threads(a)
    pipe = bench_pipeline(a)
    per, samples = quality(a, pipe)
    res = _common.model_info(a, pipe) | {"size": a.size, "steps": a.steps, "guidance": a.guidance}
    res["quality"] = summarize(per)
    res["per_image"] = {m: {k: [rnd(x) for x in v] for k, v in xs.items()} for m, xs in per.items()}
    res["targets"] = targets(per, a.seam_margin)
    _common.write_json(a.json, res)
    plot(res, samples, a.json.with_suffix(".png"))
    if a.sd15_steps > 0:
        res["compute"] = compute(a)
        _common.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
