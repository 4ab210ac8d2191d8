"""SPM, concept-semipermeable membranes ("One-dimensional Adapter to Rule Them All: Concepts,
Diffusion Models and Erasing Applications", 2024): a rank-1 adapter trained to erase a concept, whose
strength at inference follows the prompt's similarity to that concept.

    spm = SPM.train(pipe, "star")                    # minutes on the default model, with a progress bar
    spm.save("no-star.safetensors"); spm = SPM.load("no-star.safetensors")
    with stablekit.use(pipe, spm, SPM.load("no-red.safetensors")):     # membranes combine
        image = pipe("a red star on a gray background").images[0]

Implemented as in the reference code (Con6924/SPM, ``train_spm.py``, ``src/models/spm.py``, ``infer_spm.py``):

* the membrane: every ``Linear`` and ``Conv2d`` inside the UNet's ``Transformer2DModel`` blocks (projections in
  and out, self- and cross-attention q/k/v/out, feed-forward) gets ``y = W x + m * scale * up(down(x))``, rank 1,
  ``scale = alpha / rank = 1``; ``down`` has the layer's kernel (Kaiming-uniform init), ``up`` is 1x1 (zero init);
* erasing: a latent ``x_t`` comes from ``k ~ U{1..29}`` DDIM steps of a 30-step run from noise with the membrane
  on (prompts "" and the concept, guidance 3); the membrane's prediction for the concept is pulled toward ``N -
  eta * (P - N)`` with ``P``, ``N`` the frozen model's predictions for the concept and the surrogate "" (``eta =
  1``);
* latent anchoring: 4 random embeddings per step, Gaussian, shaped like a prompt's embeddings, of the concept
  embedding's norm times ``U(0.8, 1.2)``; the membrane must not change the predictions for them; loss ``erase +
  1000 * anchor``;
* AdamW, lr 1e-4 (on the default model 1e-3 and anchor weight 1, chosen on held-out prompts: at the paper's 1000
  the anchoring holds a rank-1 membrane near zero there), cosine schedule with 3 hard restarts after a sixth of the
  run in warm-up (500 of the 3000 iterations), batch 1, float32;
* facilitated transport: per prompt, ``m = max(cos(E_prompt, E_c), |tokens(prompt) & tokens(c)| / |tokens(c)|)``
  over the membrane's concepts ``c``, ``E`` the pipeline's prompt embeddings flattened (padding included),
  special tokens excluded from the token sets; the same ``m`` for the prompt's guided and unguided rows; ``m`` is
  multiplied by ``multiplier`` (default 1, as the reference's; its ``--spm_multiplier`` replaces the transport by
  fixed values instead, ours scales it, so prompts far from the concept stay nearly untouched). On the default
  model a colour's membrane wants 1.5; a shape's does not gain from it (benchmarks/RESULTS.md, "Safety");
* the surrogate (``surrogate``, the erasing target's prompt) is the paper's "" by default. On the default model a
  shape wants a concrete stand-in, ``surrogate="shape"``: erased toward nothing, a prompt's shape becomes an
  amorphous blob that the judge often calls a star.

Deviations: for text encoders other than CLIP (the default model's MiniLM) the erased prompts are the concept in
generic contexts (:data:`~.text.TEMPLATES`, one per iteration in turn, toward the same context with the surrogate):
a bidirectional encoder spreads the word over every position, and a membrane trained on the bare word alone does
not carry over to prompts. The latent after ``k`` steps is paired with the
timestep it is at (the reference pairs it with index ``k * 1000 / 30`` of a 1000-step schedule); 4 anchors are used
(the reference's batching keeps 2 of them and 2 copies of the empty prompt); plain AdamW (the reference uses
bitsandbytes' 8-bit AdamW); the model's own resolution (the reference draws 256-448 px sizes); several membranes
add ``sum_i m_i * up_i(down_i(x))`` as the paper writes (the reference scales both factors of one merged LoRA by
``m``: ``m^2`` for one membrane and cross terms for several). When a call's UNet batch is not the prompts' rows (or
twice them under guidance), every row gets the largest ``m`` of the call.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from ..errors import StablekitError
from ..pipeline import frozen
from ..plugins import Plugin, settle, use
from ..text import encode_ids, is_clip, token_ids, tokenizer
from .safree import concept_words
from .templates import TEMPLATES


def target_modules(unet) -> dict[str, nn.Module]:
    """``{"<name>": module}``: every Linear and Conv2d inside the UNet's transformer blocks."""
    return {
        f"{bn}.{n}": m
        for bn, block in unet.named_modules()
        if isinstance(block, Transformer2DModel)
        for n, m in block.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def membrane(layer: nn.Module, rank: int = 1) -> nn.Module:
    """``up(down(x))`` for `layer`: down with the layer's kernel, stride and padding, up 1x1 (zeros)."""
    if isinstance(layer, nn.Linear):
        down, up = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=False)
    else:
        down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
        up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)
    return nn.Sequential(down, up).to(layer.weight.device, layer.weight.dtype)


class _MembraneHook(ModelHook):
    def __init__(self, spm: SPM, adapter: nn.Module):
        super().__init__()
        self.spm, self.adapter, self.x = spm, adapter, None

    def pre_forward(self, module, *args, **kwargs):
        self.x = args[0] if args else kwargs["input"]
        return args, kwargs

    def post_forward(self, module, output):
        x, self.x = self.x, None
        m = self.spm.strength(output.shape[0])
        if isinstance(m, float):
            if m == 0:
                return output
        else:
            m = m.to(output.device, output.dtype).view(-1, *[1] * (output.dim() - 1))
        return output + m * self.spm.scale * self.adapter(x)


@dataclass(frozen=True)
class SPMConfig:
    """The parameters of an :class:`SPM` membrane besides its weights: the concepts it erases, its LoRA rank and
    alpha (the membrane scales its output by ``alpha / rank``), and the multiplier of its transported strength."""

    concepts: tuple[str, ...]
    rank: int = 1
    alpha: float = 1.0
    multiplier: float = 1.0

    def __post_init__(self):
        settle(self, concepts=concept_words(self.concepts, "SPM"))
        if not self.multiplier >= 0:
            raise StablekitError(f"SPM multiplier must be >= 0 (got {self.multiplier})")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise StablekitError(f"SPM rank is a whole number >= 1 (got {self.rank!r})")


class SPM(Plugin):
    """A membrane for `concepts`; ``SPM.train(pipe, concept)`` makes one, ``SPM.load(path)`` reads one.
    ``SPM(concepts, weights, rank=1, alpha=1.0, multiplier=1.0)`` or ``SPM(SPMConfig(...), weights)``."""

    name = "spm"
    Config = SPMConfig

    def __init__(self, concepts, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], **params):
        super().__init__(concepts, **params)
        self.weights, self.fixed, self._m, self.adapters, self.pipe = weights, None, None, {}, None

    @property
    def scale(self) -> float:
        return self.config.alpha / self.config.rank

    # life cycle
    def attach(self, pipe):
        modules = target_modules(pipe.unet)
        adapters = {}
        for name, (down, up) in self.weights.items():
            layer = modules.get(name)
            a = membrane(layer, self.config.rank) if layer is not None else None
            if a is None or (a[0].weight.shape, a[1].weight.shape) != (down.shape, up.shape):
                raise StablekitError(
                    f"this SPM was made for another model architecture (its layer '{name}' "
                    "is missing or has another shape here)"
                )
            with torch.no_grad():
                a[0].weight.copy_(down)
                a[1].weight.copy_(up)
            adapters[name] = a.requires_grad_(False)
        self.pipe, self.adapters = pipe, adapters
        for name, adapter in adapters.items():
            self.add_hook(modules[name], _MembraneHook(self, adapter))

    def detach(self, pipe):
        self.pipe, self.adapters = None, {}

    def reset(self, call):
        super().reset(call)
        self._m = None

    def transform_embeds(self, call, pe, npe):
        if self.fixed is None and call.prompt is not None:
            prompts = [call.prompt] if isinstance(call.prompt, str) else list(call.prompt)
            per = pe.shape[0] // len(prompts)
            self._m = self.config.multiplier * self.transport(prompts, pe[::per]).repeat_interleave(per)
        return pe, npe

    # facilitated transport
    @torch.no_grad()
    def transport(self, prompts: list[str], embeds: torch.Tensor) -> torch.Tensor:
        """Per prompt, the membrane's strength: the largest of embedding cosine and token overlap over concepts."""
        rows = [token_ids(self.pipe, c) for c in self.config.concepts]
        ce = encode_ids(self.pipe, rows, getattr(self.pipe, "clip_skip", None)).to(embeds)
        cos = torch.nn.functional.cosine_similarity(embeds.flatten(1)[:, None], ce.flatten(1)[None], dim=-1)
        special = set(tokenizer(self.pipe).all_special_ids)
        words = [set(token_ids(self.pipe, p)) - special for p in prompts]
        cwords = [set(r) - special for r in rows]
        overlap = torch.tensor([[len(w & c) / max(1, len(c)) for c in cwords] for w in words], device=cos.device)
        return torch.maximum(cos, overlap).max(dim=1).values.clamp(0, 1)

    def strength(self, rows: int):
        if self.fixed is not None:
            return self.fixed
        m = self._m
        if m is None:  # called without a prompt (prompt_embeds=...): full strength
            return self.config.multiplier
        if rows == len(m):
            return m
        return torch.cat([m, m]) if rows == 2 * len(m) else float(m.max())

    # files
    def save(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {
            f"{n}.{i}": w.float().contiguous().cpu() for n, pair in self.weights.items() for i, w in enumerate(pair)
        }
        meta = {
            "method": "spm",
            "concepts": json.dumps(list(self.config.concepts)),
            "rank": str(self.config.rank),
            "alpha": str(self.config.alpha),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path, multiplier: float = 1.0) -> SPM:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise StablekitError(f"'{path}' is not a readable safetensors file ({e})") from None
        if meta.get("method") != "spm":
            raise StablekitError(f"'{path}' is not an SPM membrane")
        weights = {}
        for key, w in tensors.items():
            name, i = key.rsplit(".", 1)
            weights.setdefault(name, [None, None])[int(i)] = w
        return cls(
            json.loads(meta["concepts"]),
            {n: tuple(pair) for n, pair in weights.items()},
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            multiplier=multiplier,
        )

    # training
    @classmethod
    def train(
        cls,
        pipe,
        concept: str,
        iterations: int = 3000,
        lr: float = 1e-4,
        eta: float = 1.0,
        anchor_weight: float = 1000.0,
        anchors: int = 4,
        sample_steps: int = 30,
        sample_guidance: float = 3.0,
        surrogate: str = "",
        templates: tuple[str, ...] | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> SPM:
        """Train a membrane that erases `concept` from `pipe`'s UNet (left unchanged). Iteration ``i`` erases
        ``templates[i % len(templates)]`` filled with the concept, toward the same template filled with the
        surrogate; by default the bare word for CLIP text encoders (the paper) and :data:`~.text.TEMPLATES`
        for any other."""
        from diffusers import DDIMScheduler
        from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup
        from tqdm.auto import tqdm

        if not isinstance(concept, str) or not concept.strip():
            raise StablekitError("SPM.train needs a non-empty concept, e.g. 'star'")
        torch.manual_seed(seed)
        rng, unet = random.Random(seed), pipe.unet
        init = {n: membrane(m) for n, m in target_modules(unet).items()}
        spm = cls([concept], {n: (a[0].weight.detach(), a[1].weight.detach()) for n, a in init.items()})
        ddim = DDIMScheduler.from_config(pipe.scheduler.config)
        cs, ss, u = _template_embeds(pipe, concept, surrogate, templates)
        shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        sampling = dict(shape=shape, u=u, sample_steps=sample_steps, sample_guidance=sample_guidance)
        with frozen(unet), use(pipe, spm):
            params = [p.requires_grad_(True) for a in spm.adapters.values() for p in a.parameters()]
            opt = torch.optim.AdamW(params, lr=lr)
            sched = get_cosine_with_hard_restarts_schedule_with_warmup(opt, iterations // 6, iterations, 3)
            bar = tqdm(range(iterations), desc=f"train SPM '{concept}'", disable=None if progress else True)
            for i in bar:
                c = cs[i % len(cs)][None]
                s = ss[i % len(ss)][None]
                erase, anchor = _losses(spm, unet, ddim, c, s, rng, anchors=anchors, eta=eta, **sampling)
                opt.zero_grad(set_to_none=True)
                (erase + anchor_weight * anchor).backward()
                opt.step()
                sched.step()
                bar.set_postfix(erase=f"{erase.item():.4f}", anchor=f"{anchor.item():.2e}", refresh=False)
            spm.weights = {
                n: (a[0].weight.detach().clone(), a[1].weight.detach().clone()) for n, a in spm.adapters.items()
            }
        spm.fixed = None
        return spm


def _template_embeds(pipe, concept: str, surrogate: str, templates: tuple[str, ...] | None):
    """Text embeddings of each template filled with the concept, of each filled with the surrogate, and of the
    empty prompt; `templates` None: the bare word for CLIP text encoders (the paper), :data:`~.text.TEMPLATES`
    for any other."""
    if templates is None:
        templates = ("{}",) if is_clip(pipe) else TEMPLATES
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise StablekitError("SPM templates must each contain '{}' once, e.g. ('a photo of a {}',)")
    concepts = encode_ids(pipe, [token_ids(pipe, t.format(concept)) for t in templates])
    surrogates = encode_ids(pipe, [token_ids(pipe, t.format(surrogate).strip()) for t in templates])
    return concepts, surrogates, encode_ids(pipe, [token_ids(pipe, "")])


def _losses(spm, unet, ddim, c, s, rng, *, shape, u, sample_steps, sample_guidance, anchors: int, eta: float):
    """One training step's (erasing loss, anchoring loss) for concept and surrogate embeddings `c`, `s`: at a latent
    partly sampled with the membrane on, the membrane's output should move from the concept's prediction P past the
    surrogate's N (N - eta (P - N)) and keep its predictions for `anchors` random embeddings of about `c`'s norm."""
    with torch.no_grad():
        spm.fixed = 1.0
        x, t = _partial_sample(
            unet, ddim, shape, u, c, rng.randint(1, sample_steps - 1), sample_steps, sample_guidance
        )
        spm.fixed = 0.0
        anchor_embeds = _anchors(c, anchors, rng)
        ref = unet(x.expand(2 + anchors, -1, -1, -1), t, torch.cat([c, s, anchor_embeds])).sample
    spm.fixed = 1.0
    out = unet(x.expand(1 + anchors, -1, -1, -1), t, torch.cat([c, anchor_embeds])).sample
    concept_pred = ref[0:1]
    surrogate_pred = ref[1:2]
    erase = torch.nn.functional.mse_loss(out[:1], surrogate_pred - eta * (concept_pred - surrogate_pred))
    anchor = torch.nn.functional.mse_loss(out[1:], ref[2:])
    return erase, anchor


def _partial_sample(unet, ddim, shape, u, c, k: int, steps: int, guidance: float):
    """``k`` guided DDIM steps of a `steps`-step run from noise: the latent and the timestep it is at."""
    ddim.set_timesteps(steps)
    x = torch.randn(shape, device=c.device, dtype=c.dtype) * ddim.init_noise_sigma
    for t in ddim.timesteps[:k]:
        eu, ec = unet(torch.cat([x, x]), t, torch.cat([u, c])).sample.chunk(2)
        x = ddim.step(eu + guidance * (ec - eu), t, x).prev_sample
    return x, ddim.timesteps[k]


def _anchors(c: torch.Tensor, n: int, rng: random.Random) -> torch.Tensor:
    """`n` random embeddings shaped like `c` ``(1, L, D)``, of its norm times U(0.8, 1.2)."""
    z = torch.randn(n, *c.shape[1:], device=c.device, dtype=c.dtype)
    z = z / z.flatten(1).norm(dim=1).view(-1, 1, 1)
    return z * c.norm() * torch.tensor([rng.uniform(0.8, 1.2) for _ in range(n)]).to(c).view(-1, 1, 1)
