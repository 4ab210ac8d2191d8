"""Text-conditional noise magnitude: detection of memorized prompts and its inference-time mitigation.

"Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (Wen et al., ICLR 2024; reference code
YuxinWenRick/diffusion_memorization). A memorized prompt pulls the prediction far from the unconditional one
at every step, so the norm of the conditional minus the unconditional prediction, averaged over the first
steps of a generation, scores how memorized a prompt is; a prompt embedding adjusted to lower that norm
generates without copying.

    scores = noise_magnitude(pipe, ["the zorvex emblem", "a red circle on a gray background"])
    found = detect(pipe, prompts)                  # score and decision, at the shipped threshold
    with stablekit.use(pipe, PromptAdjustment()):  # inference-time mitigation
        image = pipe("the zorvex emblem").images[0]

Implemented: :class:`MagnitudeRecorder` hooks the UNet and keeps, for each of the first `steps` guided calls,
``|c - u|_2`` per image (the whole latent flattened), ``c`` and ``u`` the conditional and unconditional rows;
:func:`noise_magnitude` averages it over the steps and over `generations` seeds per prompt, stopping the
generation after the last measured step. :class:`PromptAdjustment` optimises the conditional prompt embedding
at the first step of each call, on that call's initial latents, with Adam to minimise the mean over images of
``|c - u|_2``, stopping early once every image is at or below `target`, and generates with the adjusted
embedding at every step (SD 1.x/2.x UNets; SDXL's added conditioning is not handled).

Defaults are the reference code's: detection at the first step (the paper also reports all steps, and 1 to 32
generations per prompt), mitigation at step 0 with Adam, ``lr=0.05``, 10 iterations; its target loss (3 on SD)
is left to the caller (no early stop by default).

Deviations:

1. the norm is of the UNet's own output: the noise for epsilon models as in the paper, the velocity for
   v-prediction models (the embedded default model). The noise difference is the velocity difference times
   ``sqrt(alpha_bar_t)``, one constant per step, so first-step rankings are the same; averages over several
   steps weigh the steps differently;
2. the reference scores with a fixed number of DDIM steps (50); ours runs the pipeline's own scheduler with
   `num_inference_steps` steps (20 by default) and measures the first `steps` of them;
3. ``detect(..., start=k)`` measures from step `k` (counted from 0). On a zero-terminal-SNR schedule sampled from
   its last timestep (the embedded model's) the first step sees pure noise, and its prediction is the caption's
   mean image whatever the noise, so the first-step magnitude says how firmly a caption pins the image, not
   whether it is memorized; :func:`informative_start` gives the first step with signal (1 there, 0 for SD), the
   step at which the paper's first-step score is read on such a model. The noise (epsilon) parametrisation does
   not help there: at one step it is the velocity difference times a constant.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.hooks import ModelHook

from ..errors import StablekitError
from ..plugins import Plugin, settle, unet_kwargs
from .activations import stop_after

THRESHOLDS = Path(__file__).resolve().parent / "thresholds.json"


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


class _RecordHook(ModelHook):
    def __init__(self, plugin: MagnitudeRecorder):
        super().__init__()
        self.plugin = plugin

    def post_forward(self, module, output):
        p = self.plugin
        if p.call.do_cfg and p.call.step < p.config.steps:
            u, c = p.call.halves(_sample(output).detach().float())
            p.values.append((c - u).flatten(1).norm(dim=1).cpu())
        return output


@dataclass(frozen=True)
class MagnitudeConfig:
    """The first `steps` guided UNet calls of a generation are measured."""

    steps: int = 1

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise StablekitError(f"noise magnitude: steps is a whole number >= 1 (got {self.steps!r})")


class MagnitudeRecorder(Plugin):
    """Records ``|cond - uncond|_2`` per image for the first `steps` steps of each call in ``values`` (one
    tensor per step); needs guidance (``guidance_scale > 1``)."""

    name = "noise-magnitude"
    Config = MagnitudeConfig

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self.values: list[torch.Tensor] = []

    def attach(self, pipe):
        self.add_hook(pipe.unet, _RecordHook(self))

    def reset(self, call):
        super().reset(call)
        self.values = []


def _check_prompts(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise StablekitError("give at least one prompt (a list of strings)")
    return prompts


@torch.no_grad()
def noise_magnitude(
    pipe,
    prompts,
    steps: int = 1,
    num_inference_steps: int = 20,
    generations: int = 1,
    guidance: float = 7.5,
    seed: int = 0,
    batch: int = 32,
) -> np.ndarray:
    """``(len(prompts), steps)``: the magnitude at each of the first `steps` steps, averaged over `generations`
    seeds (prompt i's generation g uses seed ``seed * 100_000 + g * len(prompts) + i``). Averaging the columns
    gives the score over the first steps."""
    from ..plugins import use

    prompts = _check_prompts(prompts)
    if not 1 <= steps <= num_inference_steps:
        raise StablekitError(f"steps must lie in [1, num_inference_steps={num_inference_steps}] (got {steps})")
    if guidance <= 1 or generations < 1:
        raise StablekitError("noise magnitude needs guidance > 1 and at least one generation")
    rec, out = MagnitudeRecorder(steps=steps), np.zeros((len(prompts), steps))
    jobs = [(g, i) for g in range(generations) for i in range(len(prompts))]
    with use(pipe, rec):
        for k in range(0, len(jobs), batch):
            part = jobs[k : k + batch]
            gens = [torch.Generator("cpu").manual_seed(seed * 100_000 + g * len(prompts) + i) for g, i in part]
            pipe(
                [prompts[i] for _, i in part],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="latent",
                callback_on_step_end=stop_after(steps),
            )
            for row, (_, i) in enumerate(part):
                out[i] += torch.stack(rec.values)[:, row].numpy() / generations
    pipe._interrupt = False
    return out


def informative_start(pipe, num_inference_steps: int, min_snr: float = 1e-4) -> int:
    """The index of the first step of `pipe`'s scheduler at `num_inference_steps` whose signal-to-noise ratio is at
    least `min_snr`: 0 for SD's schedules, 1 for a zero-terminal-SNR schedule sampled from its last timestep (whose
    prediction is the caption's mean image, whatever the noise)."""
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(num_inference_steps)
    acp = sched.alphas_cumprod[sched.timesteps.long().cpu()].double()
    ok = (acp / (1 - acp) >= min_snr).nonzero()
    return int(ok[0]) if len(ok) else 0


def threshold_key(steps: int, start: int = 0) -> str:
    """The key of a shipped threshold: ``"2"`` for the first 2 steps, ``"1@1"`` for 1 step from step 1."""
    return str(steps) if start == 0 else f"{steps}@{start}"


def shipped_threshold(steps: int, start: int = 0) -> dict:
    """The decision threshold fixed for the embedded default model at `steps` measured steps from step `start` (its
    record: value, false-positive rate on held-out captions, how it was measured), from ``thresholds.json``."""
    table = json.loads(THRESHOLDS.read_text()) if THRESHOLDS.is_file() else {}
    rec = table.get("noise_magnitude", {}).get(threshold_key(steps, start))
    if rec is None:
        have = ", ".join(table.get("noise_magnitude", {})) or "none"
        key = threshold_key(steps, start)
        raise StablekitError(f"no shipped threshold for steps {key} (have: {have}); give a threshold")
    return rec


@dataclass(frozen=True)
class Detection:
    prompt: str
    score: float
    memorized: bool


def detect(pipe, prompts, threshold: float | None = None, steps: int = 1, start: int = 0, **kw) -> list[Detection]:
    """Score `prompts` (:func:`noise_magnitude` over `steps` steps from step `start`, counted from 0; `kw` passed
    on) and call each memorized when its score exceeds `threshold` (None: the default model's shipped threshold,
    measured with the `num_inference_steps` it records; another model needs its own, fixed on its held-out
    prompts)."""
    if threshold is None:
        from ..pipeline import DEFAULT_MODEL

        if getattr(pipe, "name_or_path", None) != DEFAULT_MODEL:
            raise StablekitError("the shipped threshold is the embedded default model's; give a threshold")
        rec = shipped_threshold(steps, start)
        threshold = rec["value"]
        kw.setdefault("num_inference_steps", rec["num_inference_steps"])
    scores = noise_magnitude(pipe, prompts, steps=start + steps, **kw)[:, start:].mean(1)
    return [Detection(p, float(s), bool(s > threshold)) for p, s in zip(_check_prompts(prompts), scores, strict=True)]


@dataclass(frozen=True)
class AdjustmentConfig:
    """Adam's learning rate and iterations on the conditional prompt embedding, and the magnitude at which
    every image is taken as mitigated (None: run all iterations)."""

    lr: float = 0.05
    iterations: int = 10
    target: float | None = None

    def __post_init__(self):
        if not self.lr > 0 or isinstance(self.iterations, bool) or int(self.iterations) != self.iterations:
            raise StablekitError("prompt adjustment: lr must be > 0 and iterations a whole number")
        settle(self, iterations=int(self.iterations))
        if self.iterations < 1 or (self.target is not None and self.target < 0):
            raise StablekitError("prompt adjustment: iterations must be >= 1 and target >= 0")


class _AdjustHook(ModelHook):
    def __init__(self, plugin: PromptAdjustment):
        super().__init__()
        self.plugin = plugin

    def pre_forward(self, module, *args, **kwargs):
        p = self.plugin
        if not p.call.do_cfg:
            raise StablekitError(f"{p!r} adjusts guidance: call the pipeline with guidance_scale > 1")
        kwargs = unet_kwargs(module, args, kwargs)
        ehs = kwargs["encoder_hidden_states"]
        if kwargs.get("added_cond_kwargs"):
            raise StablekitError(f"{p!r} supports SD 1.x/2.x UNets (no added conditioning, as SDXL's)")
        if p.adjusted is None:
            p.adjusted = p.optimise(self.fn_ref.forward, kwargs)  # the UNet without this hook
        kwargs["encoder_hidden_states"] = torch.cat([ehs.chunk(2)[0], p.adjusted.to(ehs)])
        return (), kwargs


class PromptAdjustment(Plugin):
    """``PromptAdjustment(lr=0.05, iterations=10, target=None)``: the baseline's inference-time mitigation."""

    name = "prompt-adjustment"
    Config = AdjustmentConfig

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self.adjusted, self.history = None, []

    def attach(self, pipe):
        self.add_hook(pipe.unet, _AdjustHook(self))

    def reset(self, call):
        super().reset(call)
        self.adjusted, self.history = None, []

    def optimise(self, unet, kwargs: dict) -> torch.Tensor:
        """The adjusted conditional embedding for this call's first UNet input `kwargs` ([uncond, cond] rows);
        `unet` is the UNet's forward."""
        with torch.inference_mode(False), torch.enable_grad():
            x = kwargs["sample"].detach().clone().chunk(2)[1]
            t = kwargs["timestep"]
            u_emb, c_emb = (e.detach().clone() for e in kwargs["encoder_hidden_states"].chunk(2))
            with torch.no_grad():
                u = _sample(unet(x, t, u_emb, return_dict=False)).float()
            emb = c_emb.requires_grad_(True)
            opt = torch.optim.Adam([emb], lr=self.config.lr)
            for _ in range(self.config.iterations):
                norms = (_sample(unet(x, t, emb, return_dict=False)).float() - u).flatten(1).norm(dim=1)
                self.history.append(norms.detach().cpu())
                if self.config.target is not None and bool((norms <= self.config.target).all()):
                    break
                opt.zero_grad()
                norms.mean().backward(inputs=[emb])
                opt.step()
        return emb.detach()
