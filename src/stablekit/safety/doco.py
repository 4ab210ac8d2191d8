"""DoCo, concept domain correction ("Unlearning Concepts in Diffusion Model via Concept Domain Correction and Concept
Preserving Gradient", AAAI 2025; reference code yongliang-wu/DoCo): the UNet's cross-attention keys and values
fine-tuned so that what the model makes of a concept's prompts cannot be told from what it makes of an anchor
concept's, by an adversarial discriminator, with the update kept from fighting a preservation loss.

    edit = DoCo.train(pipe, "red", anchor="orange", prompts=[...], retain=[...])   # minutes on the default model
    edit.save("no-red.safetensors"); edit = DoCo.load("no-red.safetensors")         # `generate --adapter` reads it
    with stablekit.use(pipe, edit):
        image = pipe("a crimson star on a gray background").images[0]

Implemented as in the reference (``train.py``, ``DoCo/gan.py``, ``DoCo/gradient_clip.py``):

* trained: a weight delta on every text cross-attention ``to_k`` and ``to_v`` (its "cross-attn" parameter group);
  the start token's keys and values pass no gradient (the reference's attention processor detaches them);
* data: anchor prompts are the concept prompts with the concept word replaced by the anchor; their images are the
  frozen model's own generations ("class images"), noised at a uniform timestep ``t``;
* domain correction: at the same noisy anchor latent, the predicted clean latent ``x0`` of the model being trained
  for the concept prompt ("fake") and of the frozen model for the anchor prompt ("real") go to a PatchGAN
  discriminator on latents, trained with binary cross-entropy (Adam, betas 0.5 / 0.999); after ``warmup``
  discriminator-only iterations the deltas are trained so that the discriminator calls the fake real;
* concept-preserving gradient: per trained tensor, where the unlearning gradient ``g`` and the preservation
  gradient ``p`` conflict (``<g, p> < 0``), ``g <- g - scale <g, p> / |p|^2 p`` (:func:`preserve_gradient`);
  both gradients are first clipped to norm ``max_grad_norm`` (the reference's clipping before its surgery);
* AdamW on the deltas at ``lr``, discriminator at ``dlr``; defaults: ``scale`` 1 (the reference's ``lambda_``),
  ``max_grad_norm`` 1, ``dlr`` 1e-4 (its object and nudity runs).

Deviations:
1. The surgery is the exact projection above; the reference subtracts ``scale * cos(g, p) * p / |p|``, which
   removes the whole conflicting component only when ``|g| = 1``.
2. The preservation loss is the distance of the trained model's prediction from the frozen model's on retain
   prompts at their own generations (a distillation), not the denoising loss on the anchor images; the projected
   gradient is applied with ``retain_weight`` (5) times the preservation gradient added. The reference adds none
   when its surgery is on; 0 reproduces that, and on the embedded model it let the change spread to the other
   colours (benchmarks/RESULTS.md, "Robust erasure: DoCo").
3. The discriminator is a three-layer PatchGAN (64 and 128 channels, 4x4 patches on a 16x16 latent): the
   reference's four stride-2 blocks of up to 512 channels need 64x64 latents.
4. Sizes for minutes on a CPU: ``iterations`` 300 (the reference's 2000), ``warmup`` a sixth of them (half),
   batch 4 (8), ``lr`` 1e-3 (6e-6 times the batch: far fewer steps, and a 16x16 latent's small weights), the anchor
   and retain images from ``ref_steps`` 20 steps of the pipeline's own sampler (the reference's 25 DPM-Solver
   steps).
5. Prompts: the concept's own captions (the world's, on the default model) replace the reference's LLM-written
   captions; the anchor is one word swapped for the concept's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..errors import StablekitError
from ..pipeline import frozen
from ..plugins import settle, weight_norms
from ..text import encode_ids, token_ids
from .advunlearn import replace_word
from .concept_edit import ConceptEdit
from .safree import concept_words
from .templates import TEMPLATES, training_prompts

# retain objects for a model without its own world (as AdvUnlearn's)
RETAIN_OBJECTS = ("person", "dog", "cat", "car", "chair", "bird", "bottle", "tree", "boat", "house")


@dataclass(frozen=True)
class DoCoConfig:
    """The parameters of :class:`DoCo` (see the module docstring)."""

    concepts: tuple[str, ...]
    anchor: str = ""
    iterations: int = 300
    warmup: int | None = None
    lr: float = 1e-3
    dlr: float = 1e-4
    batch: int = 4
    scale: float = 1.0
    surgery: bool = True
    retain_weight: float = 5.0
    max_grad_norm: float = 1.0
    ref_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        settle(self, concepts=concept_words(self.concepts, "DoCo"))
        if len(self.concepts) != 1:
            raise StablekitError("DoCo erases one concept per adapter (combine adapters for several)")
        if not isinstance(self.anchor, str) or self.anchor.strip().lower() == self.concepts[0].strip().lower():
            raise StablekitError("DoCo's anchor must be a concept other than the erased one (or '' for none)")
        ints = ("iterations", "batch", "ref_steps")
        if any(isinstance(getattr(self, k), bool) or int(getattr(self, k)) < 1 for k in ints):
            raise StablekitError(f"DoCo: {', '.join(ints)} must be whole numbers >= 1")
        settle(self, warmup=self.iterations // 6 if self.warmup is None else self.warmup)
        if not 0 <= self.warmup < self.iterations:
            raise StablekitError("DoCo: warmup must be >= 0 and below iterations")
        if self.lr <= 0 or self.dlr <= 0 or self.max_grad_norm <= 0 or self.scale < 0 or self.retain_weight < 0:
            raise StablekitError("DoCo: lr, dlr, max_grad_norm > 0 and scale, retain_weight >= 0")


def cross_attention_kv(unet) -> dict[str, nn.Linear]:
    """``{"unet.<module>.to_k": layer, ...}``: the key and value projections of text cross-attention."""
    return {
        f"unet.{name}.{proj}": getattr(m, proj)
        for name, m in unet.named_modules()
        if isinstance(m, Attention) and m.is_cross_attention
        for proj in ("to_k", "to_v")
    }


def preserve_gradient(grad: torch.Tensor, keep: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`grad` with its component against `keep` removed (times `scale`) where the two conflict (``<grad, keep> <
    0``), else `grad` unchanged: the concept-preserving gradient surgery."""
    dot = torch.dot(grad.flatten().double(), keep.flatten().double())
    norm2 = torch.dot(keep.flatten().double(), keep.flatten().double())
    if dot >= 0 or norm2 == 0:
        return grad
    return grad - (scale * dot / norm2).to(grad.dtype) * keep


def discriminator(channels: int) -> nn.Module:
    """A PatchGAN on latents: two stride-2 blocks and a 3x3 logit per patch."""
    return nn.Sequential(
        nn.Conv2d(channels, 64, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(64, 128, 4, stride=2, padding=1),
        nn.BatchNorm2d(128),
        nn.LeakyReLU(0.2),
        nn.Conv2d(128, 1, 3, padding=1),
    )


def predicted_x0(sch, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent a prediction of kind ``sch.config.prediction_type`` implies at `xt`, timestep `t`."""
    a = sch.alphas_cumprod.to(xt)[t].view(-1, 1, 1, 1)
    kind = sch.config.prediction_type
    if kind == "v_prediction":
        return a.sqrt() * xt - (1 - a).sqrt() * pred
    if kind == "epsilon":
        return (xt - (1 - a).sqrt() * pred) / a.sqrt()
    return pred


class DoCo(ConceptEdit):
    """A concept erased from the UNet's cross-attention; ``DoCo.train(pipe, concept, anchor=...)`` makes one,
    ``DoCo.load`` reads one. ``DoCo(concepts, deltas, meta=None, **params)``: `deltas` ``{"unet.<layer>.weight":
    tensor}``."""

    name = "doco"
    Config = DoCoConfig

    title = "DoCo"

    @classmethod
    def train(
        cls, pipe, concept: str, anchor: str = "", prompts=None, retain=None, cache=None, progress=True, **params
    ):
        """Train an adapter erasing `concept` from `pipe`'s UNet toward `anchor`. `prompts`: training prompts that
        contain the concept word (default: generic templates of it); `retain`: prompts whose generations must not
        change (default: templates of common objects). `cache`: a folder where the anchor and retain images and
        checkpoints are kept, so that a stopped run resumes."""
        cfg = DoCoConfig(concepts=(concept,), anchor=anchor, **params)
        prompts = training_prompts(prompts, concept, "DoCo")
        retain = list(retain or [t.format(o) for o in RETAIN_OBJECTS for t in TEMPLATES[2:4]])
        if not retain:
            raise StablekitError("DoCo needs retain prompts")
        return _Trainer(pipe, cfg, prompts, retain, cache).run(progress)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _save(value, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)


class _Deltas:
    """Trainable weight deltas on linear layers, added to their outputs by forward hooks (``on`` False: the frozen
    model); the first token's contribution passes no gradient."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.layers, self.on, self.handles = layers, True, []
        self.tensors = {n: torch.zeros_like(m.weight, requires_grad=True) for n, m in layers.items()}

    def _hook(self, name: str):
        def add(module, inputs, out):
            if not self.on:
                return out
            d = nn.functional.linear(inputs[0], self.tensors[name])
            return out + torch.cat([d[:, :1].detach(), d[:, 1:]], dim=1)

        return add

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


class _Trainer:
    """The training loop of :meth:`DoCo.train`, with its stages cached in `cache`."""

    def __init__(self, pipe, cfg: DoCoConfig, prompts: list[str], retain: list[str], cache):
        from ..latents import noise_scheduler

        self.pipe, self.cfg, self.prompts, self.retain = pipe, cfg, prompts, retain
        self.sch = noise_scheduler(pipe)
        self.layers = cross_attention_kv(pipe.unet)
        self.anchors = [replace_word(p, cfg.concepts[0], cfg.anchor) for p in prompts]
        norms = weight_norms(pipe, [f"{n}.weight" for n in self.layers])
        inputs = [self.anchors, retain, cfg.seed, cfg.ref_steps, norms]
        self.cache = Path(cache) / f"doco-{_digest(inputs)}" if cache else None
        self.ckpt = self.cache / _digest([prompts, dataclasses.asdict(cfg)]) / "checkpoint.pt" if cache else None

    @torch.no_grad()
    def references(self) -> dict:
        """The frozen model's latents for the anchor and retain prompts, and every prompt's embeddings."""
        from ..pipeline import guidance_rescale

        path = self.cache / "references.pt" if self.cache else None
        if path is not None and path.exists():
            return torch.load(path, weights_only=True)
        out = {}
        for key, texts in (("anchor", self.anchors), ("retain", self.retain)):
            gens = [torch.Generator("cpu").manual_seed(self.cfg.seed * 100_000 + i) for i in range(len(texts))]
            kw = dict(num_inference_steps=self.cfg.ref_steps, guidance_rescale=guidance_rescale(self.pipe))
            out[key] = self.pipe(texts, generator=gens, output_type="latent", **kw).images.float().cpu()
        for key, texts in (("e_concept", self.prompts), ("e_anchor", self.anchors), ("e_retain", self.retain)):
            out[key] = encode_ids(self.pipe, [token_ids(self.pipe, t) for t in texts]).float().cpu()
        if path is not None:
            _save(out, path)
        return out

    def run(self, progress: bool) -> DoCo:
        from tqdm.auto import tqdm

        cfg, pipe = self.cfg, self.pipe
        ref = self.references()
        torch.manual_seed(cfg.seed)
        deltas = _Deltas(self.layers)
        disc = discriminator(ref["anchor"].shape[1]).to(ref["anchor"])
        opt = torch.optim.AdamW(list(deltas.tensors.values()), lr=cfg.lr)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.dlr, betas=(0.5, 0.999))
        start = self._resume(deltas, disc, opt, opt_d)
        bar = tqdm(
            range(start, cfg.iterations), desc=f"train DoCo '{cfg.concepts[0]}'", disable=None if progress else True
        )
        with frozen(pipe.unet, pipe.text_encoder), deltas:
            for i in bar:
                logs = self.step(i, ref, deltas, disc, opt, opt_d)
                bar.set_postfix(logs, refresh=False)
                if self.ckpt is not None and ((i + 1) % 50 == 0 or i + 1 == cfg.iterations):
                    state = {"done": i + 1, "deltas": deltas.tensors, "disc": disc.state_dict()}
                    _save(state | {"opt": opt.state_dict(), "opt_d": opt_d.state_dict()}, self.ckpt)
        tensors = {f"{n}.weight": d.detach().float().cpu().clone() for n, d in deltas.tensors.items()}
        meta = {"base_norms": json.dumps(weight_norms(pipe, list(tensors)))}
        params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "concepts"}
        return DoCo(cfg.concepts, tensors, meta, **params)

    def _resume(self, deltas: _Deltas, disc, opt, opt_d) -> int:
        if self.ckpt is None or not self.ckpt.exists():
            return 0
        saved = torch.load(self.ckpt, weights_only=False)
        with torch.no_grad():
            for n, t in deltas.tensors.items():
                t.copy_(saved["deltas"][n])
        disc.load_state_dict(saved["disc"])
        opt.load_state_dict(saved["opt"])
        opt_d.load_state_dict(saved["opt_d"])
        return saved["done"]

    def noised(self, x0: torch.Tensor, g: torch.Generator):
        t = torch.randint(self.sch.config.num_train_timesteps, (x0.shape[0],), generator=g)
        return self.sch.add_noise(x0, torch.randn(x0.shape, generator=g), t), t

    def step(self, i: int, ref: dict, deltas: _Deltas, disc, opt, opt_d) -> dict:
        """Iteration `i`: after the warm-up a (projected) update of the deltas, then one discriminator update."""
        cfg, unet = self.cfg, self.pipe.unet
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        rng = random.Random(cfg.seed * 1_000_003 + i)
        idx = rng.sample(range(len(self.prompts)), min(cfg.batch, len(self.prompts)))
        xt, t = self.noised(ref["anchor"][idx], g)
        with torch.no_grad():
            deltas.on = False
            real = predicted_x0(self.sch, xt, unet(xt, t, ref["e_anchor"][idx]).sample, t)
            deltas.on = True
        fake = predicted_x0(self.sch, xt, unet(xt, t, ref["e_concept"][idx]).sample, t)
        logs = {}
        if i >= cfg.warmup:
            logs = self.generator_step(fake, ref, deltas, disc, opt, g, rng)
        bce = nn.functional.binary_cross_entropy_with_logits
        d_real, d_fake = disc(real), disc(fake.detach())
        loss_d = bce(d_real, torch.zeros_like(d_real)) + bce(d_fake, torch.ones_like(d_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        return logs | {"d": f"{loss_d.item():.3f}"}

    def generator_step(self, fake, ref: dict, deltas: _Deltas, disc, opt, g, rng) -> dict:
        """The deltas' update: the adversarial gradient (fake called real, label 0), projected off the preservation
        gradient where they conflict, plus ``retain_weight`` times the preservation gradient."""
        cfg, params = self.cfg, list(deltas.tensors.values())
        out = disc(fake)
        loss_g = nn.functional.binary_cross_entropy_with_logits(out, torch.zeros_like(out))
        grads = _clipped(torch.autograd.grad(loss_g, params), cfg.max_grad_norm)
        idx = rng.sample(range(len(self.retain)), min(cfg.batch, len(self.retain)))
        xr, tr = self.noised(ref["retain"][idx], g)
        with torch.no_grad():
            deltas.on = False
            want = self.pipe.unet(xr, tr, ref["e_retain"][idx]).sample
            deltas.on = True
        loss_p = nn.functional.mse_loss(self.pipe.unet(xr, tr, ref["e_retain"][idx]).sample, want)
        keep = _clipped(torch.autograd.grad(loss_p, params), cfg.max_grad_norm)
        opt.zero_grad(set_to_none=True)
        for p, gu, gp in zip(params, grads, keep, strict=True):
            gu = preserve_gradient(gu, gp, cfg.scale) if cfg.surgery else gu
            p.grad = gu + cfg.retain_weight * gp
        opt.step()
        return {"adv": f"{loss_g.item():.3f}", "keep": f"{loss_p.item():.2e}"}


def _clipped(grads, max_norm: float) -> list[torch.Tensor]:
    """The gradients scaled together to a total norm of at most `max_norm`."""
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    factor = min(1.0, max_norm / (float(total) + 1e-6))
    return [g * factor for g in grads]
