"""Benchmark the generative watermarks (Tree-Ring, Gaussian Shading, SEAL) and the dwtDct baseline.

    stablekit bench watermark --json bench_out/watermark.json [--n 500 --calib 500 --attack-n 200] [--ray [ADDRESS]]

Protocol (on the embedded default model unless ``--model``):
* prompts: held-out world captions (seed 777; training used 0). Image i of every marked set and of
  the unmarked test set shares prompt i; every image has its own noise seed (no noise is reused).
  The sets are generated as one job of the batch engine (each marked row carries its key): in this
  process, on ``--workers`` processes or on Ray (``--ray``), with the same results.
* negatives: ``--n`` unmarked generations of the same prompts (the test negatives, attacked exactly
  like the marked images) and ``--calib`` unmarked generations of other held-out prompts (the
  calibration set, never attacked, never used for rates).
* published image: each 64x64 output upscaled 4x (Lanczos) to 256x256 -- invisible-watermark's dwtDct
  refuses images under 256x256, so every method publishes at that size and every attack acts on it;
  the generative detectors resize back to 64x64 (area), invert with DDIM (empty prompt, no guidance,
  ``--inv-steps``) and score the recovered noise. Resizing averages 4x4 pixels, which halves the
  standard deviation of pixel noise four times over for the generative methods; dwtDct decodes at 256.
* decision: each method's statistic (Tree-Ring: minus the L1 distance; Gaussian Shading: its z, the
  recovered noise against the key's signs; dwtDct: bit accuracy; SEAL: fraction of matching patches),
  threshold = the calibration negatives' (1 - FPR) quantile, detected when strictly above. TPR at 1% and
  0.1% FPR and the FPR measured on the (attacked) test negatives, each with a 95% Clopper-Pearson
  interval; with 500 calibration negatives the 0.1% threshold is their maximum. The analytic p-value
  rule (p <= FPR) is reported too.
* attacks (``stablekit.eval.attacks``): a row per attack and strength on ``--attack-n`` images per set;
  VAE regeneration and purification act at the model's 64x64. Forgeries: ``spoof`` (imprint: the
  noise inverted from a marked image regenerates another prompt, guidance as generation) on test
  negatives' prompts, and averaging (leave-one-out mean of the marked minus the mean of the
  negatives, added to negatives: ``avg_spoof``; subtracted from marked images: ``avg_removal``).
* quality: attribute accuracy and classifier Fréchet distance (to renders of the same scenes) of each
  marked set against the unmarked one.
* Gaussian Shading identification: the recovered noise is matched against ``--users`` keys, the
  marking key among them.
* Safe-SD (read from the image, no inversion): its marked set is generated from the test prompts with the
  key's trigger word inserted; two more sets: the untriggered test prompts with the key attached (same seeds
  as the unmarked set: bit-identical images expected, and the false marks) and the triggered prompts without
  the key (same seeds as the marked set: the quality the mark costs, apart from the trigger word's own effect).
  The trigger layer's decisions on the untriggered and triggered prompts are counted. Imprint spoofing is
  left out (it reuses inverted noise, which this mark does not live in); the averaging forgeries are run.

Writes the JSON and a PNG of TPR@1%FPR against attack strength per method.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import _common
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PUBLISH = 256
FPRS = (0.01, 0.001)
MODEL_ATTACKS = ("vae_regeneration", "purification")
DEFAULT_ATTACKS = {
    "jpeg": (70, 50, 30),
    "resized_crop": (0.9, 0.75, 0.5),
    "rotation": (5, 15),
    "blur": (1.0, 2.0),
    "noise": (0.02, 0.05, 0.1),
    "brightness": (1.5,),
    "contrast": (1.5,),
    "combination": (0.5,),
    "vae_regeneration": (1,),
    "purification": (0.1, 0.3),
}


def publish(x: torch.Tensor) -> list[Image.Image]:
    """(N, 3, h, w) in [0, 1] -> PIL images upscaled to PUBLISH pixels."""
    arr = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a).resize((PUBLISH, PUBLISH), Image.LANCZOS) for a in arr]


def model_size(images: list[Image.Image], size: int) -> torch.Tensor:
    """Published images back at the model's size, (N, 3, size, size) in [0, 1] (area resampling)."""
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]))
    return F.interpolate(x.permute(0, 3, 1, 2), size=(size, size), mode="area").clamp(0, 1)


def recover(pipe, images: list[Image.Image], steps: int, batch: int = 100) -> torch.Tensor:
    """Initial noises (N, C, h, w) float64: DDIM inversion, empty prompt, guidance 1, in batches."""
    from stablekit.edit.inversion import ddim_invert
    from stablekit.latents import Schedule, encode_image, encode_prompts

    x, sched, out = model_size(images, pipe.unet.config.sample_size * pipe.vae_scale_factor), Schedule(pipe, steps), []
    for i in range(0, len(x), batch):
        with torch.no_grad():
            z0 = encode_image(pipe, (x[i : i + batch] * 2 - 1).to(pipe.device))
            out.append(ddim_invert(pipe, sched, z0, encode_prompts(pipe, [""] * len(z0), z0), 1.0)[0].cpu().double())
    return torch.cat(out)


class Detectors:
    """Per method: the statistic of each published image (higher = more likely marked) and its p-value."""

    def __init__(self, pipe, keys: dict, dwt_bits: np.ndarray, a):
        from stablekit.provenance import watermark

        self.pipe, self.a, self.marks, self.dwt_bits = pipe, a, {m: watermark(k) for m, k in keys.items()}, dwt_bits
        self.seconds = {"inversion": 0.0, "images": 0}

    def __call__(self, images: list[Image.Image], only: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from scipy import stats

        from stablekit.default_model.classifier import predict
        from stablekit.provenance.seal import caption, text_embedding

        marks = {m: mk for m, mk in self.marks.items() if only in (None, m)}
        out = self.readers({m: mk for m, mk in marks.items() if not mk.inverts}, images)
        marks = {m: mk for m, mk in marks.items() if mk.inverts}
        if marks:
            t0 = time.perf_counter()
            noise = recover(self.pipe, images, self.a.inv_steps)
            self.seconds["inversion"] += time.perf_counter() - t0
            self.seconds["images"] += len(images)
            embeds = [None] * len(images)
            if "seal" in marks:  # the default SEAL embedder, batched: classifier -> caption -> MiniLM
                small = model_size(images, self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)
                embeds = [text_embedding(caption(p)) for p in predict(small)]
            for m, mark in marks.items():
                res = [mark.score(noise[i], images[i], lambda _, e=embeds[i]: e) for i in range(len(images))]
                sign = -1.0 if m == "tree-ring" else 1.0  # Tree-Ring's L1 distance is lower when marked
                out[m] = (np.array([sign * r["score"] for r in res]), np.array([r["p_value"] for r in res]))
        if only in (None, "dwtDct"):
            k = len(self.dwt_bits)
            acc = np.array([np.mean(dwt_decode(im, k) == self.dwt_bits) for im in images])
            out["dwtDct"] = (acc, stats.binom.sf(np.round(acc * k) - 1, k, 0.5))
        return out

    def readers(self, marks: dict, images: list[Image.Image]) -> dict:
        """Statistics of the marks read from the image itself (no inversion), at the model's size."""
        x = model_size(images, self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)
        out = {}
        for m, mark in marks.items():
            res = [mark.score(mark.read(self.pipe, x[i : i + 1])[0], None) for i in range(len(x))]
            out[m] = (np.array([r["score"] for r in res]), np.array([r["p_value"] for r in res]))
        return out


def dwt_encode(images: list[Image.Image], bits: np.ndarray) -> list[Image.Image]:
    from imwatermark import WatermarkEncoder

    enc = WatermarkEncoder()
    enc.set_watermark("bits", [int(b) for b in bits])
    return [Image.fromarray(enc.encode(np.asarray(im)[..., ::-1].copy(), "dwtDct")[..., ::-1].copy()) for im in images]


def dwt_decode(image: Image.Image, k: int) -> np.ndarray:
    from imwatermark import WatermarkDecoder

    return np.array(WatermarkDecoder("bits", k).decode(np.asarray(image.convert("RGB"))[..., ::-1].copy(), "dwtDct"))


def rates(pos: np.ndarray, neg: np.ndarray, thresholds: dict, p_pos=None, p_neg=None) -> dict:
    """TPR and FPR with 95% intervals at each calibrated threshold (and by the analytic p-value)."""
    from stablekit.eval.metrics import rate_interval

    res = {}
    for f, t in thresholds.items():
        for name, x in (("tpr", pos), ("fpr", neg)):
            if x is None:
                continue
            k = int((x > t).sum())
            res[f"{name}@{f:g}"] = round(k / len(x), 4)
            res[f"{name}@{f:g}_ci95"] = [round(v, 4) for v in rate_interval(k, len(x))]
        if p_pos is not None:
            res[f"tpr_p<={f:g}"] = round(float((p_pos <= f).mean()), 4)
        if p_neg is not None:
            res[f"fpr_p<={f:g}"] = round(float((p_neg <= f).mean()), 4)
    return res


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench watermark", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=777, seed_help="held-out prompt seed (training used 0)")
    p.add_argument("--n", type=int, default=500, help="marked images per method, and unmarked test images")
    p.add_argument("--calib", type=int, default=500, help="unmarked calibration images (thresholds)")
    p.add_argument("--attack-n", type=int, default=200, help="images per set in the attack rows")
    p.add_argument("--spoof-n", type=int, default=200, help="forgeries per method")
    p.add_argument("--users", type=int, default=100, help="Gaussian Shading keys to identify the user among")
    p.add_argument("--methods", default="tree-ring,gaussian-shading,seal,safe-sd")
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help="names from stablekit.eval.attacks.ATTACKS")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--inv-steps", type=int, default=25, help="DDIM inversion steps in detection")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=50)
    _common.add_executor_args(p)
    a = p.parse_args(args)
    a.methods, a.attacks = a.methods.split(","), [s for s in a.attacks.split(",") if s]
    import stablekit
    from stablekit.eval.attacks import ATTACKS

    unknown = [x for x in a.attacks if x not in ATTACKS] + [
        m for m in a.methods if m not in stablekit.CATALOGUE["watermark"]
    ]
    if unknown:
        raise stablekit.StablekitError(f"unknown attack or method: {', '.join(unknown)}")
    return a


def attack(name: str, strength, images: list[Image.Image], pipe, size: int) -> list[Image.Image]:
    from stablekit.eval.attacks import ATTACKS

    fn = ATTACKS[name][0]
    if name not in MODEL_ATTACKS:
        return fn(images, strength, seed=1)
    small = [im.resize((size, size), Image.BOX) for im in images]
    return [im.resize((PUBLISH, PUBLISH), Image.LANCZOS) for im in fn(small, strength, pipe=pipe, seed=1, steps=25)]


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    import stablekit
    from stablekit.eval.harness import bench_pipeline, heldout_prompts
    from stablekit.provenance import make_key, watermark

    t_start = time.perf_counter()
    pipe = bench_pipeline(a)
    scenes, prompts = heldout_prompts(a.n + a.calib, 0, a.seed)
    gen = dict(
        steps=a.steps, guidance=a.guidance, batch=a.batch, guidance_rescale=stablekit.pipeline.guidance_rescale(pipe)
    )
    keys = {m: make_key(pipe, m, seed=i) for i, m in enumerate(a.methods)}
    dwt_bits = np.random.default_rng(a.seed).integers(0, 2, 48)
    with _common.executor(a):
        images, seconds = generate_sets(pipe, prompts, keys, gen, a)
    pub = {k: publish(x) for k, x in images.items()}
    pub["dwtDct"] = dwt_encode(pub["unmarked"], dwt_bits)
    methods = a.methods + ["dwtDct"]
    det = Detectors(pipe, keys, dwt_bits, a)
    cal = det(pub.pop("calib"))
    thresholds = {m: {f: float(np.quantile(cal[m][0], 1 - f, method="higher")) for f in FPRS} for m in methods}
    marked = {m: images[m] for m in a.methods}
    res = {
        "model": str(a.model or stablekit.pipeline.DEFAULT_MODEL),
        "published_size": PUBLISH,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "plugins": {m: _common.plugin_config(watermark(k)) for m, k in keys.items()},
        "thresholds": thresholds,
        "rows": attack_rows(pipe, pub, det, thresholds, methods, a),
        "forgeries": forgery_rows(pipe, pub, marked, prompts, det, thresholds, a, gen),
        "quality": quality(images, seconds, scenes[: a.n], a),
        "identification": identification(pipe, pub, keys, a) if "gaussian-shading" in keys else None,
        "safe_sd": safe_sd_rows(pipe, images, pub, det, thresholds, keys["safe-sd"], prompts, a)
        if "safe-sd" in keys
        else None,
        "detection_seconds_per_image": round(det.seconds["inversion"] / max(1, det.seconds["images"]), 4),
        "runtime_minutes": round((time.perf_counter() - t_start) / 60, 1),
    }
    _common.write_json(a.json, res)
    plot(res["rows"], methods, a.json.with_suffix(".png"))
    print(f"wrote {a.json} and {a.json.with_suffix('.png')} ({res['runtime_minutes']} min)")
    return res


def generate_sets(pipe, prompts: list[str], keys: dict, gen: dict, a) -> tuple[dict, dict]:
    """The image sets (unmarked test, calibration on other prompts, one marked set per method, each with its own
    seeds), made as one job of the batch engine, and seconds per image of each."""
    sets = {"unmarked": (prompts[: a.n], a.seed, None), "calib": (prompts[a.n :], a.seed + 1, None)}
    sets |= {
        m: (marked_prompts(keys[m], prompts[: a.n], a.seed), a.seed + 2 + i, keys[m].to_data())
        for i, m in enumerate(keys)
    }
    if "safe-sd" in keys:  # the untriggered prompts with the key (as the unmarked set); the triggered ones without
        seed = a.seed + 2 + list(keys).index("safe-sd")
        sets["safe-sd:untriggered"] = (prompts[: a.n], a.seed, keys["safe-sd"].to_data())
        sets["safe-sd:base"] = (sets["safe-sd"][0], seed, None)
    settings = {"steps": gen["steps"], "guidance": gen["guidance"]}
    settings |= {"guidance_rescale": gen["guidance_rescale"]} if gen["guidance"] > 1 else {}
    rows = []
    for texts, seed, key in sets.values():
        mark = {} if key is None else {"watermark": key}
        rows += [{"prompt": p, "seed": seed * 100_000 + i} | settings | mark for i, p in enumerate(texts)]
    x, records = _common.generate_rows(a, pipe, rows, "watermark sets")
    images, seconds, start = {}, {}, 0
    for name, (texts, _, _) in sets.items():
        images[name] = x[start : start + len(texts)]
        seconds[name] = _common.seconds_per_image(records[start : start + len(texts)])
        start += len(texts)
    return images, seconds


def marked_prompts(key, prompts: list[str], seed: int) -> list[str]:
    """The prompts a method's marked set is generated from: Safe-SD's hold its trigger word, others are as given."""
    if key.method != "safe-sd":
        return prompts
    from stablekit.provenance.safe_sd_train import with_trigger

    rng = random.Random(seed)
    return [with_trigger(p, key.params["trigger"], rng) for p in prompts]


def safe_sd_rows(pipe, images: dict, pub: dict, det, thresholds: dict, key, prompts: list[str], a) -> dict:
    """Safe-SD without its trigger: how often the trigger layer fires on held-out prompts (and on triggered ones),
    how many untriggered images are bit-identical to the unmarked model's, and how many are detected as marked."""
    from stablekit.eval.metrics import rate_interval
    from stablekit.provenance import watermark

    mark = watermark(key)
    with torch.no_grad():
        fired = {
            name: int((mark.net.trigger_logit(pipe.encode_prompt(texts, "cpu", 1, False)[0].cpu()) > 0).sum())
            for name, texts in (
                ("untriggered", prompts[: a.n]),
                ("triggered", marked_prompts(key, prompts[: a.n], a.seed)),
            )
        }
    same = int(sum(torch.equal(x, y) for x, y in zip(images["safe-sd:untriggered"], images["unmarked"], strict=True)))
    scores = det(pub["safe-sd:untriggered"], only="safe-sd")["safe-sd"]
    out = {f"trigger_fires_{k}": round(v / a.n, 4) for k, v in fired.items()}
    out |= {f"trigger_fires_{k}_ci95": [round(x, 4) for x in rate_interval(v, a.n)] for k, v in fired.items()}
    out |= {"untriggered_identical_to_unmarked": round(same / a.n, 4), "n": a.n}
    out["untriggered_detected"] = rates(scores[0], None, thresholds["safe-sd"], scores[1])
    return out


def attack_rows(pipe, pub: dict, det, thresholds: dict, methods: list[str], a) -> list[dict]:
    """Detection rates on the clean published images, then per attack and strength."""
    from stablekit.eval.attacks import ATTACKS

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def row(name, strength, n, transform):
        neg = det(transform(pub["unmarked"][:n]))
        r = {"attack": name, "strength": strength, "n": n}
        for m in methods:
            pos = det(transform(pub[m][:n]), only=m)
            r[m] = rates(pos[m][0], neg[m][0], thresholds[m], pos[m][1], neg[m][1])
        print(json.dumps({k: (v["tpr@0.01"] if isinstance(v, dict) else v) for k, v in r.items()}), flush=True)
        return r

    rows = [row("clean", None, a.n, lambda ims: ims)]
    for name in a.attacks:
        for s in DEFAULT_ATTACKS.get(name, ATTACKS[name][1]):
            rows.append(row(name, s, a.attack_n, lambda ims, name=name, s=s: attack(name, s, ims, pipe, size)))
    return rows


def quality(images: dict, seconds: dict, scenes, a) -> dict:
    """Attribute accuracy and classifier Fréchet distance to renders of each set but the calibration's."""
    from stablekit.default_model import classifier as C
    from stablekit.default_model import world
    from stablekit.eval.metrics import frechet_distance

    clf = C.load_classifier()
    real = C.to_tensor([world.render(s, np.random.default_rng(a.seed)) for s in scenes])
    out = {}
    with torch.no_grad():
        f_real = clf.features(real)
        for m, x in ((m, x) for m, x in images.items() if m != "calib"):
            out[m] = {
                "fid_classifier": round(frechet_distance(clf.features(C.to_tensor(x)), f_real), 3),
                "attribute_acc": C.accuracy(C.predict(x, clf), scenes),
                "seconds_per_image": round(seconds[m], 4),
            }
    return out


def forgery_rows(pipe, pub, marked, prompts, det, thresholds, a, gen: dict) -> list[dict]:
    """Spoofing by imprinting (noise reuse, sampled with the generation settings `gen`) and by
    averaging, and removal by averaging."""
    from stablekit.eval.harness import generate

    n, rows = min(a.spoof_n, a.n - 1), []
    for m in marked:
        if det.marks[m].inverts:  # imprinting reuses the inverted noise: only for marks that live in it
            noise = recover(pipe, pub[m][:n], a.inv_steps).float()
            others = prompts[1 : n + 1]  # marked image i's noise regenerates test prompt i + 1
            spoof, _ = generate(pipe, others, seed=0, desc=f"spoof {m}", latents=noise, **gen)
            s = det(publish(spoof), only=m)[m][0]
            rows.append({"method": m, "attack": "spoof", "n": n, "accepted": rates(s, None, thresholds[m])})
        neg = det(pub["unmarked"][1 : n + 1], only=m)[m][0]
        pos_arr = np.stack([np.asarray(im, dtype=np.float32) for im in pub[m]])
        neg_arr = np.stack([np.asarray(im, dtype=np.float32) for im in pub["unmarked"]])
        pattern = (pos_arr.sum(0) - pos_arr[:n]) / (len(pos_arr) - 1) - neg_arr.mean(0)  # leave-one-out

        def to_img(arr):
            return [Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8)) for x in arr]

        removed = det(to_img(pos_arr[:n] - pattern), only=m)[m][0]
        forged = det(to_img(neg_arr[:n] + pattern), only=m)[m][0]
        rows.append({"method": m, "attack": "avg_spoof", "n": n, "accepted": rates(forged, None, thresholds[m])})
        rows.append(
            {
                "method": m,
                "attack": "avg_removal",
                "n": n,
                "detected": rates(removed, None, thresholds[m]),
                "unmarked_reference": rates(neg, None, thresholds[m]),
            }
        )
        print(json.dumps(rows[-3:])[:400], flush=True)
    return rows


def identification(pipe, pub, keys, a) -> dict:
    """Gaussian Shading: how often the marking key is the best match among `users` keys."""
    from stablekit.eval.metrics import rate_interval
    from stablekit.provenance import make_key, watermark

    others = [watermark(make_key(pipe, "gaussian-shading", seed=1000 + u)) for u in range(a.users - 1)]
    marks = [watermark(keys["gaussian-shading"])] + others
    noise = recover(pipe, pub["gaussian-shading"], a.inv_steps)
    best = [int(np.argmax([mk.score(z, None)["score"] for mk in marks])) for z in noise]
    k = sum(b == 0 for b in best)
    return {
        "users": a.users,
        "n": len(best),
        "accuracy": round(k / len(best), 4),
        "accuracy_ci95": [round(v, 4) for v in rate_interval(k, len(best))],
    }


def plot(rows: list[dict], methods: list[str], path: Path):
    plt = _common.pyplot()

    names = [n for n in dict.fromkeys(r["attack"] for r in rows) if n != "clean"]
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(3.2 * ((len(names) + 1) // 2), 6), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        sel = [r for r in rows if r["attack"] == name]
        for m in methods:
            ax.plot([r["strength"] for r in sel], [r[m]["tpr@0.01"] for r in sel], "o-", label=m)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    axes.flat[0].set_ylabel("TPR @ 1% FPR")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
