"""The asymmetric-decoder part of ``stablekit bench restore``: the shipped asymmetric decoder against the VAE's own.

Three measurements, each on held-out world scenes (the benchmark's seed; training used 0):

* **reconstruction**: each scene's latent decoded by the VAE (``vae``), by the asymmetric decoder keeping the
  pixels outside the object (its mask dilated 2 pixels: ``asymmetric_object``, the inpainting use) and with
  nothing known (``asymmetric_ones``, the text-to-image use): PSNR and SSIM against the scene;
* **editing**: the object recoloured (Direct Inversion with prompt-to-prompt word replacement, ``--asym-steps``
  steps), decoded by the VAE, by the asymmetric decoder with the object's dilated mask given
  (``asymmetric_mask``) and with the mask it finds from the latents (``asymmetric_auto``): background PSNR
  (pixels outside the dilated mask) against the source, and whether the judge sees the target colour;
* **text-to-image**: held-out prompts generated once, their latents decoded by both decoders (nothing known):
  the judge's attribute accuracy of each, paired.

Targets (the paper's claims, against its baseline, the VAE decoder): background PSNR of edits higher with the
asymmetric decoder (paired difference > 0, with the given mask and with the found one), reconstruction PSNR
higher when the unedited pixels are known (paired > 0), and text-to-image accuracy unchanged (the paired
difference's interval above -5 points).
"""

from __future__ import annotations

import random

import _common
import numpy as np
import torch

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange")


def dilated(mask: np.ndarray, grow: int = 2) -> np.ndarray:
    m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    return (torch.nn.functional.max_pool2d(m, 2 * grow + 1, 1, grow)[0, 0] > 0.01).numpy()


def image_scores(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    from stablekit.latents import psnr

    a = out.permute(1, 2, 0).double().numpy()
    b = ref.permute(1, 2, 0).double().numpy()
    return min(psnr(a, b), 100.0), structural_similarity(a, b, channel_axis=2, data_range=1.0)


def reconstruction(pipe, n: int, seed: int) -> dict:
    """PSNR/SSIM of each decoder on `n` held-out scenes."""
    from stablekit.default_model import world
    from stablekit.edit.asymmetric_decoder import decode_keeping
    from stablekit.latents import decode, encode_image, load_image, to_tensor

    raw = {k: {"psnr_db": [], "ssim": []} for k in ("vae", "asymmetric_object", "asymmetric_ones")}
    for image, _, scene in world.dataset(n, seed, two_prob=0.25):
        z = encode_image(pipe, load_image(pipe, image))
        ref = to_tensor(image)
        region = dilated(np.max([world.object_mask(o) for o in scene.objects], axis=0))
        outs = {
            "vae": decode(pipe, z, output_type="pt"),
            "asymmetric_object": decode_keeping(pipe, z, image, region, output_type="pt"),
            "asymmetric_ones": decode_keeping(pipe, z, image, np.ones_like(region), output_type="pt"),
        }
        for name, out in outs.items():
            p, s = image_scores(out, ref)
            raw[name]["psnr_db"].append(p)
            raw[name]["ssim"].append(s)
    return raw


def edits(pipe, n: int, seed: int, steps: int) -> tuple[dict, list]:
    """Background PSNR and the judge's colour verdict of each decoder on `n` recolouring edits; the first images."""
    from stablekit.default_model import classifier, world
    from stablekit.edit import PromptToPrompt, edit
    from stablekit.latents import psnr

    rng = random.Random(seed)
    raw = {
        k: {"background_psnr_db": [], "target_colour_seen": []} for k in ("vae", "asymmetric_mask", "asymmetric_auto")
    }
    shown = []
    for image, _, scene in world.dataset(n, seed + 1, two_prob=0):
        obj = scene.objects[0]
        colour = rng.choice([c for c in COLOURS if c != obj.color])
        source = f"a {obj.color} {obj.shape} on a {scene.background} background"
        target = source.replace(obj.color, colour, 1)
        region = dilated(world.object_mask(obj))
        kw = dict(method="direct", steps=steps, controller=PromptToPrompt("replace"))
        outs = {
            "vae": edit(pipe, image, source, target, **kw),
            "asymmetric_mask": edit(pipe, image, source, target, decoder="asymmetric", mask=region, **kw),
            "asymmetric_auto": edit(pipe, image, source, target, decoder="asymmetric", **kw),
        }
        src = np.asarray(image, np.float64)
        keep = ~region
        for name, out in outs.items():
            bg = psnr(np.asarray(out, np.float64)[keep], src[keep], 255)
            raw[name]["background_psnr_db"].append(min(bg, 100.0))
            raw[name]["target_colour_seen"].append(float(classifier.predict([out])[0]["colors"] == [colour]))
        if len(shown) < 4:
            shown.append([image, *outs.values()])
    return raw, shown


def text_to_image(pipe, n: int, seed: int, steps: int) -> dict:
    """The judge's per-prompt attribute matches (N, 5) of the same generated latents decoded by each decoder."""
    from stablekit.edit.asymmetric_decoder import decode_keeping
    from stablekit.eval.harness import Judge, heldout_prompts
    from stablekit.latents import decode

    scenes, prompts = heldout_prompts(n - n // 4, n // 4, seed)
    judge = Judge(scenes, seed)
    gens = [torch.Generator().manual_seed(seed * 100_000 + k) for k in range(n)]
    with torch.inference_mode():
        z = pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, guidance_rescale=0.7, generator=gens,
                 output_type="latent").images  # fmt: skip
    blank = torch.zeros(3, 64, 64)
    ones = np.ones((64, 64))
    plain = torch.stack([decode(pipe, zi[None], output_type="pt") for zi in z])
    asym = torch.stack([decode_keeping(pipe, zi[None], blank, ones, output_type="pt") for zi in z])
    return {"vae": judge.matches(plain), "asymmetric": judge.matches(asym)}


def paired(raw: dict, better: str, worse: str, key: str, threshold: float, unit: str, min_n: int = 20) -> dict:
    d = np.subtract(raw[better][key], raw[worse][key])
    return _common.target(
        float(d.mean()), _common.mean_interval(d), threshold, ">", len(d), min_n,
        measure=f"paired {key} difference {better} - {worse} ({unit})",
    )  # fmt: skip


def summary(raw: dict) -> dict:
    out = {}
    for name, metrics in raw.items():
        out[name] = {"n": len(next(iter(metrics.values())))}
        for k, v in metrics.items():
            out[name] |= {k: float(np.mean(v)), f"{k}_ci95": _common.mean_interval(v)}
    return out


def run(pipe, a) -> tuple[dict, list]:
    """All three measurements and their targets; the first edits for the plot."""
    from stablekit.eval.harness import paired_delta

    rec = reconstruction(pipe, a.asym, a.seed)
    edit_raw, shown = edits(pipe, a.asym, a.seed, a.asym_steps)
    t2i = text_to_image(pipe, a.asym, a.seed, a.asym_steps)
    acc = {k: float(m.mean()) for k, m in t2i.items()}
    delta = paired_delta(t2i["asymmetric"], t2i["vae"], a.seed)
    res = {"reconstruction": summary(rec), "editing": summary(edit_raw), "edit_steps": a.asym_steps}
    res["text_to_image"] = {"n": len(t2i["vae"]), "attribute_accuracy": acc, "asymmetric_minus_vae_points": delta}
    bg = "background_psnr_db"
    res["targets"] = {
        "asym_background_psnr_beats_vae_mask": paired(edit_raw, "asymmetric_mask", "vae", bg, 0, "dB"),
        "asym_background_psnr_beats_vae_auto": paired(edit_raw, "asymmetric_auto", "vae", bg, 0, "dB"),
        "asym_reconstruction_psnr_beats_vae": paired(rec, "asymmetric_object", "vae", "psnr_db", 0, "dB"),
        "asym_text_to_image_accuracy_unchanged": _common.target(
            delta["points"], delta["ci95"], -5.0, ">", len(t2i["vae"]), 20,
            measure="paired attribute-accuracy difference asymmetric - vae (points, bootstrap)",
        ),
    }  # fmt: skip
    return res, shown


def plot(res: dict, shown: list, path) -> None:
    """Background PSNR of each decoder's edits (with intervals) and the first edits side by side."""
    plt = _common.pyplot()
    cols = max(len(shown), 1)
    fig, axes = plt.subplots(2, cols + 1, figsize=(2.2 * (cols + 1), 4.6), squeeze=False)
    names = list(res["editing"])
    vals = [res["editing"][m]["background_psnr_db"] for m in names]
    ci = [res["editing"][m]["background_psnr_db_ci95"] or [v, v] for m, v in zip(names, vals, strict=True)]
    err = np.array(
        [[v - lo for v, (lo, _) in zip(vals, ci, strict=True)], [hi - v for v, (_, hi) in zip(vals, ci, strict=True)]]
    )
    axes[0, 0].bar(range(len(names)), vals, yerr=err, capsize=3)
    axes[0, 0].set_xticks(range(len(names)), [n.replace("asymmetric_", "asym ") for n in names], fontsize=6)
    axes[0, 0].set_title("background PSNR (dB)", fontsize=8)
    axes[1, 0].axis("off")
    for j, row in enumerate(shown):
        axes[0, j + 1].imshow(np.concatenate([np.asarray(row[0]), np.asarray(row[1])], 1))
        axes[1, j + 1].imshow(np.concatenate([np.asarray(row[2]), np.asarray(row[3])], 1))
        axes[0, j + 1].set_title("source | vae", fontsize=7)
        axes[1, j + 1].set_title("asym mask | auto", fontsize=7)
    for ax in axes[:, 1:].flat:
        ax.set_xticks([])
        ax.set_yticks([])
    _common.save_figure(fig, path, dpi=110)
