"""MemControl: a bi-level search for the parameters to fine-tune, scored by memorization and quality, then the
fine-tune of the chosen parameters, written as a memorization adapter.

"MemControl: Mitigating Memorization in Diffusion Models via Automated Parameter Selection" (Dutt et al., 2024,
WACV 2025; reference code Raman1121/Diffusion_Memorization_HPO).

    edit = memcontrol(pipe, memorized_prompts, reference_prompts)   # a MemorizationAdapter
    edit.save("memcontrol.safetensors")                               # `generate --adapter` applies it

Implemented: the outer level tries each candidate mask of :data:`MASKS` (a group of UNet parameters: the
cross-attention keys and values, the whole cross-attention, the feed-forward blocks, the transformer blocks of the
up path, ...); the inner level fine-tunes only that mask's parameters for `inner_steps` Adam steps, from the
model's own weights each time, and scores the result by memorization (the text-conditional noise magnitude of the
memorized prompts at the first step whose SNR is not zero, relative to the model before) and by quality (the
relative squared deviation from the model's own predictions on held-out reference states). The mask with the least
memorization among those within `tolerance` of quality (else the one of best quality) is fine-tuned for `steps`
steps, and the difference of its parameters is the adapter (:class:`~.pruning.MemorizationAdapter`, refused by
other models).

The inner objective works on denoising states recorded once from the model's own guided generations (UNet input,
timestep, and its conditional and unconditional predictions): for states of the memorized prompts, the squared
noise magnitude ``|v(x, t, c) - v(x, t, empty)|^2`` (the unconditional prediction held fixed); for states of half
the reference prompts, the squared difference of the conditional and unconditional predictions from the model's own
(the other half scores quality).

Defaults: the paper searches masks over the UNet's blocks (for several PEFT families: attention only, DiffFit,
SVDiff) with a multi-objective hyperparameter optimiser (Optuna trials), each trial a short fine-tune on a 1% subset of
the data scored by the noise magnitude of the training prompts and by FID, then fine-tunes the chosen mask on the
whole data. Ours: the four `candidates` above, 20 inner and 100 final Adam steps at lr 2e-4, 8 states of each kind per
step, quality tolerance 0.05, states from 10-step generations at guidance 7.5. Deviations:

1. the search is reduced: a few fixed candidate masks (`candidates`), each tried once, not an optimiser's trials;
2. the model has already memorized, so the fine-tune is a mitigation, not the training run itself: its objective
   is the noise magnitude of the memorized prompts plus preservation of the model's predictions on reference
   prompts (the paper fine-tunes a pretrained model on new data with the plain denoising loss, and the mask alone
   keeps the fine-tuned model from memorizing);
3. quality is the held-out deviation from the model's own predictions, not FID (no image generation per trial);
   memorization is the mean magnitude at one step, not the largest over prompts;
4. the scores are combined by a tolerance on quality, not as a Pareto front.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import torch
from diffusers.hooks import ModelHook

from ..errors import StablekitError
from ..plugins import Plugin, unet_kwargs, use
from .noise_magnitude import informative_start
from .pruning import MemorizationAdapter, base_meta

MASKS = {  # candidate parameter groups of a diffusers UNet: a regular expression on the parameter's name
    "cross-attention-kv": r"\.attn2\.to_[kv]\.",
    "cross-attention": r"\.attn2\.",
    "self-attention": r"\.attn1\.",
    "feed-forward": r"\.ff\.",
    "up-transformers": r"^up_blocks\.\d+\.attentions\.",
    "down-mid-transformers": r"^(down_blocks\.\d+|mid_block)\.attentions\.",
}


@dataclass(frozen=True)
class MemControlConfig:
    """The candidate masks, the inner and final fine-tunes (Adam steps, learning rate, batch of states), the
    quality tolerance, the generations the states are recorded from (steps, guidance) and the seed."""

    candidates: tuple[str, ...] = ("cross-attention-kv", "cross-attention", "feed-forward", "up-transformers")
    inner_steps: int = 20
    steps: int = 100
    lr: float = 2e-4
    batch: int = 8
    tolerance: float = 0.05
    num_inference_steps: int = 10
    guidance: float = 7.5
    seed: int = 0

    def __post_init__(self):
        bad = [c for c in self.candidates if c not in MASKS]
        if not self.candidates or bad:
            raise StablekitError(f"memcontrol: candidates are among {', '.join(MASKS)} (got {bad or 'none'})")
        if min(self.inner_steps, self.steps, self.batch, self.num_inference_steps) < 1 or not self.lr > 0:
            raise StablekitError("memcontrol: steps, inner_steps, batch, num_inference_steps >= 1 and lr > 0")
        if not self.tolerance > 0 or not self.guidance > 1:
            raise StablekitError("memcontrol: tolerance must be > 0 and guidance > 1")


@dataclass
class States:
    """Denoising states of guided generations: UNet input `x`, timestep `t`, step index `step`, prompt embedding
    `cond`, the empty prompt's `uncond`, and the model's own predictions `v_cond` and `v_uncond`."""

    x: torch.Tensor
    t: torch.Tensor
    step: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    v_cond: torch.Tensor
    v_uncond: torch.Tensor

    def take(self, idx) -> States:
        return States(*(v if k == "uncond" else v[idx] for k, v in vars(self).items()))


class _StateHook(ModelHook):
    def __init__(self, plugin: StateRecorder):
        super().__init__()
        self.plugin = plugin

    def pre_forward(self, module, *args, **kwargs):
        self.plugin.inputs = unet_kwargs(module, args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        p, kw = self.plugin, self.plugin.inputs
        out = output[0] if isinstance(output, tuple) else output.sample
        u, c = (h.detach() for h in p.call.halves(out.float()))
        x = p.call.halves(kw["sample"].detach())[1]
        ehs = kw["encoder_hidden_states"].detach().chunk(2)
        t = torch.as_tensor(kw["timestep"]).expand(len(x))
        p.rows.append((x, t, torch.full((len(x),), p.call.step), ehs[1], ehs[0][0], c, u))
        return output


class StateRecorder(Plugin):
    """Keeps every guided UNet call's conditional states (:class:`States` fields) in ``rows``."""

    name = "state-recorder"

    def __init__(self):
        super().__init__()
        self.rows, self.inputs = [], None

    def attach(self, pipe):
        self.add_hook(pipe.unet, _StateHook(self))


@torch.no_grad()
def record_states(pipe, prompts: list[str], cfg: MemControlConfig) -> States:
    """The states of one guided generation of each prompt (prompt i with seed ``cfg.seed * 100_000 + i``)."""
    rec = StateRecorder()
    with use(pipe, rec):
        for k in range(0, len(prompts), 32):
            part = prompts[k : k + 32]
            gens = [torch.Generator("cpu").manual_seed(cfg.seed * 100_000 + k + i) for i in range(len(part))]
            pipe(
                part,
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance,
                generator=gens,
                output_type="latent",
            )
    cols = [torch.cat(c) if i != 4 else c[0] for i, c in enumerate(zip(*rec.rows, strict=True))]
    return States(cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6])


def mask_parameters(unet, mask: str) -> dict[str, torch.nn.Parameter]:
    """``{name: parameter}`` of `unet` in the candidate `mask` (names without the ``unet.`` prefix)."""
    found = {n: p for n, p in unet.named_parameters() if re.search(MASKS[mask], n)}
    if not found:
        raise StablekitError(f"memcontrol: this UNet has no parameters in mask '{mask}'")
    return found


def _predict(unet, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return unet(x, t, emb.to(x.dtype), return_dict=False)[0].float()


def objective(unet, mem: States, ref: States) -> torch.Tensor:
    """The inner loss on a batch of memorized states `mem` and reference states `ref` (see the module)."""
    with torch.no_grad():
        u = _predict(unet, mem.x, mem.t, mem.uncond.expand(len(mem.x), -1, -1))
    memorization = (_predict(unet, mem.x, mem.t, mem.cond) - u).pow(2).mean()
    emb = torch.cat([ref.cond, ref.uncond.expand(len(ref.x), -1, -1)])
    pred = _predict(unet, torch.cat([ref.x, ref.x]), torch.cat([ref.t, ref.t]), emb)
    keep = (pred - torch.cat([ref.v_cond, ref.v_uncond])).pow(2).mean()
    return memorization + keep


def fine_tune(unet, mask: str, mem: States, ref: States, steps: int, cfg: MemControlConfig) -> dict:
    """Fine-tune `mask`'s parameters of `unet` in place for `steps` Adam steps on :func:`objective`; returns the
    change of each parameter."""
    params = mask_parameters(unet, mask)
    start = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(steps):
                batch_m = mem.take(torch.randint(0, len(mem.x), (cfg.batch,), generator=gen))
                batch_r = ref.take(torch.randint(0, len(ref.x), (cfg.batch,), generator=gen))
                opt.zero_grad(set_to_none=True)
                objective(unet, batch_m, batch_r).backward()
                opt.step()
    finally:
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])
    return {n: (p.detach() - start[n]).float().cpu() for n, p in params.items()}


@torch.no_grad()
def scores(unet, mem: States, held: States, start: int) -> dict:
    """Memorization: the mean noise magnitude ``|v_c - v_u|_2`` of the memorized states at step `start`;
    quality: the relative squared deviation of the predictions on `held` from the model's own."""
    m = mem.take(mem.step == start)
    c = _predict(unet, m.x, m.t, m.cond)
    u = _predict(unet, m.x, m.t, m.uncond.expand(len(m.x), -1, -1))
    pc = _predict(unet, held.x, held.t, held.cond)
    pu = _predict(unet, held.x, held.t, held.uncond.expand(len(held.x), -1, -1))
    err = (pc - held.v_cond).pow(2).sum() + (pu - held.v_uncond).pow(2).sum()
    scale = held.v_cond.pow(2).sum() + held.v_uncond.pow(2).sum()
    return {"memorization": float((c - u).flatten(1).norm(dim=1).mean()), "quality": float(err / scale)}


def tuned(unet, mask: str, mem: States, ref: States, held: States, steps: int, start: int, cfg) -> tuple[dict, dict]:
    """(the change of `mask`'s parameters after :func:`fine_tune` for `steps`, the scores of the tuned model); the
    model is restored bit for bit."""
    saved = {n: p.detach().clone() for n, p in mask_parameters(unet, mask).items()}
    try:
        delta = fine_tune(unet, mask, mem, ref, steps, cfg)
        return delta, scores(unet, mem, held, start)
    finally:
        params = dict(unet.named_parameters())
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def search(unet, mem: States, ref: States, held: States, start: int, cfg: MemControlConfig) -> list[dict]:
    """The outer level: each candidate mask fine-tuned for ``inner_steps`` and scored (memorization relative to the
    model before), the model restored after each."""
    before = scores(unet, mem, held, start)["memorization"]
    rows = []
    for mask in cfg.candidates:
        delta, s = tuned(unet, mask, mem, ref, held, cfg.inner_steps, start, cfg)
        n = sum(d.numel() for d in delta.values())
        rows.append(
            {"mask": mask, "parameters": n, "memorization": s["memorization"] / before, "quality": s["quality"]}
        )
    return rows


def choose(rows: list[dict], tolerance: float) -> str:
    """The mask of least memorization among those within `tolerance` of quality, else the one of best quality."""
    ok = [r for r in rows if r["quality"] <= tolerance]
    return min(ok, key=lambda r: r["memorization"])["mask"] if ok else min(rows, key=lambda r: r["quality"])["mask"]


def memcontrol(pipe, memorized: list[str], reference: list[str], **params) -> MemorizationAdapter:
    """Search the mask (:class:`MemControlConfig` `params`), fine-tune it, and return the adapter of the change."""
    cfg = MemControlConfig(**{k: tuple(v) if k == "candidates" else v for k, v in params.items()})
    if len(memorized) < 1 or len(reference) < 4:
        raise StablekitError("memcontrol needs at least one memorized prompt and four reference prompts")
    unet = pipe.unet
    mem = record_states(pipe, list(memorized), cfg)
    ref = record_states(pipe, list(reference[::2]), cfg)
    held = record_states(pipe, list(reference[1::2]), cfg)  # scores quality
    start = informative_start(pipe, cfg.num_inference_steps)
    rows = search(unet, mem, ref, held, start, cfg)
    mask = choose(rows, cfg.tolerance)
    delta, final = tuned(unet, mask, mem, ref, held, cfg.steps, start, cfg)
    weights = {f"unet.{n}": p for n, p in mask_parameters(unet, mask).items()}
    meta = base_meta(pipe, "memcontrol", weights) | {
        "mask": mask,
        "search": json.dumps(rows),
        "final": json.dumps(final),
        "params": json.dumps(asdict(cfg)),
    }
    return MemorizationAdapter({f"unet.{n}": d for n, d in delta.items()}, meta)
