"""Benchmark inversion and real-image editing: DDIM, EDICT, null-text, Direct Inversion and InfEdit side by side.

    stablekit bench inversion --json bench_out/inversion.json [--images 100 --steps 50 --model PATH] [--ray [ADDRESS]]

"Real" images: world scenes rendered from seed 4242 (training used seed 0; in distribution, with
exact attributes and object masks), plus the photos scikit-image ships (``pip install
stablekit[bench]``), centre-cropped and resized to the model's size, with hand-written captions.

Reconstruction, every method at its paper's guidance, per image: error in pixels (PSNR in dB,
MSE on [0, 1]) and in latents (MSE against the encoded image; PSNR over its peak-to-peak range,
null when an image comes back exactly), seconds to invert and to reconstruct; the VAE round trip
alone ("vae") is the ceiling. InfEdit inverts nothing: its "reconstruction" is an edit to the
source prompt itself (latent error: between the VAE encodings of output and source), at its own
paper steps (12) whatever ``--steps`` says.

Editing, world images only, reusing the inversion: the first object's colour, then its shape, is
swapped for one not in the scene (source prompt: ``world.canonical_caption``; target: the same
with the word replaced), with prompt-to-prompt word swap (paper defaults) as the controller unless
``--controller none``, plus local blend on the swapped words with ``--controller blend``. The
attribute classifier judges success (it sees the target colour / shape; 95% Clopper-Pearson
interval) and preservation (its background prediction agrees with the one on the source image;
PSNR against the source outside the old and new object masks).

The work is cut in units of ``--batch`` images per method (``benchmarks/_inversion_work.py``), done in this
process, on ``--workers`` processes or on Ray (``--ray [ADDRESS]``) through the batch engine's executors, with the
same results (timings aside). Writes the JSON and a PNG grid: source, VAE round trip, then reconstruction, colour
edit and shape edit per method.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
from pathlib import Path

import _common
import _inversion_work
import numpy as np
from _inversion_work import EDITS
from PIL import Image


def world_edits(n: int, seed: int):
    """`n` world scenes with their render, and per edit (the target word, the edited scene)."""
    from stablekit.default_model import world

    rng, out = random.Random(seed), []
    for image, _, scene in world.dataset(n, seed):
        edits = {}
        for edit, names in (("color", world.COLOR_NAMES), ("shape", world.SHAPE_NAMES)):
            target = copy.deepcopy(scene)
            word = rng.choice([c for c in names if all(getattr(o, edit) != c for o in scene.objects)])
            setattr(target.objects[0], edit, word)
            edits[edit] = (word, target)
        out.append((image, scene, edits))
    return out


def finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summary(rows: list[dict]) -> dict:
    return {k: finite(float(np.mean([r[k] for r in rows]))) for k in rows[0]} | {"n": len(rows)} if rows else {}


def parse(args: list[str]) -> argparse.Namespace:
    from stablekit.edit import EDIT_METHODS as METHODS

    p = argparse.ArgumentParser(prog="stablekit bench inversion", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=4242, seed_help="world scene seed (training used 0)")
    p.add_argument("--images", type=int, default=100, help="world images")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument(
        "--controller",
        choices=["replace", "blend", "none"],
        default="replace",
        help="editing controller: prompt-to-prompt word swap, plus local blend, or none",
    )
    p.add_argument("--decoder-steps", type=int, default=0, help="decoder-inversion steps (0: off)")
    p.add_argument("--no-photos", dest="photos", action="store_false", help="skip scikit-image's photos")
    p.add_argument("--grid", type=Path, default=None, help="PNG grid (default: next to the JSON)")
    p.add_argument("--grid-rows", type=int, default=8, help="world images in the grid (photos follow)")
    p.add_argument("--classifier", type=Path, default=None, help="attribute classifier weights (default: shipped)")
    p.add_argument(
        "--batch",
        type=int,
        default=16,
        help="images inverted and edited together (1 with --controller blend: its words differ per image)",
    )
    _common.add_executor_args(p)
    a = p.parse_args(args)
    if a.batch < 1:
        p.error("--batch must be at least 1")
    a.batch = 1 if a.controller == "blend" else a.batch
    a.grid = a.grid or a.json.with_suffix(".png")
    return a


def edit_summary(rows: list[dict]) -> dict:
    from stablekit.eval.metrics import rate_interval

    k, b, n = sum(r["success"] for r in rows), sum(r["background"] for r in rows), len(rows)
    return {
        "n": n,
        "success_rate": k / n,
        "success_ci95": list(rate_interval(k, n)),
        "background_agreement": b / n,
        "background_agreement_ci95": list(rate_interval(b, n)),
        "psnr_outside_db": finite(float(np.mean([r["psnr_outside_db"] for r in rows]))),
        "seconds_per_edit": float(np.mean([r["seconds"] for r in rows])),
    }


def _chunks(items: list, n: int):
    return (items[i : i + n] for i in range(0, len(items), n))


def evaluate(a, pipe, method: str, world_images, photo_images) -> tuple[dict, list[list]]:
    """One method's results and its grid cells (a list per world image in the grid, then per photo): its units of
    work (``--batch`` images each) done by :class:`_inversion_work.Evaluator` workers."""
    import functools

    from stablekit import batch
    from stablekit.edit import GUIDANCE

    units = [(method, "world", chunk) for chunk in _chunks(world_images, a.batch)]
    units += [(method, "photos", chunk) for chunk in _chunks(photo_images, a.batch)]
    settings = {"steps": a.steps, "decoder_steps": a.decoder_steps, "controller": a.controller}
    task = functools.partial(_inversion_work.Evaluator, a.model, a.device, a.threads, settings, a.classifier)
    done = {}
    for index, (result,) in batch.map_units(task, units, workers=a.workers, threads=a.threads, ray=a.ray, pipe=pipe):
        done[index] = result
        print(f"{method}: batch {len(done)}/{len(units)}", flush=True)
    rec, edits, cells, seen = {"world": [], "photos": []}, {e: [] for e in EDITS}, [], 0
    for index, (_, kind, chunk) in enumerate(units):
        result = done[index]
        rec[kind] += result["rec"]
        for name, rows in result["edits"].items():
            edits[name] += rows
        seen += len(chunk) if kind == "world" else 0
        cells += result["cells"][: max(0, a.grid_rows - seen + len(chunk))] if kind == "world" else result["cells"]
    entry = {"guidance": GUIDANCE.get(method), "reconstruction": {k: summary(v) for k, v in rec.items()}}
    return entry | {f"edit_{name}": edit_summary(rows) for name, rows in edits.items() if rows}, cells


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    from stablekit.default_model import classifier as C
    from stablekit.default_model import world
    from stablekit.eval.harness import bench_pipeline, photos, table_grid

    pipe = bench_pipeline(a)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    clf = C.load_classifier(*([a.classifier] if a.classifier else []))
    scenes = world_edits(a.images, a.seed)
    images = [im.resize((size, size), Image.LANCZOS) for im, _, _ in scenes]
    world_images = [
        (im, world.canonical_caption(sc), sc, targets, pred)
        for im, (_, sc, targets), pred in zip(images, scenes, C.predict(images, clf), strict=False)
    ]
    photo_images = photos(size) if a.photos else []
    res = {
        **_common.model_info(a, pipe),
        "steps": a.steps,
        "seed": a.seed,
        "images": a.images,
        "photos": [name for name, _ in photo_images],
        "controller": a.controller,
        "decoder_steps": a.decoder_steps,
        "image_size": size,
        "methods": {},
    }
    cells = [[(im, "source")] for im in images[: a.grid_rows]] + [[(im, name)] for name, im in photo_images]
    with _common.executor(a, _inversion_work):
        for method in ["vae"] + a.methods:
            res["methods"][method], new = evaluate(a, pipe, method, world_images, photo_images)
            cells = [row + more for row, more in zip(cells, new, strict=False)]
            _common.write_json(a.json, res)  # after every method: a stopped run keeps what it finished
    table_grid(cells, ["source", "vae"] + [f"{m} {c}" for m in a.methods for c in ("rec", *EDITS)], a.grid)
    for method, entry in res["methods"].items():
        r = entry["reconstruction"]["world"]
        line = f"{method:9s} world PSNR {r['pixel_psnr_db']:.2f} dB, latent MSE {r['latent_mse']:.2e}"
        print(
            line
            + "".join(f", {e} success {entry[f'edit_{e}']['success_rate']:.2f}" for e in EDITS if f"edit_{e}" in entry)
        )
    print(f"wrote {a.json} and {a.grid}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
