"""What `stablekit bench training` measures of a trained UNet beyond its samples: linear probes of its own
representation on the attribute classifier's labels, and certified robustness under randomized smoothing
("Certified Adversarial Robustness via Randomized Smoothing", Cohen et al., 2019) of two classifiers of noised
latents: a linear head on the UNet's representation of the noised latent (one prediction, as in "Robust
Representation Consistency Model via Contrastive Denoising", 2025) and denoise-then-classify (the UNet's one-step
clean estimate, decoded, judged by the attribute classifier: diffusion denoised smoothing, Carlini et al., 2023).
The smoothing noise is added to the scaled VAE latent, so radii are L2 distances in latent space."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, norm

TASKS = ("background", "shape", "color", "texture")


@dataclass
class ProbeSet:
    """Single-object world scenes as scaled latents, with one class label per task (N,) each."""

    latents: torch.Tensor
    labels: dict


def probe_set(vae, scale: float, n: int, seed: int) -> ProbeSet:
    from stablekit.default_model import train as teacher
    from stablekit.default_model import world

    items = list(world.dataset(n, seed, two_prob=0.0))
    images = torch.from_numpy(np.stack([np.asarray(im) for im, _, _ in items]))
    lab = [world.labels(sc) for _, _, sc in items]
    labels = {k: np.array([x[k] if k == "background" else x[k][0] for x in lab]) for k in TASKS}
    return ProbeSet(teacher.encode_latents(vae, images) * scale, labels)


def sigma_timestep(sched, sigma: float) -> tuple[int, float]:
    """(t, sqrt(alpha_bar_t)) of the timestep whose noise-to-signal ratio is nearest `sigma`: a latent x + sigma*d
    enters the UNet as sqrt(alpha_bar_t) (x + sigma*d)."""
    acp = sched.alphas_cumprod.double()
    t = int(((1 - acp) / acp).sqrt().sub(sigma).abs().argmin())
    return t, float(acp[t].sqrt())


@torch.no_grad()
def features(unet, x: torch.Tensor, t: int, uncond: torch.Tensor, batch: int = 256) -> np.ndarray:
    from stablekit.train.features import encoder_features

    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        out.append(encoder_features(unet, xb, torch.tensor(t), uncond.expand(len(xb), -1, -1)))
    return torch.cat(out).numpy()


def fit_heads(feats: np.ndarray, labels: dict) -> dict:
    """One logistic regression per task on standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        k: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(feats, y) for k, y in labels.items()
    }


def linear_probe(unet, train: ProbeSet, test: ProbeSet, uncond) -> np.ndarray:
    """(N_test, tasks) booleans: the probe's correct answers on clean latents (timestep 0)."""
    heads = fit_heads(features(unet, train.latents, 0, uncond), train.labels)
    f = features(unet, test.latents, 0, uncond)
    return np.stack([heads[k].predict(f) == test.labels[k] for k in TASKS], axis=1)


def representation_classifier(unet, sched, train: ProbeSet, uncond, sigma: float, draws: int = 2, seed: int = 0):
    """A function (noised latents x + sigma*d) -> {task: predicted classes}: linear heads on the UNet's
    representation at sigma's timestep, fitted on `draws` noised copies of the training set."""
    t, a = sigma_timestep(sched, sigma)
    g = torch.Generator().manual_seed(seed)
    x = train.latents.repeat(draws, 1, 1, 1)
    x = x + sigma * torch.randn(x.shape, generator=g)
    heads = fit_heads(features(unet, a * x, t, uncond), {k: np.tile(y, draws) for k, y in train.labels.items()})

    def predict(noised: torch.Tensor) -> dict:
        f = features(unet, a * noised, t, uncond)
        return {k: heads[k].predict(f) for k in TASKS}

    return predict


def denoise_classifier(unet, sched, vae, judge_clf, uncond, sigma: float):
    """A function (noised latents) -> {task: predicted classes}: one UNet step to the clean latent estimate
    (v-prediction, unconditional), decoded by the VAE, classified by the attribute classifier's heads."""
    from stablekit.default_model import classifier as C

    t, a = sigma_timestep(sched, sigma)
    s = (1 - a * a) ** 0.5

    @torch.no_grad()
    def predict(noised: torch.Tensor) -> dict:
        xt = a * noised
        v = unet(xt, torch.tensor(t), uncond.expand(len(xt), -1, -1)).sample
        x0 = (a * xt - s * v) / vae.config.scaling_factor
        images = (vae.decode(x0).sample / 2 + 0.5).clamp(0, 1)
        logits = C.predict_logits(judge_clf, C.to_tensor(images))
        return {k: logits[k].argmax(1).numpy() for k in TASKS}

    return predict


def certify(predict, test: ProbeSet, sigma: float, n0: int, n: int, alpha: float, seed: int = 0) -> dict:
    """Cohen et al.'s CERTIFY per test latent and task: the class most often predicted over `n0` noised copies, a
    one-sided Clopper-Pearson lower bound on its probability over `n` more, radius sigma * Phi^-1(p) (-1: abstain).
    Returns {"correct": (N, tasks) bools, "radius": (N, tasks), "seconds_per_prediction"}."""
    g = torch.Generator().manual_seed(seed)
    correct, radius, t0 = [], [], time.perf_counter()
    for i in range(len(test.latents)):
        x = test.latents[i : i + 1].expand(n0 + n, -1, -1, -1)
        preds = predict(x + sigma * torch.randn(x.shape, generator=g))
        row_c, row_r = [], []
        for k in TASKS:
            top = np.bincount(preds[k][:n0]).argmax()
            hits = int((preds[k][n0:] == top).sum())
            p = beta.ppf(alpha, hits, n - hits + 1) if hits > 0 else 0.0
            row_r.append(sigma * norm.ppf(p) if p > 0.5 else -1.0)
            row_c.append(top == test.labels[k][i])
        correct.append(row_c)
        radius.append(row_r)
    seconds = (time.perf_counter() - t0) / (len(test.latents) * (n0 + n))
    return {"correct": np.array(correct), "radius": np.array(radius), "seconds_per_prediction": seconds}


def certified_at(cert: dict, r: float) -> np.ndarray:
    """(N, tasks) booleans: right and certified at radius `r` or more."""
    return cert["correct"] & (cert["radius"] >= r)
