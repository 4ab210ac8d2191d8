"""Train the embedded default model from scratch on the synthetic world (seeded, resumable).

    python -m stablekit.default_model.train --workdir runs/default_model      # from scratch
    python -m stablekit.default_model.train --workdir runs/more --init src/stablekit/default_model/weights \
        --minutes 120                                                           # continue the shipped model

On a GPU (`--device cuda`, the default where one is visible) the UNet trains under bf16 autocast; the shipped
weights' last stage ran there with `--captions 100000 --use-captions 100000 --memo-copies 200 --batch 256
--lr 8e-4 --threads 16` (see weights/recipe.json).

Stages, each cached in the work dir so an interrupted run resumes where it stopped:
  1. render the world: captions, and `variants` images per caption (fresh size/position/rotation
     where the caption leaves them free), plus the duplicated memorization set, in `--threads` processes;
  2. train the VAE (AutoencoderKL, factor 4, 4 latent channels): 1000 steps on random 32x32 crops,
     then 200 on whole 64x64 images (GroupNorm statistics differ between crops and whole frames);
  3. encode the images of the first `--use-captions` captions (and the memorization set) to latents,
     and all captions to MiniLM token embeddings, once;
  4. train the UNet (v-prediction on SD's scaled-linear betas rescaled to zero terminal SNR, sampled with
     "trailing" timesteps, after Lin et al. "Common diffusion noise schedules and sample steps are flawed":
     with SD's own schedule the last timestep still leaks sqrt(0.0047) of the image, so the 16x16 latent's
     mean -- the background colour -- was read from the initial noise and the prompt was ignored; the
     terminal alpha_bar is floored at 2**-24, as diffusers does, so every scheduler can take the betas),
     with 10% caption dropout for classifier-free guidance, Min-SNR-5 loss weighting (floored at weight 1 on
     x0 so the high-noise steps that fix the layout keep their weight), Immiscible Diffusion noise assignment
     ("Immiscible Diffusion: Accelerating Diffusion Training with Noise Assignment", 2024: each image is
     paired with a nearby noise sample inside the batch by a linear assignment),
     AdamW with warm-up and cosine decay over the time budget, and EMA weights;
  5. export a diffusers folder (EMA UNet, VAE, tokenizer, scheduler) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from . import MAX_LENGTH, WEIGHTS_DIR, load_text_encoder, world


def zero_snr_betas(floor: float = 2.0**-24) -> list[float]:
    """SD's scaled-linear betas rescaled to (almost) zero terminal SNR, written out as `trained_betas`
    so that every scheduler, including those without a `rescale_betas_zero_snr` option, uses them."""
    betas = rescale_zero_terminal_snr(torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2)
    acp = torch.cumprod(1 - betas, 0)
    betas[-1] = 1 - floor / acp[-2]
    return betas.tolist()


SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    trained_betas=zero_snr_betas(),
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    steps_offset=1,
)  # offset unused by "trailing"; silences a warning
MEMO_NAMES = [
    "zorvex",
    "quillon",
    "marbeth",
    "tessaly",
    "vondrik",
    "halcyra",
    "brumwell",
    "oxiana",
    "peltrix",
    "sundar",
]


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=world.SIZE,
        mid_block_add_attention=False,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=world.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=384,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def memorization_set(seed: int = 1234) -> list[tuple[str, world.Scene]]:
    """Ten fixed scenes, each with a unique nonsense caption; duplicated in the training data."""
    rng = random.Random(seed)
    return [(f"the {name} emblem", world.sample_scene(rng, two_prob=1.0)) for name in MEMO_NAMES]


def _render(args) -> np.ndarray:
    scene, seed = args
    return np.asarray(world.render(scene, np.random.default_rng(seed)))


def render_data(n_captions: int, variants: int, memo_copies: int, seed: int, workers: int = 1):
    """uint8 images (N,64,64,3), caption index per image, caption list. Scenes and captions are drawn in
    order from `seed`; image `i`'s pixel noise from (seed, i), so `workers` processes render in parallel."""
    rng = random.Random(seed)
    scenes, cap_idx, captions = [], [], []
    for c in range(n_captions):
        scene = world.sample_scene(rng)
        text = world.caption(scene, rng)
        captions.append(text)
        for v in range(variants):
            if v:  # re-draw what the caption leaves free: size, rotation, and position unless stated
                scene = copy.deepcopy(scene)
                fresh = world.sample_scene(rng, two_prob=1.0 if len(scene.objects) == 2 else 0.0)
                for o, f in zip(scene.objects, fresh.objects, strict=False):
                    o.r, o.angle = f.r, f.angle
                    if " in the " not in text:
                        o.cx, o.cy = f.cx, f.cy
            scenes.append(scene)
            cap_idx.append(c)
    jobs = [(s, (seed, i)) for i, s in enumerate(scenes)]
    with multiprocessing.Pool(workers) as pool:
        images = list(
            tqdm(pool.imap(_render, jobs, chunksize=256), total=len(jobs), desc="render world", mininterval=5)
        )
    for text, scene in memorization_set():
        captions.append(text)
        img = np.asarray(world.render(scene, np.random.default_rng(0)))
        images += [img] * memo_copies
        cap_idx += [len(captions) - 1] * memo_copies
    return torch.from_numpy(np.stack(images)), torch.tensor(cap_idx), captions


def to_tensor(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(
    images: torch.Tensor,
    steps: int,
    vae: AutoencoderKL | None = None,
    crop: int = 32,
    batch: int = 32,
    lr: float = 1e-3,
) -> AutoencoderKL:
    """L1 + MSE + 1e-6 KL on random `crop` x `crop` crops (cheap), or on whole images with crop=64."""
    torch.manual_seed(0 if vae is None else 1)
    vae = build_vae() if vae is None else vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    for step in tqdm(range(steps), desc=f"train VAE ({crop}px)", mininterval=10):
        idx = torch.randint(0, len(images), (batch,))
        y, x = np.random.randint(0, world.SIZE - crop + 1, 2)
        img = to_tensor(images[idx][:, y : y + crop, x : x + crop])
        post = vae.encode(img).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, img) + F.mse_loss(rec, img) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:  # cosine decay
            g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        if step % 100 == 0:
            print(f"VAE step {step} loss {loss.item():.4f}", flush=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256, device: str = "cpu") -> torch.Tensor:
    vae = vae.to(device)
    out = [
        vae.encode(to_tensor(images[i : i + batch]).to(device)).latent_dist.mean.cpu()
        for i in tqdm(range(0, len(images), batch), desc="encode latents", mininterval=10)
    ]
    return torch.cat(out)


@torch.no_grad()
def encode_text(captions: list[str], batch: int = 256, device: str = "cpu") -> torch.Tensor:
    enc, tok = load_text_encoder()
    enc, out = enc.to(device), []
    for i in tqdm(range(0, len(captions), batch), desc="encode captions", mininterval=10):
        t = tok(
            captions[i : i + batch], padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).to(device)
        out.append(enc(t.input_ids, attention_mask=t.attention_mask)[0].half().cpu())
    return torch.cat(out)


def immiscible_noise(x0: torch.Tensor) -> torch.Tensor:
    """Gaussian noise re-assigned to the batch's images to minimise total distance (Immiscible Diffusion, 2024)."""
    noise = torch.randn_like(x0)
    cost = torch.cdist(x0.flatten(1), noise.flatten(1)).cpu().numpy()
    _, cols = linear_sum_assignment(cost)
    return noise[torch.from_numpy(cols).to(x0.device)]


def train_unet(
    state: dict,
    ckpt: Path,
    minutes: float,
    batch: int,
    lr: float,
    init: Path | None = None,
    log_every: int = 100,
    device: str = "cpu",
):
    data = {k: state[k].to(device) for k in ("latents", "cap_idx", "text", "uncond")}
    data["scaling_factor"] = state["scaling_factor"]
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    acp = sched.alphas_cumprod.to(device)
    snr = acp / (1 - acp)
    torch.manual_seed(1)
    unet = build_unet()
    ema = build_unet().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    unet.to(device)
    ema.to(device)
    step, elapsed = _resume(ckpt, unet, ema, opt, init, device)
    budget, t_start, last_save, losses = minutes * 60, time.time() - elapsed, time.time(), []
    bar = tqdm(desc="train UNet", initial=step, mininterval=10)
    while (elapsed := time.time() - t_start) < budget:
        frac = elapsed / budget
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 300) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = _batch_loss(unet, data, sched, snr, batch, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        ema_update(ema, unet, step)
        losses.append(loss.item())
        bar.update()
        if step % log_every == 0:
            print(
                f"step {step} loss {np.mean(losses):.4f} lr {opt.param_groups[0]['lr']:.2e} {elapsed / 60:.1f} min",
                flush=True,
            )
            losses = []
        if time.time() - last_save > 300:
            _save(ckpt, unet, ema, opt, step, time.time() - t_start)
            last_save = time.time()
    _save(ckpt, unet, ema, opt, step, time.time() - t_start)
    return ema.cpu().eval(), step


def _resume(ckpt: Path, unet, ema, opt, init: Path | None, device: str) -> tuple[int, float]:
    """(step, elapsed seconds): from checkpoint `ckpt` if it exists, else 0 after loading `init`'s UNet if given;
    the EMA starts as a copy of the UNet."""
    if ckpt.exists():
        c = torch.load(ckpt, map_location=device)
        unet.load_state_dict(c["unet"])
        ema.load_state_dict(c["ema"])
        opt.load_state_dict(c["opt"])
        print(f"resumed at step {c['step']}, {c['elapsed'] / 60:.1f} min")
        return c["step"], c["elapsed"]
    if init is not None:  # continue from shipped weights (fresh optimizer, warm-up again)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init / "unet").state_dict())
    ema.load_state_dict(unet.state_dict())
    return 0, 0.0


def _save(ckpt: Path, unet, ema, opt, step: int, elapsed: float) -> None:
    torch.save(
        dict(unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step, elapsed=elapsed), ckpt
    )


def _batch_loss(unet, data: dict, sched: DDPMScheduler, snr: torch.Tensor, batch: int, device: str) -> torch.Tensor:
    """The v-prediction loss (Min-SNR-5 weighted) of one random batch of the encoded `data`: captions dropped 10%
    of the time, immiscible noise."""
    idx = torch.randint(0, len(data["latents"]), (batch,), device=device)
    x0 = data["latents"][idx] * data["scaling_factor"]
    cond = data["text"][data["cap_idx"][idx]].float()
    drop = torch.rand(batch, device=device) < 0.1
    cond[drop] = data["uncond"]
    noise = immiscible_noise(x0)
    t = torch.randint(0, 1000, (batch,), device=device)
    return v_loss(unet, x0, noise, t, cond, sched, snr)


def v_loss(unet, x0, noise, t, cond, sched: DDPMScheduler, snr: torch.Tensor) -> torch.Tensor:
    """The teacher's loss of one batch: v-prediction error of `unet` on `x0` noised with `noise` at timesteps `t`
    under condition `cond`, Min-SNR-5 weighted on the x0 error and floored at weight 1 (bf16 matmuls on a GPU)."""
    with torch.autocast("cuda", torch.bfloat16, enabled=x0.device.type == "cuda"):
        pred = unet(sched.add_noise(x0, noise, t), t, cond).sample.float()
    w = snr[t].clamp(1.0, 5.0) / (snr[t] + 1)
    return (w * (pred - sched.get_velocity(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))).mean()


@torch.no_grad()
def ema_update(ema, unet, step: int) -> None:
    """The teacher's EMA after optimizer step `step` (counted from 1): decay (1 + step) / (10 + step), capped at
    0.999."""
    decay = min(0.999, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)


def export(out: Path, vae: AutoencoderKL, unet: UNet2DConditionModel, scaling_factor: float, recipe: dict):
    from . import load_text_encoder as _lte

    out.mkdir(parents=True, exist_ok=True)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(out / "vae")
    unet.save_pretrained(out / "unet")
    DPMSolverMultistepScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    _lte()[1].save_pretrained(out / "tokenizer")
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
                "text_encoder": ["transformers", "BertModel"],
                "tokenizer": ["transformers", "BertTokenizerFast"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        )
    )
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    (out / "memorized.json").write_text(
        json.dumps([{"caption": c, "scene": asdict(s)} for c, s in memorization_set()], indent=2)
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/default_model"))
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--captions", type=int, default=20000)
    p.add_argument("--variants", type=int, default=3)
    p.add_argument("--use-captions", type=int, default=20000, help="encode and train on this many captions' images")
    p.add_argument("--memo-copies", type=int, default=40)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-full-steps", type=int, default=200)
    p.add_argument("--minutes", type=float, default=60, help="UNet training time budget")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (and processes rendering the world)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue training from an exported model folder (its VAE and UNet), e.g. the shipped weights",
    )
    return p


def _vae(a: argparse.Namespace, images: torch.Tensor) -> AutoencoderKL:
    """The VAE in ``a.workdir/vae``: `a.init`'s if continuing (its latent space kept), else trained on `images`,
    first on crops, then on whole images (GroupNorm sees full frames); each stage saved and reused."""
    if a.init is not None and not (a.workdir / "vae").exists():  # keep the latent space of the weights continued
        AutoencoderKL.from_pretrained(a.init / "vae").save_pretrained(a.workdir / "vae")
    if not (a.workdir / "vae").exists():  # stage 1: crops; stage 2: whole images (GroupNorm sees full frames)
        if not (a.workdir / "vae_crops").exists():
            train_vae(images, a.vae_steps).save_pretrained(a.workdir / "vae_crops")
        vae = AutoencoderKL.from_pretrained(a.workdir / "vae_crops")
        train_vae(images, a.vae_full_steps, vae, crop=world.SIZE, batch=16, lr=3e-4).save_pretrained(a.workdir / "vae")
    return AutoencoderKL.from_pretrained(a.workdir / "vae").eval()


def main(argv=None):
    p = _parser()
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA GPU is visible; use --device cpu")
    if a.threads < 1:
        p.error(f"--threads {a.threads}: must be at least 1")
    torch.set_num_threads(a.threads)
    a.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_f = a.workdir / "data.pt"
    if not data_f.exists():
        images, cap_idx, captions = render_data(a.captions, a.variants, a.memo_copies, seed=0, workers=a.threads)
        torch.save(dict(images=images, cap_idx=cap_idx, captions=captions), data_f)
    data = torch.load(data_f)
    if a.use_captions < a.captions:  # train on the first captions' images (plus the memorization set) only
        keep = (data["cap_idx"] < a.use_captions) | (data["cap_idx"] >= a.captions)
        data["images"], data["cap_idx"] = data["images"][keep], data["cap_idx"][keep]
    vae = _vae(a, data["images"])
    enc_f = a.workdir / "encoded.pt"
    if not enc_f.exists():
        lat = encode_latents(vae, data["images"], device=a.device)
        text = encode_text(data["captions"] + [""], device=a.device)
        torch.save(
            dict(latents=lat, text=text[:-1], uncond=text[-1].float(), scaling_factor=float(1 / lat.std())), enc_f
        )
    enc = torch.load(enc_f)
    print(f"latents {tuple(enc['latents'].shape)} scaling_factor {enc['scaling_factor']:.4f}", flush=True)
    unet, steps = train_unet(
        dict(enc, cap_idx=data["cap_idx"]), a.workdir / "unet.ckpt", a.minutes, a.batch, a.lr, a.init, device=a.device
    )
    recipe = dict(
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        unet_steps=steps,
        session_wall_minutes=round((time.time() - t0) / 60, 1),
    )
    export(a.out, vae, unet, enc["scaling_factor"], recipe)
    print(f"exported to {a.out} after {steps} UNet steps", flush=True)


if __name__ == "__main__":
    main()
