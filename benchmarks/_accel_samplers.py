"""The accel benchmark's samplers part: quality against model calls per sampler, and the searched schedule
(see ``accel.py``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import _common
import numpy as np
import torch
from _accel_methods import Method, count_macs, psnrs

from stablekit.eval.harness import Judge, bench_pipeline
from stablekit.eval.harness import rnd as _r

# ---------------------------------------------------------------- part 3: samplers


def sampler_plugin(name: str):
    """A SchedulerPlugin for a sampler name of ``--samplers`` (or any scheduler spec)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from stablekit import SchedulerPlugin
    from stablekit.registry import CATALOGUE, parse
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
        _, cls, params = parse(name, CATALOGUE["scheduler"], "scheduler")
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


class _Evaluation:
    """The default model on the evaluation prompts, the judge, and the many-step DPM-Solver++ reference."""

    def __init__(self, a):
        from stablekit.eval.harness import heldout_prompts

        self.a, self.pipe = a, bench_pipeline(a)
        scenes, self.prompts = heldout_prompts(a.prompts, 0, a.prompt_seed)
        self.judge = Judge(scenes, a.prompt_seed)
        self.ref_images, _, _ = self.run([sampler_plugin("dpm++")], a.reference_steps, "samplers: reference")
        self.ref_feats = self.judge.features(self.ref_images)
        self.feats = {}  # (curve name, calls) -> the judge's features of its images

    def run(self, plugins: list, steps: int, desc: str) -> tuple[torch.Tensor, float, float]:
        """Images, seconds per image and UNet calls per image (counted) with `plugins` at `steps` steps."""
        import stablekit
        from stablekit.eval.harness import generate

        a, calls = self.a, [0]
        hook = self.pipe.unet.register_forward_pre_hook(lambda m, args: calls.__setitem__(0, calls[0] + 1))
        try:
            with stablekit.use(self.pipe, *plugins):
                images, sec = generate(
                    self.pipe,
                    self.prompts,
                    steps=steps,
                    guidance=a.guidance,
                    seed=a.prompt_seed,
                    batch=a.batch,
                    desc=desc,
                )
        finally:
            hook.remove()
        return images, sec, calls[0] / math.ceil(len(self.prompts) / a.batch)

    def point(self, plugins: list, steps: int, desc: str, key: tuple | None = None) -> dict:
        """One sampler at `steps` calls: the judge's metrics, and the distances to the reference."""
        from stablekit.eval.metrics import frechet_distance

        images, sec, calls = self.run(plugins, steps, desc)
        ev, _, feats = self.judge.evaluate(images)
        self.feats[key] = feats
        row = {"calls": steps, "model_calls_counted": _r(calls), "seconds_per_image": _r(sec)} | ev
        row |= {"fd_ref": _r(frechet_distance(feats, self.ref_feats))} | {
            k.replace("psnr_db", "psnr_ref_db"): v for k, v in psnrs(images, self.ref_images).items()
        }
        return row


def samplers(a, save) -> dict:
    """The samplers part: a curve per sampler, then the searched schedules, `save(results so far)` after each."""
    from stablekit.eval.metrics import frechet_distance

    ev = _Evaluation(a)
    ref_eval, _, _ = ev.judge.evaluate(ev.ref_images)
    res = {
        "model": str(a.model or "stablekit-default"),
        "guidance": a.guidance,
        "prompts": a.prompts,
        "prompt_seed": a.prompt_seed,
        "fd_real_vs_real": _r(frechet_distance(ev.judge.real2, ev.judge.real)),
        "reference": {"sampler": "dpm++", "steps": a.reference_steps} | ref_eval,
        "calls": list(a.calls),
        "curves": {},
        "searched": [],
        "searched_stacks": [],
    }
    for name in a.samplers:
        res["curves"][name] = _curve(ev, name)
        save(res)
    calib = _calibration_prompts(a.calib_prompts, a.prompt_seed + 1000, set(ev.prompts))
    for budget in a.search_budgets:
        _searched(ev, budget, calib, res)
        save(res)
    return res


def _curve(ev: _Evaluation, name: str) -> list[dict]:
    """One sampler at every ``--calls`` (DPM-Solver++ also at the search budgets: the searched schedules' peer)."""
    a, curve = ev.a, []
    for n in sorted(set(a.calls) | (set(a.search_budgets) if name == "dpm++" else set())):
        try:
            curve.append(ev.point([sampler_plugin(name)], n, f"samplers: {name} {n} calls", key=(name, n)))
        except Exception as err:
            curve.append({"calls": n, "error": f"{type(err).__name__}: {err}"})
        keys = ("attr_acc_mean", "fd_real", "fd_ref", "error")
        print(f"samplers: {name} {n} calls: " + json.dumps({k: curve[-1].get(k) for k in keys}), flush=True)
    return curve


def _searched(ev: _Evaluation, budget: int, calib: list[str], res: dict):
    """Search a schedule of `budget` calls, evaluate it against DPM-Solver++ at the same calls, and each
    ``--search-stacks`` feature cache on top of it."""
    from stablekit import SchedulerPlugin
    from stablekit.sampling import SearchedScheduler, search_schedule

    a, t0 = ev.a, time.perf_counter()
    found = search_schedule(
        ev.pipe,
        calib,
        budget=budget,
        reference_steps=a.search_reference_steps,
        generations=a.search_generations,
        children=a.search_children,
        guidance_scale=a.guidance,
        metric=feature_fd(ev.pipe, ev.judge) if a.search_metric == "fd" else None,
    )
    search_s = time.perf_counter() - t0
    path = a.json.with_name(f"{a.json.stem}_schedule{budget}.json")
    found.schedule.save(path)
    plugin = SchedulerPlugin(SearchedScheduler, schedule=found.schedule.to_dict())
    row = ev.point([plugin], budget, f"samplers: searched {budget} calls", key=("searched", budget))
    row |= {
        "plugin": _common.plugin_config(plugin),
        "schedule": found.schedule.to_dict(),
        "schedule_file": str(path),
        "search_metric": a.search_metric,
        "calibration_loss": _r(found.loss),
        "dpm_solver_calibration_loss": _r(found.baseline_loss),
        "schedules_evaluated": found.evaluated,
        "search_seconds": _r(search_s),
        "calibration_prompts": calib,
    }
    if ("dpm++", budget) in ev.feats:
        row["fd_real_minus_dpm"] = fd_delta(ev.feats[("searched", budget)], ev.feats[("dpm++", budget)], ev.judge.real)
    res["searched"].append(row)
    keys = ("attr_acc_mean", "fd_real", "fd_ref", "calibration_loss")
    print(f"samplers: searched {budget} calls: " + json.dumps({k: row.get(k) for k in keys}), flush=True)
    scheduler = ("searched", SearchedScheduler, {"schedule": found.schedule.to_dict()})
    plain_macs = count_macs(ev.pipe, Method("searched", scheduler=scheduler), ev.prompts[0], budget, a.guidance)
    for spec in a.search_stacks:  # the searched schedule with a feature cache on top
        res["searched_stacks"].append(_stack(ev, spec, scheduler, budget, plain_macs))


def _stack(ev: _Evaluation, spec: str, scheduler: tuple, budget: int, plain_macs: int) -> dict:
    label = f"searched {budget} calls + {spec}"
    m = Method.parse(spec)
    m.scheduler = scheduler
    try:
        stack = ev.point(m.plugins(), budget, f"samplers: {label}")
        macs = count_macs(ev.pipe, m, ev.prompts[0], budget, ev.a.guidance)
        stack |= {
            "label": label,
            "plugins": [_common.plugin_config(p) for p in m.plugins()],
            "mac_speedup_over_searched": _r(plain_macs / macs),
            "full_call_equivalents": _r(budget * macs / plain_macs),
        }
    except Exception as err:
        stack = {"label": label, "error": f"{type(err).__name__}: {err}"}
    keys = ("attr_acc_mean", "fd_real", "full_call_equivalents", "error")
    print(f"samplers: {label}: " + json.dumps({k: stack.get(k) for k in keys}), flush=True)
    return stack


def fd_delta(feats: torch.Tensor, other: torch.Tensor, real: torch.Tensor, reps: int = 200, seed: int = 0) -> dict:
    """Fréchet distance to the renders of `feats` minus that of `other` (both images of the same prompts, row i of
    each and of `real` from prompt i), with a paired bootstrap 95% interval over prompts."""
    from stablekit.eval.metrics import frechet_distance

    def delta(idx):
        return frechet_distance(feats[idx], real[idx]) - frechet_distance(other[idx], real[idx])

    n = len(feats)
    rng = np.random.default_rng(seed)
    boots = [delta(rng.integers(0, n, n)) for _ in range(reps)]
    return {"value": _r(delta(np.arange(n))), "ci95": [_r(np.quantile(boots, 0.025)), _r(np.quantile(boots, 0.975))]}


def _searched_points(res: dict, key: str) -> list[tuple]:
    """(calls, value of `key`, scatter style) of each searched schedule (a black star) and of each searched
    stack with a value (a grey plus, at its MAC-equivalent calls)."""
    points = [
        (s["calls"], s[key], dict(marker="*", s=150, color="black", label=f"searched ({s['calls']} calls)"))
        for s in res["searched"]
    ]
    stack = dict(marker="P", s=80, color="dimgray")
    return points + [
        (s["full_call_equivalents"], s[key], dict(stack, label=f"{s['label']} (at its MAC-equivalent calls)"))
        for s in res.get("searched_stacks", [])
        if s.get(key) is not None
    ]


def plot_samplers(res: dict, path: Path):
    plt = _common.pyplot()
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
        for x, y, style in _searched_points(res, key):
            ax.scatter([x], [y], zorder=3, **style)
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
