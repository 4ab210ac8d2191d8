"""SpeedUpNet: a cross-attention adapter, trained once, that removes classifier-free guidance and samples in 4 steps.

Paper: Chai, Zheng, Cao, Chen, Wang, Ma, "SpeedUpNet: A Plug-and-Play Adapter Network for Accelerating
Text-to-Image Diffusion Models" (2023; ECCV 2024); reference code
github.com/williechai/speedup-plugin-for-stable-diffusions.

What is implemented:

* The adapter (:class:`SpeedUpNet`, a plugin). Every cross-attention layer of the UNet gets an extra key/value
  projection fed by the *negative* prompt's embedding (and, as in the released adapter, a second one fed by the
  positive prompt). Its attention output is *normalised*: rescaled to the norm of the layer's own attention output
  (per image), then scaled and shifted per channel (gain, shift); the layer's output becomes
  ``to_out(attn(q, k, v) - neg + pos)``. So the adapter learns the offset between negative and positive prompts
  that guidance would have added, and the negative prompt stays a live input: one UNet call per step, no batch
  doubling. The adapter attaches through module hooks on the cross-attention layers (the prompt and negative
  embeddings travel concatenated along the token axis, as in the reference pipeline), swaps the scheduler for DDIM
  with trailing timesteps, and detaches exactly. Any pipeline whose cross-attention layers have the same names and
  shapes takes it (a fine-tuned copy of the teacher, say) without retraining.
* Multi-Step Consistency (MSC) distillation (:func:`distill`). The frozen UNet with guidance ``w`` and the
  negative prompt (the empty prompt or another caption) is the teacher; the same UNet with the adapter is the
  student. The diffusion time is cut into as many phases as the sampler takes steps (4: the trailing DDIM
  timesteps 999, 749, 499, 249 are their upper edges); within a phase the student's DDIM jump to the phase's lower
  edge must agree between a point ``x_t`` and the point ``x_s`` one guided teacher DDIM step closer to the edge
  (the target is the student itself without gradient; at the edge the target is the teacher's step). So each of
  the sampler's 4 steps lands where the guided teacher's trajectory does.

Paper and reference defaults kept: the adapter's layout (negative and positive branches, attention normalisation
with per-channel gain and shift), 4 steps with trailing timesteps, guidance distilled at a fixed scale.

Deviations:
1. Initialisation: the gains and shifts start at zero, so the untrained adapter is an exact identity and training
   starts from the teacher; the new key/value projections start as copies of the layer's own (the reference starts
   the gains at one).
2. The attention normalisation takes the norm per image, not over the whole batch as the reference code does, so
   an image does not depend on the others in its batch.
3. The consistency loss is our reading of MSC (phased consistency distillation with a skipping-step DDIM teacher on
   a 40-step grid, pseudo-Huber distance as in latent consistency distillation); the sampler is DDIM with trailing
   timesteps, where the reference keeps the pipeline's DPM-Solver++.
4. Data: world renders with their captions (training side) encoded by the model's VAE, in place of LAION; the
   teacher's guidance is the embedded model's 7.5 with its guidance rescale (0.7 on a zero-terminal-SNR schedule).
5. Budgets fit the embedded model (hundreds to thousands of iterations on one CPU core); the gains and shifts learn
   at ten times the projections' learning rate, since they start at zero.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ..errors import StablekitError, require_counts
from ..plugins import Plugin

METHOD = "speedupnet"
BRANCHES = ("neg", "pos")


def cross_attentions(unet) -> dict[str, torch.nn.Module]:
    """The UNet's cross-attention modules by name (the transformer blocks' ``attn2``)."""
    return {n: m for n, m in unet.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", False)}


def attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of `attn` on projected (B, N, C) tensors, heads merged back: (B, N, C)."""
    b = q.shape[0]

    def split(x):
        return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scale)
    return out.transpose(1, 2).reshape(b, -1, q.shape[-1])


class Branch(torch.nn.Module):
    """One extra key/value projection of a cross-attention layer with its normalised output's gain and shift."""

    def __init__(self, dim_in: int, inner: int):
        super().__init__()
        self.k = torch.nn.Linear(dim_in, inner, bias=False)
        self.v = torch.nn.Linear(dim_in, inner, bias=False)
        self.gain = torch.nn.Parameter(torch.zeros(inner))
        self.shift = torch.nn.Parameter(torch.zeros(inner))

    def forward(self, attn, q: torch.Tensor, embeds: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        out = attend(attn, q, self.k(embeds), self.v(embeds))
        out = out * (norm / out.flatten(1).norm(dim=1).clamp_min(1e-6)).view(-1, 1, 1)
        return self.gain * out + self.shift


class LayerAdapter(torch.nn.Module):
    """The adapter of one cross-attention layer: the offset it adds before the layer's output projection."""

    def __init__(self, dim_in: int, inner: int, branches=BRANCHES):
        super().__init__()
        self.branches = torch.nn.ModuleDict({b: Branch(dim_in, inner) for b in branches})

    @classmethod
    def fresh(cls, attn, branches=BRANCHES) -> LayerAdapter:
        layer = cls(attn.to_k.in_features, attn.to_k.out_features, branches)
        with torch.no_grad():
            for branch in layer.branches.values():
                branch.k.weight.copy_(attn.to_k.weight)
                branch.v.weight.copy_(attn.to_v.weight)
        return layer

    def offset(self, attn, hidden: torch.Tensor, text: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        q = attn.to_q(hidden)
        norm = attend(attn, q, attn.to_k(text), attn.to_v(text)).flatten(1).norm(dim=1)
        out = -self.branches["neg"](attn, q, negative, norm)
        if "pos" in self.branches:
            out = out + self.branches["pos"](attn, q, text, norm)
        return F.linear(out, attn.to_out[0].weight) / attn.rescale_output_factor


class _OffsetHook(ModelHook):
    """On a cross-attention layer: split the prompt and negative embeddings and add the adapter's offset."""

    def __init__(self, plugin: SpeedUpNet, layer: LayerAdapter):
        super().__init__()
        self.plugin = plugin
        self.layer = layer

    def new_forward(self, module, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        run = self.fn_ref.original_forward
        if not self.plugin.enabled:
            return run(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        text, negative = encoder_hidden_states.chunk(2, dim=1)
        out = run(hidden_states, text, attention_mask, **kwargs)
        return out + self.layer.offset(module, hidden_states, text, negative)


class SpeedUpNet(Plugin):
    """The SpeedUpNet adapter of a UNet's cross-attention layers (``{layer name: LayerAdapter}``); `meta` is saved
    with it. Sample with 4 steps and guidance 1; the pipeline's ``negative_prompt`` reaches the adapter."""

    name = METHOD
    exclusive = ("scheduler",)
    recommended = {"steps": 4, "guidance": 1.0}  # what `generate` samples with unless told otherwise
    negative_without_guidance = True

    def __init__(self, layers: dict[str, LayerAdapter], meta: dict[str, str] | None = None):
        super().__init__()
        self.layers = layers
        self.meta = dict(meta or {}, method=METHOD)
        self.enabled = True  # off: the hooks pass calls through (the teacher, during training)
        self.pipe = None
        self._scheduler = None

    @classmethod
    def fresh(cls, unet, branches=BRANCHES, meta: dict[str, str] | None = None) -> SpeedUpNet:
        """An untrained adapter for `unet` (an exact identity until trained)."""
        layers = {n: LayerAdapter.fresh(m, branches) for n, m in cross_attentions(unet).items()}
        if not layers:
            raise StablekitError("the UNet has no cross-attention layers for SpeedUpNet")
        return cls(layers, meta)

    def parameters(self):
        return [p for layer in self.layers.values() for p in layer.parameters()]

    def attach(self, pipe):
        from diffusers import DDIMScheduler

        found = cross_attentions(pipe.unet)
        for name, layer in self.layers.items():
            self._check(name, found.get(name), layer)
        for name, layer in self.layers.items():
            layer.to(pipe.unet.device, pipe.unet.dtype)
            self.add_hook(found[name], _OffsetHook(self, layer))
        self.pipe = pipe
        self._scheduler = pipe.scheduler
        pipe.scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True
        )

    @staticmethod
    def _check(name: str, attn, layer: LayerAdapter) -> None:
        branch = next(iter(layer.branches.values()))
        if attn is None or attn.to_k.weight.shape != branch.k.weight.shape:
            raise StablekitError(
                f"the SpeedUpNet adapter's layer '{name}' does not fit this UNet; it was made for another model"
            )
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_cross or attn.norm_q is not None:
            raise StablekitError(f"SpeedUpNet supports plain cross-attention; '{name}' normalises its inputs")

    def detach(self, pipe):
        pipe.scheduler = self._scheduler
        self._scheduler = None
        self.pipe = None

    def transform_embeds(self, call, prompt_embeds, negative_prompt_embeds):
        if negative_prompt_embeds is not None:  # guidance on as well: both halves see the negative prompt
            both = torch.cat([negative_prompt_embeds, negative_prompt_embeds], 1)
            return torch.cat([prompt_embeds, negative_prompt_embeds], 1), both
        return torch.cat([prompt_embeds, self._negative(call.negative_prompt, prompt_embeds)], 1), None

    def _negative(self, negative, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The negative prompt's embeddings (the empty prompt's without one), one row per row of `prompt_embeds`."""
        texts = [negative or ""] if negative is None or isinstance(negative, str) else list(negative)
        pipe = self.pipe
        emb = type(pipe).encode_prompt(pipe, texts, prompt_embeds.device, 1, False)[0].to(prompt_embeds.dtype)
        if len(emb) == 1:
            return emb.expand(len(prompt_embeds), -1, -1)
        if len(prompt_embeds) % len(emb):
            raise StablekitError(f"{len(emb)} negative prompts for {len(prompt_embeds)} images; give one or one each")
        return emb.repeat_interleave(len(prompt_embeds) // len(emb), 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{n}.{k}": v.detach().float().cpu()
            for n, layer in self.layers.items()
            for k, v in layer.state_dict().items()
        }

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=self.meta)

    @classmethod
    def load(cls, path: str | Path) -> SpeedUpNet:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise StablekitError(f"SpeedUpNet file '{path}' does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise StablekitError(f"'{path}' is not a readable safetensors file ({e})") from None
        if meta.get("method") != METHOD:
            raise StablekitError(f"'{path}' is not a SpeedUpNet adapter from `stablekit distill --method speedupnet`")
        return cls(_layers(tensors), meta)


def _layers(tensors: dict[str, torch.Tensor]) -> dict[str, LayerAdapter]:
    """Layer adapters from a flat state dict (``LAYER.branches.BRANCH.PARAM``)."""
    names = sorted({k.split(".branches.")[0] for k in tensors})
    layers = {}
    for name in names:
        own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".branches.")}
        branches = sorted({k.split(".")[1] for k in own})
        inner, dim_in = own[f"branches.{branches[0]}.k.weight"].shape
        layers[name] = LayerAdapter(dim_in, inner, tuple(b for b in BRANCHES if b in branches))
        layers[name].load_state_dict(own)
    return layers


# ---- Multi-Step Consistency distillation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    images: int = 2048
    iterations: int = 1000
    batch: int = 32
    lr: float = 1e-3  # the key/value projections
    gain_lr_scale: float = 10.0  # the gains and shifts learn this much faster (they start at zero)
    guidance: float = 7.5
    steps: int = 4  # the sampler's steps: the phases of the consistency loss
    grid: int = 40  # the teacher's DDIM grid (a multiple of `steps`)
    empty_negative: float = 0.5  # share of training rows whose negative prompt is empty (the others: a caption)
    positive_branch: bool = True
    huber_c: float = 0.001
    seed: int = 0

    def __post_init__(self):
        require_counts(self, ("images", "iterations", "batch", "steps", "grid"))
        if self.grid % self.steps:
            raise ValueError(f"the teacher's grid ({self.grid}) must be a multiple of the steps ({self.steps})")
        if self.lr <= 0 or self.gain_lr_scale <= 0 or self.guidance < 1 or not 0 <= self.empty_negative <= 1:
            raise ValueError("need lr > 0, gain_lr_scale > 0, guidance >= 1 and 0 <= empty_negative <= 1")


def ddim_jump(pred, x, a_from, a_to, kind: str) -> torch.Tensor:
    """The DDIM step of prediction `pred` (of type `kind`) at `x` from cumulative alpha `a_from` to `a_to`."""
    from .lcm_distill import x0_and_eps

    x0, eps = x0_and_eps(pred, x, a_from, kind)
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def msc_loss(pipe, plugin: SpeedUpNet, config: Config):
    """The Multi-Step Consistency loss of one batch (adapter on: student; off: teacher with guidance)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from ..pipeline import guidance_rescale

    sched = pipe.scheduler
    kind = sched.config.prediction_type
    acp = torch.cat([sched.alphas_cumprod.float(), torch.ones(1)])  # index -1: the clean end (DDIM's alpha 1)
    skip = sched.config.num_train_timesteps // config.grid  # the teacher's step
    phase = sched.config.num_train_timesteps // config.steps
    with torch.no_grad():  # the pipeline's own encoder, not the plugin's wrapper
        empty = type(pipe).encode_prompt(pipe, [""], "cpu", 1, False)[0].float()
    rescale = guidance_rescale(pipe)

    def a(t):
        return acp[t].view(-1, 1, 1, 1)

    def student(x, t, edge, both):
        return ddim_jump(pipe.unet(x, t.clamp(min=0), both).sample, x, a(t), a(edge), kind)

    def loss(unet, _noise, cond, x0, g):
        b = len(x0)
        t = torch.randint(1, config.grid + 1, (b,), generator=g) * skip - 1
        s = t - skip
        edge = (t // phase) * phase - 1  # the lower edge of t's phase: the next sampler timestep, or -1 (clean)
        x_t = a(t).sqrt() * x0 + (1 - a(t)).sqrt() * torch.randn(x0.shape, generator=g)
        keep = (torch.rand(b, generator=g) < config.empty_negative).view(-1, 1, 1)
        negative = torch.where(keep, empty.expand(b, -1, -1), cond[torch.randperm(b, generator=g)])
        both = torch.cat([cond, negative], 1)
        pred = student(x_t, t, edge, both)
        with torch.no_grad():
            plugin.enabled = False
            c, u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, negative])).sample.chunk(2)
            plugin.enabled = True
            guided = (
                rescale_noise_cfg(u + config.guidance * (c - u), c, rescale)
                if rescale
                else u + config.guidance * (c - u)
            )
            x_s = ddim_jump(guided, x_t, a(t), a(s), kind)
            target = torch.where((s == edge).view(-1, 1, 1, 1), x_s, student(x_s, s, edge, both))
        return (torch.sqrt((pred - target).pow(2) + config.huber_c**2) - config.huber_c).mean()

    return loss


def distill(pipe, config: Config = Config(), *, workdir=None, minutes: float | None = None):
    """Train a SpeedUpNet adapter for `pipe` (left as it was): (the adapter, recipe). Finished iterations are kept in
    `workdir` (none: nothing kept), so a stopped run resumes; training stops after `minutes` (a time budget) or at
    ``config.iterations``, whichever comes first."""
    from ..plugins import use
    from .students import Stages, elapsed_minutes, world_latents

    t0 = time.perf_counter()
    stages = Stages(workdir, config)
    data = stages.pairs("world_latents", lambda: world_latents(pipe, config.images, config.seed))
    branches = BRANCHES if config.positive_branch else ("neg",)
    plugin = SpeedUpNet.fresh(pipe.unet, branches)
    pipe.unet.requires_grad_(False)
    handle = use(pipe, plugin)
    try:
        loss = msc_loss(pipe, plugin, config)
        probe = data.batch(torch.arange(min(len(data), 32)))
        before = _probe(pipe.unet, loss, probe, config.seed)
        deadline = math.inf if minutes is None else time.time() + 60 * minutes
        losses = _train(pipe.unet, plugin, loss, data, config, stages.dir, deadline)
        after = _probe(pipe.unet, loss, probe, config.seed)
    finally:
        handle.remove()
    recipe = {
        "method": METHOD,
        "paper": "SpeedUpNet: A Plug-and-Play Adapter Network for Accelerating Text-to-Image Diffusion Models (2023)",
        "config": asdict(config),
        "iterations_done": len(losses),
        "steps": config.steps,
        "guidance": 1.0,
        "distilled_guidance": config.guidance,
        "probe_loss_before": before,
        "probe_loss_after": after,
        "minutes": elapsed_minutes(t0),
    }
    plugin.meta["recipe"] = json.dumps(recipe)
    return plugin, recipe


def _probe(unet, loss, batch, seed: int) -> float:
    """The loss of one fixed batch, noise, timesteps and negative prompts."""
    with torch.no_grad():
        return loss(unet, *batch, torch.Generator().manual_seed(seed + 1)).item()


def _train(unet, plugin: SpeedUpNet, loss, data, config: Config, work: Path | None, deadline: float) -> list[float]:
    """AdamW on the adapter's parameters; the adapter, optimizer, batch generator and losses are kept in `work` every
    50 iterations and at the end, and taken up from there. The losses of every iteration done."""
    from tqdm import tqdm

    params = plugin.parameters()
    for p in params:
        p.requires_grad_(True)
    gains = [p for p in params if p.dim() == 1]
    groups = [
        {"params": [p for p in params if p.dim() > 1]},
        {"params": gains, "lr": config.lr * config.gain_lr_scale},
    ]
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    g = torch.Generator("cpu").manual_seed(config.seed)
    ckpt = None if work is None else work / "adapter.pt"
    losses = []
    if ckpt is not None and ckpt.exists():
        kept = torch.load(ckpt)
        for name, layer in plugin.layers.items():
            layer.load_state_dict(kept["layers"][name])
        opt.load_state_dict(kept["optimizer"])
        g.set_state(kept["generator"])
        losses = kept["losses"]

    def keep():
        if ckpt is not None:
            layers = {n: layer.state_dict() for n, layer in plugin.layers.items()}
            state = {"layers": layers, "optimizer": opt.state_dict(), "generator": g.get_state(), "losses": losses}
            torch.save(state, ckpt)

    done = len(losses)
    for it in tqdm(range(done, config.iterations), "MSC distillation", config.iterations, initial=done, unit="step"):
        if time.time() > deadline:
            break
        value = loss(unet, *data.batch(torch.randint(0, len(data), (min(config.batch, len(data)),), generator=g)), g)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(value.item())
        if (it + 1) % 50 == 0:
            keep()
    keep()
    for p in params:
        p.requires_grad_(False)
    return losses


def save(plugin: SpeedUpNet, out, recipe: dict) -> Path:
    """Write the adapter to the folder `out` (``speedupnet.safetensors`` and ``recipe.json``), atomically: the folder
    is either complete or absent."""
    import os
    import shutil

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StablekitError(f"output '{out}' exists and is not an empty folder; choose another -o or remove it")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        tmp.mkdir(parents=True)
        plugin.save(tmp / "speedupnet.safetensors")
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "speedupnet.safetensors"
