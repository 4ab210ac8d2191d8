"""The accel benchmark's entries and their cost: method specs (accel plugins, a scheduler swap, a fraction of
the steps, the DeepCache package) and the counting of the MACs a UNet actually runs (see ``accel.py``)."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from stablekit.eval.harness import rnd as _r

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
        from stablekit.errors import StablekitError
        from stablekit.registry import CATALOGUE, build, parse

        m = cls(spec.strip())
        for part in (p.strip() for p in spec.split("/")):
            name = part.partition(":")[0].strip()
            if part.startswith("x") and _is_number(part[1:]):
                m.frac = float(part[1:])
                if not 0 < m.frac <= 1:
                    raise StablekitError(f"method '{spec}': the step fraction {part} must be in (0, 1]")
            elif name in CATALOGUE["accel"]:
                build(part, CATALOGUE["accel"], "accel")  # fails here, with one line, on a bad name or parameter
                m.accel.append(part)
            elif name in CATALOGUE["scheduler"]:
                if m.scheduler:
                    raise StablekitError(f"method '{spec}': more than one scheduler")
                m.scheduler = parse(part, CATALOGUE["scheduler"], "scheduler")
            else:
                raise StablekitError(
                    f"method '{spec}': '{part}' is neither an accel method ({', '.join(CATALOGUE['accel'])}), "
                    f"a scheduler ({', '.join(CATALOGUE['scheduler'])}) nor a step fraction like x0.5"
                )
        return m

    def plugins(self) -> list:
        from stablekit import SchedulerPlugin
        from stablekit.registry import CATALOGUE, build

        out = [build(s, CATALOGUE["accel"], "accel") for s in self.accel]
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
        c = p.config if isinstance(p, DeepCache) else None
        return (c.interval, c.branch) if c is not None and c.schedule == "uniform" else None

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


# ---------------------------------------------------------------- quality evaluation (parts 2 and 3)


def psnrs(images: torch.Tensor, ref: torch.Tensor) -> dict:
    from stablekit.eval.metrics import psnr

    vals = [min(PSNR_CAP, psnr(x, y)) for x, y in zip(images, ref, strict=False)]
    return {"psnr_db_mean": _r(np.mean(vals)), "psnr_db_median": _r(np.median(vals))}


def count_macs(pipe, method: Method, prompt: str, steps: int, guidance: float) -> int:
    with MacCounter(pipe.unet) as mc, method.attached(pipe), torch.inference_mode():
        pipe(
            prompt,
            num_inference_steps=method.steps(steps),
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    return mc.total
