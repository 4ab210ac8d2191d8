"""AdvUnlearn ("Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models",
2024; reference code OPTML-Group/AdvUnlearn): concept erasure in the text encoder, trained against prompt attacks.

    edit = AdvUnlearn.train(pipe, "red", prompts=[...], retain=[...])   # minutes on the default model
    edit.save("no-red.safetensors"); edit = AdvUnlearn.load("no-red.safetensors")
    with stablekit.use(pipe, edit):             # any pipeline with this text encoder; the UNet is untouched
        image = pipe("a crimson star on a gray background").images[0]

Implemented: bi-level adversarial training of the text encoder with the UNet frozen. The inner step is an
attack on the current encoder: free input-embedding slots (word-embedding space) in the concept prompt, updated
by ``attack_steps`` signed-gradient (PGD) steps of size ``attack_lr`` so that the UNet, conditioned on the
attacked prompt, predicts the diffusion target of the concept image (the undefended model's own generation for
the prompt, noised at a random timestep), starting from the previous attack's slots ("latest" initialisation).
The outer step trains the encoder with the ESD erasure loss on the attacked prompt, ``|eps(x_t, E(c_adv)) -
[eps0(x_t, s) - eta (eps0(x_t, c) - eps0(x_t, s))]|^2`` (``eps0`` with the original encoder, ``s`` the prompt with
the concept word replaced by the surrogate), plus ``retain_weight`` times the utility-retaining loss
``|eps(x_t, E(r)) - eps0(x_t, r)|^2`` on a batch of retain prompts at their own images. The trained encoder change
is a :class:`~stablekit.plugins.WeightEdit` on the text encoder's weights, saved as its low-rank factors with the
norms of the weights it was made from (attaching it to another encoder is refused).

Defaults after the reference (``train-scripts/AdvUnlearn.py``): one adversarial prefix token, attack in the
word-embedding space with "latest" initialisation, the adversarial prompt refreshed every iteration after a
warm-up, negative guidance ``eta = 1``, retain batch 5, every transformer layer trained ("text_encoder_full").

Deviations:
1. The encoder change is a rank-``rank`` LoRA on every linear layer of the encoder's transformer (merged into a
   weight delta when attached), trained with Adam at ``lr`` 1e-3, instead of full fine-tuning at 1e-5, so the
   adapter is small.
2. Besides the prefix slots, the attack replaces the concept word's own tokens by free slots (the reference's
   ``replace_k`` attack type), initialised at random vocabulary tokens: the adversary searches for any word that
   still brings the concept back, which is what synonyms do. Each outer step trains on the clean and the attacked
   prompt together.
3. The erasure anchor is the prompt with the concept word replaced by ``surrogate`` ("" by default, the word
   deleted), not the empty prompt, so that the rest of a caption survives; for a bidirectional encoder the word
   is erased in context (the training prompts contain it), as for SPM.
4. ``x_t`` is the concept image (the undefended model's generation for the prompt, ``ref_steps`` steps) noised at
   a uniform timestep, rather than a partial DDIM sample of the model being trained; ``attack_steps`` 3 (the
   reference's 30), ``iterations`` 200 (1000) and warm-up 40 (200), to fit minutes on a CPU.
5. ``retain_weight`` 40 (the reference's 1; its nudity script uses 0.3): at 1 the change spread to the other colours
   of the embedded model's world (benchmarks/RESULTS.md, "Robust erasure"); ``attack_lr`` 1e-2 (the reference's
   1e-3, set for CLIP's word embeddings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import StablekitError
from ..pipeline import frozen
from ..plugins import WeightEdit, settle, weight_norms
from ..text import encode_ids, token_ids
from .safree import concept_words
from .templates import TEMPLATES, training_prompts

# the reference's retain prompts are COCO object captions; these stand in for a model without its own world
RETAIN_OBJECTS = ("person", "dog", "cat", "car", "chair", "bird", "bottle", "tree", "boat", "house")


@dataclass(frozen=True)
class AdvUnlearnConfig:
    """The parameters of :class:`AdvUnlearn` (see the module docstring)."""

    concepts: tuple[str, ...]
    surrogate: str = ""
    rank: int = 4
    iterations: int = 200
    lr: float = 1e-3
    eta: float = 1.0
    retain_weight: float = 40.0
    retain_batch: int = 5
    attack_tokens: int = 1
    attack_steps: int = 3
    attack_lr: float = 1e-2
    warmup: int = 40
    ref_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        settle(self, concepts=concept_words(self.concepts, "AdvUnlearn"))
        if len(self.concepts) != 1:
            raise StablekitError("AdvUnlearn erases one concept per adapter (combine adapters for several)")
        ints = ("rank", "iterations", "retain_batch", "attack_steps", "ref_steps")
        if any(isinstance(getattr(self, k), bool) or int(getattr(self, k)) < 1 for k in ints):
            raise StablekitError(f"AdvUnlearn: {', '.join(ints)} must be whole numbers >= 1")
        if self.attack_tokens < 0 or self.warmup < 0 or self.lr <= 0 or self.attack_lr <= 0 or self.eta < 0:
            raise StablekitError("AdvUnlearn: attack_tokens, warmup, eta >= 0 and lr, attack_lr > 0")
        if self.retain_weight < 0:
            raise StablekitError("AdvUnlearn: retain_weight must be >= 0")


def encoder_linears(text_encoder: nn.Module) -> dict[str, nn.Linear]:
    """``{"<name>": module}``: the linear layers of the encoder's transformer (poolers and projections left out)."""
    return {
        n: m
        for n, m in text_encoder.named_modules()
        if isinstance(m, nn.Linear) and "pooler" not in n and "projection" not in n
    }


def replace_word(text: str, word: str, new: str) -> str:
    """`text` with every whole-word `word` (any case) replaced by `new`, spaces tidied."""
    return " ".join(re.sub(rf"\b{re.escape(word)}\b", new, text, flags=re.IGNORECASE).split())


class _LoRA:
    """Low-rank factors on linear layers, added to their outputs by forward hooks while training."""

    def __init__(self, linears: dict[str, nn.Linear], rank: int, generator: torch.Generator):
        self.linears, self.factors, self.handles = linears, {}, []
        for name, m in linears.items():
            down = torch.randn(rank, m.in_features, generator=generator) / m.in_features**0.5
            up = torch.zeros(m.out_features, rank)
            self.factors[name] = (down.to(m.weight).requires_grad_(True), up.to(m.weight).requires_grad_(True))

    def params(self) -> list[torch.Tensor]:
        return [t for pair in self.factors.values() for t in pair]

    def __enter__(self):
        for name, m in self.linears.items():
            down, up = self.factors[name]
            self.handles.append(m.register_forward_hook(lambda mod, i, out, d=down, u=up: out + i[0] @ d.T @ u.T))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


class AdvUnlearn(WeightEdit):
    """A robust text-encoder erasure; ``AdvUnlearn.train(pipe, concept, ...)`` makes one, ``AdvUnlearn.load``
    reads one. ``AdvUnlearn(concepts, factors, meta=None, **params)``: `factors` ``{"text_encoder.<layer>":
    (down, up)}``."""

    name = "advunlearn"
    Config = AdvUnlearnConfig

    def __init__(self, concepts, factors: dict, meta: dict | None = None, **params):
        super().__init__({}, meta, concepts, **params)
        self.factors = factors
        self.deltas = {f"{n}.weight": (up.float() @ down.float()) for n, (down, up) in factors.items()}
        self.meta |= {"method": "advunlearn", "params": json.dumps(dataclasses.asdict(self.config))}

    def save(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {
            f"{n}.{k}": t.detach().float().contiguous().cpu()
            for n, pair in self.factors.items()
            for k, t in zip(("down", "up"), pair, strict=True)
        }
        save_file(tensors, str(path), metadata=self.meta)

    @classmethod
    def load(cls, path) -> AdvUnlearn:
        edit = WeightEdit.load(path)
        if edit.meta.get("method") != "advunlearn" or "base_norms" not in edit.meta:
            raise StablekitError(f"'{path}' is not an AdvUnlearn adapter")
        factors = {}
        for key, t in edit.deltas.items():
            name, kind = key.rsplit(".", 1)
            factors.setdefault(name, {})[kind] = t
        params = json.loads(edit.meta["params"])
        return cls(params.pop("concepts"), {n: (f["down"], f["up"]) for n, f in factors.items()}, edit.meta, **params)

    @classmethod
    def train(cls, pipe, concept: str, prompts=None, retain=None, cache=None, progress: bool = True, **params):
        """Train an adapter erasing `concept` from `pipe`'s text encoder. `prompts`: training prompts that contain
        the concept word (default: generic templates of it); `retain`: prompts whose generations must not change
        (default: templates of common objects). `cache`: a folder where the reference images and checkpoints are
        kept, so that a stopped run resumes."""
        cfg = AdvUnlearnConfig(concepts=(concept,), **params)
        prompts = training_prompts(prompts, concept, "AdvUnlearn")
        retain = list(retain or [t.format(o) for o in RETAIN_OBJECTS for t in TEMPLATES[2:4]])
        if not retain:
            raise StablekitError("AdvUnlearn needs retain prompts")
        return _Trainer(pipe, cfg, prompts, retain, cache).run(progress)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class _Trainer:
    """The training loop of :meth:`AdvUnlearn.train`, with its stages cached in `cache`."""

    def __init__(self, pipe, cfg: AdvUnlearnConfig, prompts: list[str], retain: list[str], cache):
        from ..latents import noise_scheduler

        self.pipe, self.cfg, self.prompts, self.retain = pipe, cfg, prompts, retain
        self.sch = noise_scheduler(pipe)
        self.linears = {f"text_encoder.{n}": m for n, m in encoder_linears(pipe.text_encoder).items()}
        self.word = cfg.concepts[0]
        norms = weight_norms(pipe, self.weights())
        inputs = [prompts, retain, self.word, cfg.surrogate, cfg.seed, cfg.ref_steps, norms]
        self.cache = Path(cache) / f"advunlearn-{_digest(inputs)}" if cache else None  # the reference images
        self.run_cache = self.cache / _digest(dataclasses.asdict(cfg)) if cache else None  # this run's checkpoints

    def weights(self) -> list[str]:
        return [f"{n}.weight" for n in self.linears]

    def cached(self, name: str, make):
        path = self.cache / name if self.cache else None
        if path is not None and path.exists():
            return torch.load(path, weights_only=True)
        value = make()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(value, str(path) + ".tmp")
            Path(str(path) + ".tmp").replace(path)
        return value

    @torch.no_grad()
    def references(self) -> dict:
        """The undefended model's latents for every prompt, and the original encoder's embeddings."""
        from ..pipeline import guidance_rescale

        anchors = [replace_word(p, self.word, self.cfg.surrogate) for p in self.prompts]
        out = {}
        for key, texts in (("concept", self.prompts), ("retain", self.retain)):
            gens = [torch.Generator("cpu").manual_seed(self.cfg.seed * 100_000 + i) for i in range(len(texts))]
            kw = dict(num_inference_steps=self.cfg.ref_steps, guidance_rescale=guidance_rescale(self.pipe))
            out[key] = self.pipe(texts, generator=gens, output_type="latent", **kw).images.float().cpu()
        for key, texts in (("e_concept", self.prompts), ("e_anchor", anchors), ("e_retain", self.retain)):
            out[key] = encode_ids(self.pipe, [token_ids(self.pipe, t) for t in texts]).float().cpu()
        return out

    def run(self, progress: bool) -> AdvUnlearn:
        from tqdm.auto import tqdm

        cfg, pipe = self.cfg, self.pipe
        ref = self.cached("references.pt", self.references)
        g = torch.Generator().manual_seed(cfg.seed)
        lora = _LoRA({n.removeprefix("text_encoder."): m for n, m in self.linears.items()}, cfg.rank, g)
        opt = torch.optim.Adam(lora.params(), lr=cfg.lr)
        state = {"adv": None, "start": 0}
        ckpt = self.run_cache / "checkpoint.pt" if self.run_cache else None
        if ckpt is not None and ckpt.exists():
            state = self._resume(ckpt, lora, opt)
        bar = tqdm(
            range(state["start"], cfg.iterations),
            desc=f"train AdvUnlearn '{self.word}'",
            disable=None if progress else True,
        )
        with frozen(pipe.unet, pipe.text_encoder), lora:
            for i in bar:
                erase, retain = self.step(i, ref, state)
                opt.zero_grad(set_to_none=True)
                (erase + cfg.retain_weight * retain).backward()
                opt.step()
                bar.set_postfix(erase=f"{erase.item():.4f}", retain=f"{retain.item():.4f}", refresh=False)
                if ckpt is not None and ((i + 1) % 50 == 0 or i + 1 == cfg.iterations):
                    self._checkpoint(ckpt, i + 1, lora, opt, state)
        factors = {n: (d.detach().clone(), u.detach().clone()) for n, (d, u) in lora.factors.items()}
        meta = {"base_norms": json.dumps(weight_norms(pipe, self.weights()))}
        return AdvUnlearn(cfg.concepts, {f"text_encoder.{n}": f for n, f in factors.items()}, meta, **self._params())

    def _params(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "concepts"}

    def _checkpoint(self, path: Path, done: int, lora: _LoRA, opt, state: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        value = {"done": done, "factors": lora.params(), "opt": opt.state_dict(), "adv": state["adv"]}
        torch.save(value, str(path) + ".tmp")
        Path(str(path) + ".tmp").replace(path)

    def _resume(self, path: Path, lora: _LoRA, opt) -> dict:
        saved = torch.load(path, weights_only=False)
        with torch.no_grad():
            for p, v in zip(lora.params(), saved["factors"], strict=True):
                p.copy_(v)
        opt.load_state_dict(saved["opt"])
        return {"adv": saved["adv"], "start": saved["done"]}

    def noised(self, x0: torch.Tensor, g: torch.Generator):
        t = torch.randint(self.sch.config.num_train_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return self.sch.add_noise(x0, noise, t), t, noise

    def step(self, i: int, ref: dict, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Iteration `i`'s (erasure loss on the clean and attacked prompt, retain loss)."""
        cfg, unet = self.cfg, self.pipe.unet
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        rng = random.Random(cfg.seed * 1_000_003 + i)
        j = rng.randrange(len(self.prompts))
        x0 = ref["concept"][j : j + 1]
        xt, t, noise = self.noised(x0, g)
        with torch.no_grad():
            p, n = unet(
                xt.expand(2, -1, -1, -1),
                t.expand(2),
                torch.cat([ref["e_concept"][j : j + 1], ref["e_anchor"][j : j + 1]]),
            ).sample.chunk(2)
            target = n - cfg.eta * (p - n)
        embeds = [encode_ids(self.pipe, [token_ids(self.pipe, self.prompts[j])], grad=True)]
        if i >= cfg.warmup:
            slots, adv = self.attack(j, x0, g, state)
            embeds.append(slots.encode(adv))
        out = unet(xt.expand(len(embeds), -1, -1, -1), t.expand(len(embeds)), torch.cat(embeds)).sample
        erase = torch.nn.functional.mse_loss(out, target.expand_as(out))
        idx = rng.sample(range(len(self.retain)), min(cfg.retain_batch, len(self.retain)))
        xr, tr, _ = self.noised(ref["retain"][idx], g)
        with torch.no_grad():
            want = unet(xr, tr, ref["e_retain"][idx]).sample
        er = encode_ids(self.pipe, [token_ids(self.pipe, self.retain[k]) for k in idx], grad=True)
        retain = torch.nn.functional.mse_loss(unet(xr, tr, er).sample, want)
        return erase, retain

    def attack(self, j: int, x0: torch.Tensor, g: torch.Generator, state: dict):
        """The inner step: the prompt's slots (prefix tokens and the concept word's tokens) after PGD steps that
        make the current encoder bring the concept image back; returns (slots, their input embeddings)."""
        from ..latents import training_target
        from ..text import Slots

        cfg, unet = self.cfg, self.pipe.unet
        slots = Slots(self.pipe, cfg.attack_tokens, self.prompts[j])
        word = set(token_ids(self.pipe, self.word)[1:-1])
        slots.positions = slots.positions + [
            k for k, tid in enumerate(slots.row) if tid in word and k > cfg.attack_tokens
        ]
        adv = self._init_slots(slots, state, g)
        for _ in range(cfg.attack_steps):
            xt, t, noise = self.noised(x0, g)
            adv.requires_grad_(True)
            pred = unet(xt, t, slots.encode(adv)).sample
            loss = torch.nn.functional.mse_loss(pred, training_target(self.sch, x0, noise, t))
            (grad,) = torch.autograd.grad(loss, [adv])
            adv = (adv - cfg.attack_lr * grad.sign()).detach()
        state["adv"] = adv
        return slots, adv

    def _init_slots(self, slots, state: dict, g: torch.Generator) -> torch.Tensor:
        """The previous attack's slot embeddings where they fit ("latest"), else random vocabulary tokens."""
        prev, k = state["adv"], len(slots.positions)
        table = slots.table.detach().float()
        fresh = table[torch.randint(len(table), (k,), generator=g)]
        if prev is None:
            return fresh
        n = min(k, len(prev))
        return torch.cat([prev[:n], fresh[n:]])
