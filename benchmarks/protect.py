"""Benchmark image protection (PhotoGuard's encoder attack, AdvDM, Diff-Protect's SDS, DiffusionGuard).

    stablekit bench protect --json bench_out/protect.json [--photos 12 --faces 8 --world 8 --eps 8/255 16/255]

Images, at the model's size (64x64 for the embedded model): the photos scikit-image ships
(``pip install stablekit[bench]``), centre-cropped, with hand-written captions; its face subset
(``data.lfw_subset``, the first ``--faces`` of its 100 faces, 25x25 greyscale upscaled); and world
scenes (seed 4242; training used 0) whose attributes are known. Every image gets every method at
every ``--eps`` (pixel units) with the method's default steps (``--steps`` overrides them all), plus
the baseline: random signs of the same budget (inside the protected region for DiffusionGuard). With
``--min-psnr DB`` every protection and the baseline also keep that PSNR (``stablekit.protect.protect``'s floor).
The protected region (DiffusionGuard's mask, kept by the inpainting) is the centre square of half
the side; the editor repaints the rest.

Measured, per method and budget (means over images):
* imperceptibility: PSNR and SSIM of the protected image against the original (note: a perturbation
  that uses the whole L-infinity budget on every value has PSNR 20 log10(1/eps): 30.1 dB at 8/255);
* efficacy: SDEdit (image-to-image, the image's caption, guidance 7.5, ``--edit-steps``) at each
  ``--strengths`` and inpainting of the complement of the protected region, each with the same seed
  for the clean and the protected image: how far the output from the protected image lies from the
  output from the clean one -- MSE and PSNR (inpainting: over the repainted region only) and the L2
  distance of the attribute classifier's features -- and the ratio of the MSE (and feature distance)
  to that of the random baseline (> 1: the protection moves the edit more than noise of its budget);
  for world images, the joint attribute accuracy (shape, colour, background) of the SDEdit outputs; with
  several kinds of image, the SDEdit measures per kind too (``sdedit_by_kind``);
  ``clean`` gives, for scale, the MSE between two SDEdit outputs of the clean image with other seeds;
* resilience (the protocol of "CopyrightMeter: Revisiting Copyright Protection in
  Text-to-image Models", 2024): each transformation -- JPEG 75, resize
  x0.5 and back, x2 and back (bicubic), Gaussian noise (sd 0.03), diffusion purification (SDEdit with
  the empty prompt at ``--purify`` strength, ``stablekit.eval.attacks.purification``) -- is applied to
  the protected, the random and the clean image alike; the SDEdit efficacy at ``--resilience-strength``
  is measured again between the transformed protected and the transformed clean image;
* cost: seconds per image (wall clock of each protection above) and, per method on the first photo,
  seconds per step (``--cost-steps`` steps after one warm-up step) and the peak memory of the tensors a
  protection allocates (on CPU: the running sum of torch.profiler's allocation and free events, in a
  separate 2-step run; on CUDA: the allocator's peak) -- resident memory would only show the model
  loading at this size -- and the floating-point operations of one step (torch's FlopCounterMode: a two-step
  run minus a one-step run); SDS's ratios to the full semantic attack, from the same run. ``--sd15``
  repeats the cost run on a randomly initialised model of Stable Diffusion 1.5's architecture at
  512x512 (cost only; about 4 GB of weights in float32).

The JSON is written after every image (a stopped run keeps the images it finished; each result says over
how many). Runs made apart -- one per method in parallel processes, a cost-only run (``--photos 0 --faces 0
--world 0``) -- combine with ``--merge A.json B.json ... --json OUT.json``, which runs nothing. The model runs
in float32 on every device (``--dtype``), so CPU and GPU runs measure the same arithmetic.

Targets, reported under "targets", each judged on its 95% interval (``benchmarks/_common.py``: met only when the
whole interval is on the right side; inconclusive when it straddles or under 20 images): mean PSNR >= 35 dB at
8/255 (t interval over images); the SDEdit MSE ratio to the random baseline above 1 at the middle strength
(paired bootstrap over images); SDS at most 0.6x the semantic attack's time per step (``--cost-rounds`` paired
rounds; inconclusive when they disagree by more than 5%) and memory (measured exactly).
Writes the JSON, a PNG grid (original, protections, their SDEdit outputs) and a PNG of curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import _common
import numpy as np
import torch
from _common import exact, speedup_target, target
from PIL import Image

FACE_PROMPT = "a black and white photo of a face"
METHODS = ("encoder", "semantic", "sds", "diffusionguard")
MIN_IMAGES = 20  # images a PSNR or efficacy target needs


# ---------------------------------------------------------------- images


def _skimage():
    try:
        from skimage import data, metrics
    except ImportError:
        from stablekit import StablekitError

        raise StablekitError("the photos and SSIM need scikit-image: pip install 'stablekit[bench]'") from None
    return data, metrics


def images(a, size: int) -> list[dict]:
    """Each image: name, kind (photo, face, world), PIL image, prompt, and the world scene or None."""
    from stablekit.eval.harness import PHOTOS, photos, square

    data, _ = _skimage()
    out = [
        dict(name=name, kind="photo", image=im, prompt=PHOTOS[name], scene=None) for name, im in photos(size, a.photos)
    ]
    faces = data.lfw_subset()[: min(a.faces, 100)] if a.faces else []
    out += [
        dict(
            name=f"face{i}",
            kind="face",
            image=square(Image.fromarray((f * 255).round().astype(np.uint8)), size),
            prompt=FACE_PROMPT,
            scene=None,
        )
        for i, f in enumerate(faces)
    ]
    if a.world:
        from stablekit.default_model import world

        out += [
            dict(
                name=f"world{i}",
                kind="world",
                image=im.resize((size, size), Image.LANCZOS),
                prompt=world.canonical_caption(scene),
                scene=scene,
            )
            for i, (im, _, scene) in enumerate(world.dataset(a.world, 4242))
        ]
    return out


def centre_mask(size: int) -> Image.Image:
    """White over the protected centre square of half the side."""
    m = np.zeros((size, size), np.uint8)
    m[size // 4 : size - size // 4, size // 4 : size - size // 4] = 255
    return Image.fromarray(m)


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float64) / 255


# ---------------------------------------------------------------- edits and transformations


class Editor:
    """SDEdit and inpainting with the benchmarked model, same seed for every input of an image."""

    def __init__(self, pipe, a):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        self.pipe, self.a = pipe, a
        self.img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        self.inpaint_pipe = AutoPipelineForInpainting.from_pipe(pipe)
        for p in (self.img2img, self.inpaint_pipe):
            p.set_progress_bar_config(disable=True)

    def sdedit(self, image: Image.Image, prompt: str, strength: float, seed: int) -> Image.Image:
        return self._edit(self.img2img, image, prompt, seed, strength=strength)

    def inpaint(self, image: Image.Image, repaint: Image.Image, prompt: str, seed: int) -> Image.Image:
        return self._edit(self.inpaint_pipe, image, prompt, seed, mask_image=repaint, strength=1.0)

    def _edit(self, pipe, image: Image.Image, prompt: str, seed: int, **kw) -> Image.Image:
        """`pipe` (image-to-image or inpainting) run on `image` at its size with the benchmark's steps and guidance."""
        g = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            return pipe(
                prompt,
                image=image,
                num_inference_steps=self.a.edit_steps,
                guidance_scale=self.a.guidance,
                generator=g,
                height=image.height,
                width=image.width,
                **kw,
            ).images[0]


def transformations(pipe, a) -> dict:
    """name -> function(list of PIL images, seed) -> list (CopyrightMeter's robustness attacks)."""
    from stablekit.eval import attacks

    def resize(factor):
        def fn(ims, seed):
            return [
                im.resize((round(im.width * factor), round(im.height * factor)), Image.BICUBIC).resize(
                    im.size, Image.BICUBIC
                )
                for im in ims
            ]

        return fn

    return {
        "jpeg75": lambda ims, seed: attacks.jpeg(ims, 75),
        "resize0.5": resize(0.5),
        "resize2": resize(2.0),
        "noise0.03": lambda ims, seed: attacks.noise(ims, 0.03, seed=seed),
        f"purify{a.purify:g}": lambda ims, seed: attacks.purification(
            ims, a.purify, steps=a.edit_steps, seed=seed, pipe=pipe
        ),
    }


class Features:
    """The attribute classifier's penultimate features (a perceptual distance at the model's scale)."""

    def __init__(self):
        from stablekit.default_model import classifier as C

        self.C, self.model = C, C.load_classifier()

    def __call__(self, im: Image.Image) -> torch.Tensor:
        with torch.no_grad():
            return self.model.features(self.C.to_tensor([im]))[0]

    def joint(self, im: Image.Image, scene) -> bool:
        m = self.C.match(self.C.predict([im], self.model)[0], self.C.truth(scene))
        return bool(m["shapes"] and m["colors"] and m["background"])


def deviation(out: Image.Image, ref: Image.Image, feats: Features, where: np.ndarray | None = None) -> dict:
    from stablekit.eval.metrics import psnr

    x, y = arr(out), arr(ref)
    if where is not None:
        x, y = x[where], y[where]
    return {
        "mse": float(np.mean((x - y) ** 2)),
        "psnr_db": min(psnr(x, y), 99.0),
        "feature_dist": float((feats(out) - feats(ref)).norm()),
    }


def mean_rows(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def ratios(entry: dict, base: dict) -> dict:
    """The method's mean deviations over the baseline's (mean MSE / mean MSE, mean distance / mean distance)."""
    return dict(
        entry,
        ratio_mse_vs_random=entry["mse"] / max(base["mse"], 1e-12),
        ratio_feature_vs_random=entry["feature_dist"] / max(base["feature_dist"], 1e-12),
    )


# ---------------------------------------------------------------- cost


def sd15_pipe():
    """Stable Diffusion 1.5's architecture (UNet, VAE, a 768-wide 12-layer CLIP text encoder over MiniLM's
    tokenizer), randomly initialised: for cost only."""
    vae = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    unet = dict(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD 1.x's
    return _common.random_sd_pipeline(unet, vae, text)


def peak_tensor_mb(pipe, fn) -> float:
    """Peak memory of the tensors `fn()` allocates, in MiB, beyond what was allocated before: CUDA's
    allocator statistics, or on CPU the running sum of torch.profiler's allocation and free events."""
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
        before = torch.cuda.memory_allocated(pipe.device)
        torch.cuda.reset_peak_memory_stats(pipe.device)
        fn()
        torch.cuda.synchronize(pipe.device)
        return (torch.cuda.max_memory_allocated(pipe.device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if getattr(e, "self_cpu_memory_usage", 0)), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def tflop(fn) -> float:
    """Floating-point operations (forward and backward) of `fn()` in TFLOP, as torch's FlopCounterMode counts
    them (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def cost(a, pipe, label: str) -> dict:
    """Per method on the first photo: one warm-up step, seconds per step over ``--cost-steps`` (or ``--sd15-steps``)
    steps in each of ``--cost-rounds`` rounds (every method once a round), and the peak tensor memory of a 2-step
    run (measured apart: the profiler slows the clock)."""
    import stablekit
    from stablekit.eval.harness import photos

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ((_, image),) = photos(size, 1)
    steps, rows, runs = a.sd15_steps if label == "sd15" else a.cost_steps, {}, {}
    for m in a.methods:
        kw = dict(
            eps=float(Fraction(a.eps[0])),
            progress=False,
            min_psnr=a.min_psnr,
            mask=centre_mask(size) if m == "diffusionguard" else None,
        )
        runs[m] = {
            n: (lambda n=n, m=m, kw=kw: stablekit.protect.protect(pipe, image, m, steps=n, **kw))
            for n in (1, 2, steps)
        }
        one_step = tflop(runs[m][1])  # also the warm-up step
        rows[m] = {"peak_tensor_mb": peak_tensor_mb(pipe, runs[m][2]), "tflop_per_step": tflop(runs[m][2]) - one_step}
    seconds = {m: [] for m in a.methods}
    for _ in range(a.cost_rounds):
        for m in a.methods:
            t0 = _common.clock(pipe.device)
            runs[m][steps]()
            seconds[m].append((_common.clock(pipe.device) - t0) / steps)
    for m, row in rows.items():
        row |= {"seconds_per_step": float(np.median(seconds[m])), "seconds_per_step_rounds": seconds[m]}
        print(
            f"cost ({label}, {size}px): {m} {row['seconds_per_step']:.3f} s/step, peak {row['peak_tensor_mb']:.1f} "
            f"MiB, {row['tflop_per_step']:.4f} TFLOP/step",
            flush=True,
        )
    res = {
        "image_size": size,
        "steps": steps,
        "rounds": a.cost_rounds,
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype),
        "memory_measure": "cuda max_memory_allocated" if pipe.device.type == "cuda" else "torch.profiler CPU tensors",
        "methods": rows,
    }
    if "sds" in rows and "semantic" in rows:
        s, f = rows["sds"], rows["semantic"]
        res["sds_vs_semantic"] = {
            "time": s["seconds_per_step"] / f["seconds_per_step"],
            "time_rounds": _common.rounds([x / y for x, y in zip(seconds["sds"], seconds["semantic"], strict=True)]),
            "memory": s["peak_tensor_mb"] / f["peak_tensor_mb"],
            "flops": s["tflop_per_step"] / f["tflop_per_step"],
        }
    return res


# ---------------------------------------------------------------- grid and curves


def curves(res: dict, path: Path):
    plt = _common.pyplot()

    budgets = list(res["results"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for eps, style in zip(budgets, ("o-", "s--", "^:", "d-."), strict=False):
        for m, r in res["results"][eps].items():
            sd = r["sdedit"]
            axes[0].plot(
                [float(s) for s in sd], [v["ratio_mse_vs_random"] for v in sd.values()], style, label=f"{m} {eps}"
            )
    axes[0].axhline(1, color="gray", lw=0.8)
    axes[0].set(xlabel="SDEdit strength", ylabel="output MSE vs clean / random's", title="efficacy", yscale="log")
    axes[0].legend(fontsize=7)
    eps = budgets[0]
    names = list(next(iter(res["results"][eps].values())).get("resilience", {}))
    if names:
        width = 0.8 / len(res["results"][eps])
        for k, (m, r) in enumerate(res["results"][eps].items()):
            rs = r["resilience"]
            axes[1].bar(
                np.arange(len(names)) + k * width, [rs[n]["ratio_mse_vs_random"] for n in names], width, label=m
            )
        axes[1].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, fontsize=8)
        axes[1].axhline(1, color="gray", lw=0.8)
        axes[1].set(ylabel="ratio after transformation", title=f"resilience at {eps}", yscale="log")
        axes[1].legend(fontsize=7)
    _common.save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------- main


def parse(args: list[str]) -> argparse.Namespace:
    from stablekit.eval.harness import PHOTOS

    p = argparse.ArgumentParser(prog="stablekit bench protect", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=0)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--eps", nargs="+", default=["8/255", "16/255"], help="budgets in [0, 1] pixel units")
    p.add_argument(
        "--min-psnr",
        type=float,
        default=None,
        help="PSNR floor in dB for every method and the random baseline (stablekit.protect.protect's min_psnr)",
    )
    p.add_argument("--steps", type=int, default=None, help="PGD steps for every method [default: each method's]")
    p.add_argument("--photos", type=int, default=len(PHOTOS), help=f"scikit-image photos (at most {len(PHOTOS)})")
    p.add_argument("--faces", type=int, default=8, help="faces from scikit-image's lfw_subset")
    p.add_argument("--world", type=int, default=8, help="world scenes (attribute accuracy of the edits)")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5], help="SDEdit strengths")
    p.add_argument("--edit-steps", type=int, default=50, help="denoising steps of SDEdit, inpainting, purification")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--no-inpaint", dest="inpaint", action="store_false")
    p.add_argument("--no-resilience", dest="resilience", action="store_false")
    p.add_argument("--resilience-strength", type=float, default=0.3, help="SDEdit strength after transformations")
    p.add_argument("--purify", type=float, default=0.2, help="purification strength")
    p.add_argument("--cost-steps", type=int, default=20, help="timed steps per method in the cost runs (0: skip)")
    p.add_argument("--cost-rounds", type=int, default=3, help="timed rounds per method in the cost runs")
    p.add_argument("--sd15", action="store_true", help="also the cost at 512x512 on SD 1.5's architecture")
    p.add_argument("--sd15-steps", type=int, default=2, help="timed steps per method in the SD 1.5 cost run")
    p.add_argument("--grid", type=Path, default=None, help="PNG grid (default: next to the JSON)")
    p.add_argument("--grid-rows", type=int, default=6)
    p.add_argument("--dtype", default="float32", help="the model's (float32 on every device by default)")
    p.add_argument("--merge", nargs="+", type=Path, help="combine these finished runs' JSON into --json; run nothing")
    a = p.parse_args(args)
    from stablekit import StablekitError
    from stablekit.protect import parse_psnr

    parse_psnr(a.min_psnr, "--min-psnr")
    if int(a.edit_steps * min(a.strengths)) < 1:
        raise StablekitError(
            f"SDEdit at strength {min(a.strengths)} with --edit-steps {a.edit_steps} runs no "
            "denoising step; use more --edit-steps"
        )
    a.grid = a.grid or a.json.with_suffix(".png")
    a.curves = a.json.with_name(a.json.stem + "_curves.png")
    return a


def main(args: list[str]) -> dict:
    a = parse(args)
    if a.merge:
        return merge(a)
    _common.set_threads(a)
    from stablekit.eval.harness import bench_pipeline, table_grid

    pipe = bench_pipeline(a)
    run = Run(a, pipe)
    items, cells = images(a, run.size), []
    res = summary(a, pipe, [], run)
    for n, item in enumerate(items):
        item["seed"] = a.seed * 1000 + n
        row = run.image(item)
        if n < a.grid_rows:
            cells.append(row)
        res = summary(a, pipe, items[: n + 1], run)
        write(res, a)  # after every image: a stopped run keeps what it finished
    if a.cost_steps:
        res["cost"] = cost(a, pipe, "model")
    if a.sd15:
        big = sd15_pipe().to(pipe.device)
        res["cost_sd15"] = cost(a, big, "sd15")
    write(res, a)
    if cells:
        table_grid(cells, ["original", "clean sdedit"] + [c for m in a.methods for c in (m, f"{m} sdedit")], a.grid)
        print(f"wrote {a.grid}")
    return finish(res, a)


class Run:
    """A protection run's edits, measures and per-image results (``acc``: budget -> method -> lists;
    ``clean_acc``: the clean images' reseeded SDEdit MSE and world accuracy)."""

    def __init__(self, a, pipe):
        from stablekit.protect import parse_eps

        self.a, self.pipe = a, pipe
        self.size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.mask = centre_mask(self.size)
        self.keep = np.asarray(self.mask) > 127
        self.repaint = Image.fromarray(np.where(self.keep, 0, 255).astype(np.uint8))
        self.editor, self.feats = Editor(pipe, a), Features()
        self.transforms = transformations(pipe, a) if a.resilience else {}
        self.mid = a.strengths[len(a.strengths) // 2]
        self.budgets = {e: parse_eps(e) for e in a.eps}
        self.acc = {e: {m: self.method_slots() for m in a.methods} for e in self.budgets}
        self.clean_acc = {"reseed_mse": {s: [] for s in a.strengths}, "world_joint": {s: [] for s in a.strengths}}

    def slots(self) -> dict:
        a = self.a
        return {"sdedit": {s: [] for s in a.strengths}, "inpaint": [], "resilience": {t: [] for t in self.transforms}}

    def method_slots(self) -> dict:
        """A method's per-image lists at one budget, and those of its random baseline."""
        world_joint = {s: [] for s in self.a.strengths}
        return self.slots() | dict(psnr_db=[], ssim=[], seconds=[], world_joint=world_joint, random=self.slots())

    def evaluate(self, x: Image.Image, item: dict, refs: dict) -> dict:
        """How far the edits of `x` lie from those of the clean image (and the edits themselves)."""
        a, editor, prompt, seed = self.a, self.editor, item["prompt"], item["seed"]
        out = {"sdedit": {}, "edited": {}, "resilience": {}}
        for s in a.strengths:
            out["edited"][s] = editor.sdedit(x, prompt, s, seed)
            out["sdedit"][s] = deviation(out["edited"][s], refs["sdedit"][s], self.feats)
        if a.inpaint:
            inpainted = editor.inpaint(x, self.repaint, prompt, seed)
            out["inpaint"] = deviation(inpainted, refs["inpaint"], self.feats, where=~self.keep)
        for t, fn in self.transforms.items():
            edited = editor.sdedit(fn([x], seed)[0], prompt, a.resilience_strength, seed)
            out["resilience"][t] = deviation(edited, refs["resilience"][t], self.feats)
        return out

    def add(self, into: dict, dev: dict):
        for s in self.a.strengths:
            into["sdedit"][s].append(dev["sdedit"][s])
        if self.a.inpaint:
            into["inpaint"].append(dev["inpaint"])
        for t in self.transforms:
            into["resilience"][t].append(dev["resilience"][t])

    def references(self, item: dict) -> dict:
        """The clean image's edits (the references), and its reseeded SDEdit MSE and world accuracy."""
        a, editor, im, prompt, seed = self.a, self.editor, item["image"], item["prompt"], item["seed"]
        refs = {"sdedit": {s: editor.sdedit(im, prompt, s, seed) for s in a.strengths}, "resilience": {}}
        for s in a.strengths:
            other = editor.sdedit(im, prompt, s, seed + 1)
            self.clean_acc["reseed_mse"][s].append(float(np.mean((arr(other) - arr(refs["sdedit"][s])) ** 2)))
            if item["scene"] is not None:
                self.clean_acc["world_joint"][s].append(self.feats.joint(refs["sdedit"][s], item["scene"]))
        if a.inpaint:
            refs["inpaint"] = editor.inpaint(im, self.repaint, prompt, seed)
        for t, fn in self.transforms.items():
            refs["resilience"][t] = editor.sdedit(fn([im], seed)[0], prompt, a.resilience_strength, seed)
        return refs

    def image(self, item: dict) -> list:
        """Every method at every budget on one image; its grid row."""
        from stablekit.protect import random_noise

        a, im, seed = self.a, item["image"], item["seed"]
        refs = self.references(item)
        row = [(im, item["name"]), (refs["sdedit"][self.mid], f"clean sdedit {self.mid:g}")]
        for e, eps in self.budgets.items():
            kinds = {"mask" if m == "diffusionguard" else None for m in a.methods}
            base = {
                k: self.evaluate(
                    random_noise(im, eps, mask=self.mask if k else None, seed=seed, min_psnr=a.min_psnr), item, refs
                )
                for k in kinds
            }
            for m in a.methods:
                out, dev = self.protect(item, refs, e, m, base["mask" if m == "diffusionguard" else None])
                if e == a.eps[0]:
                    row += [(out, m), (dev["edited"][self.mid], f"{m} sdedit {self.mid:g}")]
        return row

    def protect(self, item: dict, refs: dict, e: str, m: str, base: dict) -> tuple:
        """Method `m` at budget `e` on one image, measured against the clean image and the random baseline."""
        import stablekit
        from stablekit.eval.metrics import psnr

        a, im = self.a, item["image"]
        _, skmetrics = _skimage()
        t0 = time.perf_counter()
        mask = self.mask if m == "diffusionguard" else None
        out = stablekit.protect.protect(
            self.pipe,
            im,
            m,
            eps=self.budgets[e],
            steps=a.steps,
            seed=item["seed"],
            progress=False,
            mask=mask,
            min_psnr=a.min_psnr,
        )
        r = self.acc[e][m]
        r["seconds"].append(time.perf_counter() - t0)
        r["psnr_db"].append(min(psnr(arr(out), arr(im)), 99.0))
        r["ssim"].append(float(skmetrics.structural_similarity(arr(out), arr(im), channel_axis=2, data_range=1.0)))
        dev = self.evaluate(out, item, refs)
        self.add(r, dev)
        self.add(r["random"], base)
        if item["scene"] is not None:
            for s in a.strengths:
                r["world_joint"][s].append(self.feats.joint(dev["edited"][s], item["scene"]))
        print(
            f"{item['name']} eps {e} {m}: {r['seconds'][-1]:.1f} s, PSNR {r['psnr_db'][-1]:.1f} dB, "
            f"SDEdit {self.mid:g} MSE {dev['sdedit'][self.mid]['mse']:.2e} "
            f"(random {base['sdedit'][self.mid]['mse']:.2e})",
            flush=True,
        )
        return out, dev


def summary(a, pipe, items: list[dict], run: Run) -> dict:
    """The results over `items` (the images done so far) from the run's per-image rows."""
    import stablekit
    from stablekit.protect import DEFAULTS

    clean = run.clean_acc
    res = {
        "model": str(a.model or stablekit.pipeline.DEFAULT_MODEL),
        "device": str(pipe.device),
        "threads": torch.get_num_threads(),
        "image_size": pipe.unet.config.sample_size * pipe.vae_scale_factor,
        "images": [i["name"] for i in items],
        "methods": a.methods,
        "settings": {m: dict(DEFAULTS[m], **({"steps": a.steps} if a.steps else {})) for m in a.methods},
        "min_psnr": a.min_psnr,
        "strengths": a.strengths,
        "edit_steps": a.edit_steps,
        "guidance": a.guidance,
        "resilience_strength": a.resilience_strength,
        "protected_region": "centre square, half the side",
        "clean": {
            "sdedit_reseed_mse": {str(s): float(np.mean(v)) for s, v in clean["reseed_mse"].items() if v},
            "world_joint_acc": {str(s): float(np.mean(v)) for s, v in clean["world_joint"].items() if v},
        },
        "results": {},
    }
    kinds = {
        k: [i for i, it in enumerate(items) if it["kind"] == k] for k in dict.fromkeys(it["kind"] for it in items)
    }
    for e, methods in run.acc.items():
        res["results"][e] = {
            m: method_summary(a, r, kinds, run.transforms) for m, r in methods.items() if r["psnr_db"]
        }
    return res


def method_summary(a, r: dict, kinds: dict, transforms: dict) -> dict:
    """One method's means over the images at one budget, with the intervals its targets are judged on."""
    rr = r["random"]
    entry = {
        "images": len(r["psnr_db"]),
        "psnr_db": float(np.mean(r["psnr_db"])),
        "psnr_db_ci95": _common.mean_interval(r["psnr_db"]),
        "psnr_db_min": float(np.min(r["psnr_db"])),
        "ssim": float(np.mean(r["ssim"])),
        "seconds_per_image": float(np.mean(r["seconds"])),
        "sdedit": {str(s): sdedit_ratios(r["sdedit"][s], rr["sdedit"][s]) for s in a.strengths},
        "random_sdedit": {str(s): mean_rows(rr["sdedit"][s]) for s in a.strengths},
    }
    if a.inpaint:
        entry["inpaint"] = ratios(mean_rows(r["inpaint"]), mean_rows(rr["inpaint"]))
    if transforms:
        entry["resilience"] = {
            t: ratios(mean_rows(r["resilience"][t]), mean_rows(rr["resilience"][t])) for t in transforms
        }
    if len(kinds) > 1:  # a mean over kinds is ruled by the kind whose edits move most (faces)
        entry["sdedit_by_kind"] = {
            k: {
                str(s): ratios(
                    mean_rows([r["sdedit"][s][i] for i in idx]), mean_rows([rr["sdedit"][s][i] for i in idx])
                )
                for s in a.strengths
            }
            for k, idx in kinds.items()
        }
    if any(r["world_joint"].values()):
        entry["world_joint_acc"] = {str(s): float(np.mean(v)) for s, v in r["world_joint"].items()}
    return entry


def sdedit_ratios(rows: list[dict], base: list[dict]) -> dict:
    """:func:`ratios` of the SDEdit deviations, with a paired bootstrap 95% interval of the MSE ratio over images."""
    interval = _common.ratio_of_means_interval([x["mse"] for x in rows], [x["mse"] for x in base])
    return ratios(mean_rows(rows), mean_rows(base)) | {"ratio_mse_vs_random_ci95": interval}


def write(res: dict, a):
    res["targets"] = targets(res)
    _common.write_json(a.json, res)


def finish(res: dict, a) -> dict:
    report(res)
    if any(res["results"].values()):
        curves(res, a.curves)
        print(f"wrote {a.curves}")
    print(f"wrote {a.json}")
    return res


def merge(a) -> dict:
    """One result from runs over the same image list (e.g. one run per method, in parallel, and a cost
    run): each run's methods' results (each entry says over how many of the first images) and its cost
    entries; recomputed targets. "images" lists the longest run's images."""
    from stablekit import StablekitError

    keys = ("images", "methods", "settings", "results")
    runs = sorted(((p, _common.load_run(p, "protect", keys)) for p in a.merge), key=lambda r: -len(r[1]["images"]))
    res = dict(runs[0][1], methods=[], settings={}, results={}, merged_from=[str(p) for p in a.merge])
    for path, run in runs:
        if run["images"] != res["images"][: len(run["images"])]:
            raise StablekitError(f"{path} covers other images than the other runs: merge runs over one image list")
        for e, methods in ((e, ms) for e, ms in run["results"].items() if ms):
            res["results"].setdefault(e, {}).update(methods)
            res["methods"] += [m for m in methods if m not in res["methods"]]
            res["settings"].update({m: run["settings"][m] for m in methods})
        res.update({k: run[k] for k in ("cost", "cost_sd15") if k in run})
    write(res, a)
    return finish(res, a)


def targets(res: dict) -> dict:
    """The targets, each judged on its 95% interval over at least MIN_IMAGES images: the mean PSNR at 8/255 at least
    35 dB (t interval), the SDEdit MSE ratio to the random baseline above 1 (paired bootstrap; the middle strength)
    per method; SDS at most 0.6x the semantic attack's time per step (over the cost rounds) and memory (exact)."""
    out, mid = {}, str(res["strengths"][len(res["strengths"]) // 2])
    eight = next((e for e in res["results"] if abs(float(Fraction(e)) - 8 / 255) < 1e-9), None)
    if eight:
        rows = res["results"][eight]
        out["psnr_at_8_255_ge_35db"] = {
            m: target(r["psnr_db"], r.get("psnr_db_ci95"), 35, ">=", r["images"], MIN_IMAGES) for m, r in rows.items()
        }
        out[f"sdedit_{mid}_mse_ratio_at_8_255_above_1"] = {
            m: target(
                r["sdedit"][mid]["ratio_mse_vs_random"],
                r["sdedit"][mid].get("ratio_mse_vs_random_ci95"),
                1,
                ">",
                r["images"],
                MIN_IMAGES,
            )
            for m, r in rows.items()
        }
    ratio = res.get("cost", {}).get("sds_vs_semantic")
    if ratio:
        out["sds_time_le_0.6x_semantic"] = speedup_target(ratio.get("time_rounds"), 0.6, "<=")
        out["sds_memory_le_0.6x_semantic"] = exact(ratio["memory"] <= 0.6, value=ratio["memory"], threshold=0.6)
    return out


def report(res: dict):
    mid = str(res["strengths"][len(res["strengths"]) // 2])
    for e, methods in res["results"].items():
        for m, r in methods.items():
            line = (
                f"eps {e:7s} {m:15s} PSNR {r['psnr_db']:5.2f} dB SSIM {r['ssim']:.3f} "
                f"{r['seconds_per_image']:6.1f} s/img | SDEdit {mid} "
                f"MSE x{r['sdedit'][mid]['ratio_mse_vs_random']:.2f}"
                f" feat x{r['sdedit'][mid]['ratio_feature_vs_random']:.2f} vs random"
            )
            if "inpaint" in r:
                line += f" | inpaint x{r['inpaint']['ratio_mse_vs_random']:.2f}"
            if "resilience" in r:
                line += " | " + " ".join(f"{t} x{v['ratio_mse_vs_random']:.2f}" for t, v in r["resilience"].items())
            print(line)
    for key in ("cost", "cost_sd15"):
        if key in res:
            c = res[key]
            for m, r in c["methods"].items():
                print(
                    f"{key} {c['image_size']}px {m:15s} {r['seconds_per_step']:.3f} s/step, "
                    f"peak {r['peak_tensor_mb']:.1f} MiB ({c['memory_measure']})"
                )
            if "sds_vs_semantic" in c:
                s = c["sds_vs_semantic"]
                print(
                    f"{key}: SDS / semantic: time x{s['time']:.2f}, memory x{s['memory']:.2f}, FLOPs x{s['flops']:.2f}"
                )
    print("targets:", json.dumps(res["targets"]))


if __name__ == "__main__":
    main(sys.argv[1:])
