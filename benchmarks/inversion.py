"""Benchmark inversion and real-image editing: DDIM, EDICT, null-text, Direct Inversion and InfEdit side by side.

    stablekit bench inversion --json bench_out/inversion.json [--images 100 --steps 50 --model PATH]

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

Writes the JSON and a PNG grid: source, VAE round trip, then reconstruction, colour edit and shape
edit per method.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
from pathlib import Path

import _common
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

EDITS = {"color": "colors", "shape": "shapes"}  # edit -> the classifier's attribute list


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


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255


def outside(scene, target, size: int) -> np.ndarray:
    """Pixels (size x size, bool) covered by neither the first object before nor after the edit."""
    from stablekit.default_model import world

    cover = np.maximum(world.object_mask(scene.objects[0]), world.object_mask(target.objects[0]))
    cover = F.interpolate(torch.from_numpy(cover)[None, None], size=(size, size), mode="area")[0, 0].numpy()
    return cover == 0


def finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summary(rows: list[dict]) -> dict:
    return {k: finite(float(np.mean([r[k] for r in rows]))) for k in rows[0]} | {"n": len(rows)} if rows else {}


def reconstruction(pipe, method: str, images: list[Image.Image], prompts: list[str], a):
    """(what `edit` takes, or None; reconstructed images; metrics per image) for a batch of images. Method "vae"
    is the encode-decode round trip; "infedit" inverts nothing: it gives back the images, and reconstructs by
    editing to the source prompts. Seconds are the batch's divided by its images."""
    from stablekit.edit import decode, edit, invert, reconstruct
    from stablekit.edit.inversion import load_images
    from stablekit.latents import encode_image

    t0 = _common.clock(pipe.device)
    if method == "infedit":
        outs = edit(pipe, images, prompts, prompts, method="infedit", decoder_steps=a.decoder_steps)
        t1 = _common.clock(pipe.device)
        z, z0 = (encode_image(pipe, load_images(pipe, x)).double().cpu() for x in (outs, images))
        return images, outs, _metrics(images, outs, z, z0, (t1 - t0) / len(images), 0.0)
    if method == "vae":
        inv, z0 = None, encode_image(pipe, load_images(pipe, images), a.decoder_steps)
        z, t1 = z0, _common.clock(pipe.device)
    else:
        inv = invert(pipe, images, prompts, method, a.steps, decoder_steps=a.decoder_steps)
        t1 = _common.clock(pipe.device)
        z, z0 = reconstruct(pipe, inv)[-1], inv.latents[-1]
    outs = [decode(pipe, row[None]) for row in z]
    t2 = _common.clock(pipe.device)
    n = len(images)
    return inv, outs, _metrics(images, outs, z.double().cpu(), z0.double().cpu(), (t1 - t0) / n, (t2 - t1) / n)


def _metrics(images, outs, z, z0, seconds_invert: float, seconds_reconstruct: float) -> list[dict]:
    from stablekit.eval.metrics import psnr

    rows = []
    for image, out, zi, z0i in zip(images, outs, z, z0, strict=False):
        x, y = pixels(image), pixels(out)
        rows.append(
            {
                "pixel_psnr_db": psnr(y, x),
                "pixel_mse": float(np.mean((y - x) ** 2)),
                "latent_psnr_db": psnr(zi, z0i, data_range=float(z0i.max() - z0i.min())),
                "latent_mse": float(((zi - z0i) ** 2).mean()),
                "seconds_invert": seconds_invert,
                "seconds_reconstruct": seconds_reconstruct,
            }
        )
    return rows


def controller(kind: str, source_word: str, target_word: str):
    from stablekit.edit import PromptToPrompt

    if kind == "none":
        return None
    return PromptToPrompt("replace", blend=(source_word, target_word) if kind == "blend" else ())


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


def evaluate(pipe, method: str, world_images, photo_images, clf, a) -> tuple[dict, list[list]]:
    """One method's results and its grid cells (a list per world image in the grid, then per photo)."""
    from stablekit.default_model import classifier as C
    from stablekit.default_model import world
    from stablekit.edit import GUIDANCE, edit
    from stablekit.eval.harness import PHOTOS
    from stablekit.eval.metrics import psnr

    rec, edits, cells, done = {"world": [], "photos": []}, {e: [] for e in EDITS}, [], 0
    for chunk in _chunks(world_images, a.batch):
        images, prompts, scenes, targets, source_preds = (list(x) for x in zip(*chunk, strict=False))
        inv, outs, metrics = reconstruction(pipe, method, images, prompts, a)
        rec["world"] += metrics
        rows = [[(out, f"{m['pixel_psnr_db']:.1f} dB")] for out, m in zip(outs, metrics, strict=False)]
        for name in [] if inv is None else EDITS:
            olds = [getattr(sc.objects[0], name) for sc in scenes]
            words, edited = zip(*(t[name] for t in targets), strict=False)
            t0 = _common.clock(pipe.device)
            results = edit(
                pipe,
                inv,
                prompts,
                [world.canonical_caption(t) for t in edited],
                method=method,
                controller=controller(a.controller, olds[0], words[0]),
            )  # blend: batch 1
            seconds = (_common.clock(pipe.device) - t0) / len(results)
            for k, (result, pred) in enumerate(zip(results, C.predict(results, clf), strict=False)):
                keep = outside(scenes[k], edited[k], images[k].width)
                edits[name].append(
                    {
                        "success": words[k] in pred[EDITS[name]],
                        "seconds": seconds,
                        "background": pred["background"] == source_preds[k]["background"],
                        "psnr_outside_db": psnr(pixels(result)[keep], pixels(images[k])[keep]),
                    }
                )
                rows[k].append((result, f"{olds[k]}->{words[k]}"))
        done += len(chunk)
        cells += rows[: max(0, a.grid_rows - done + len(chunk))]
        print(f"{method}: image {done}/{len(world_images)}", flush=True)
    for chunk in _chunks(photo_images, a.batch):
        names, images = (list(x) for x in zip(*chunk, strict=False))
        inv, outs, metrics = reconstruction(pipe, method, images, [PHOTOS[n] for n in names], a)
        rec["photos"] += metrics
        cells += [
            [(out, f"{m['pixel_psnr_db']:.1f} dB")] + [(None, "")] * (0 if inv is None else len(EDITS))
            for out, m in zip(outs, metrics, strict=False)
        ]
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
    for method in ["vae"] + a.methods:
        res["methods"][method], new = evaluate(pipe, method, world_images, photo_images, clf, a)
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
