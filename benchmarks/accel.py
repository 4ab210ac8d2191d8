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

``targets`` judges each target on its 95% interval (``benchmarks/_common.py``): "met" only when the whole
interval is on the right side, "inconclusive" when it straddles the threshold, when too few samples were taken
(100 prompts for quality and Fréchet-distance targets, 3 rounds for speed-ups) or when a speed-up's rounds disagree
by more than 5% (re-run with more ``--repeats``), "not measured" where a part did not run. Speed-up intervals are
Student-t intervals of the geometric mean of the per-round ratios; the achieved speed-up over the MAC ratio is
checked on both sides (within [0.85, 1.15]). The code is split by part: ``_accel_methods.py`` (entries, MAC
counting), ``_accel_speed.py``, ``_accel_quality.py``, ``_accel_samplers.py``. The JSON also records each entry's
plugin config (``plugins``) and is rewritten as results come in.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import _common
from _accel_methods import Method
from _accel_quality import plot_quality, quality
from _accel_samplers import plot_samplers, samplers
from _accel_speed import machine_info, plot_speed, speed
from _common import any_of, combined, exact, speedup_target, target

from stablekit.eval.harness import rnd as _r

MIN_PROMPTS = 100  # prompts a quality or Fréchet-distance target needs

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


# ---------------------------------------------------------------- targets


def targets(res: dict) -> dict:
    """The targets, each judged on its 95% interval (``_common.judge``) from whatever was measured; a target whose
    part did not run is "not measured". Timings of the tiny smoke-test UNet are not judged."""
    sp, q, smp = res.get("speed"), res.get("quality"), res.get("samplers")
    runs = sp["runs"] if sp else []
    timed = [r for r in runs if sp["unet"] == "sd15"]
    out = {"note": f"the speed part ran on the {sp['unet']} UNet: its timings are not judged"} if runs != timed else {}
    peers = [(r, e) for r in runs for e in r["entries"] if e["kind"] == "peer" and "vs_ours" in e]
    out["deepcache_equals_package"] = combined(
        {_where(r, e): exact(e["vs_ours"]["allclose"], **_equality(e["vs_ours"])) for r, e in peers}
    )
    out["deepcache_as_fast_as_package_within_3pct"] = combined(
        {
            _where(r, e): speedup_target(e["vs_ours"]["time_ratio_ours_over_package"], 1.03, "<=")
            for r, e in peers
            if r in timed
        }
    )
    out["deepcache_interval3_2x_at_512"] = combined(
        {
            _where(r, e): speedup_target(e.get("speedup"), 2.0, ">=")
            for r in timed
            if r["size"] == 512
            for e in r["entries"]
            if e["label"] == "deepcache:interval=3,branch=0"
        }
    )
    out["within_15pct_of_mac_ideal"] = combined(
        {
            _where(r, e): speedup_target(_over_ideal(e), (0.85, 1.15), "within", mac_speedup=e["mac_speedup"])
            for r in timed
            for e in r["entries"]
            if e["kind"] == "ours" and "speedup" in e and e.get("mac_speedup")
        },
        check="achieved speed-up / MAC ratio within [0.85, 1.15]: |ratio - 1| <= 0.15, both sides",
    )
    out["best_3x_within_2_points"] = _best_target(q, judge_speed=bool(timed))
    out["searched_beats_dpm_solver_on_fd"] = _searched_target(smp)
    return out


def _where(run: dict, entry: dict) -> str:
    return f"{run['size']}px {run['steps']} steps: {entry['label']}"


def _equality(vs: dict) -> dict:
    return {k: vs[k] for k in ("ours", "equal", "allclose", "max_abs_diff")}


def _over_ideal(entry: dict) -> dict:
    """The achieved speed-up over the MAC ratio, per round."""
    return _common.rounds([s / entry["mac_speedup"] for s in entry["speedup"]["all"]])


def _best_target(q: dict | None, judge_speed: bool) -> dict:
    """Some entry at least 3x faster (speed part, same steps) with attribute accuracy within 2 points."""
    parts = {}
    for e in (q or {}).get("entries", []):
        if "speed_part_speedup" not in e:
            continue
        delta = e["attr_acc_delta"]
        timing = e["speed_part_speedup"].get("rounds") if judge_speed else None
        parts[e["label"]] = combined(
            {
                "attr_acc_delta_points": target(delta["points"], delta["ci95"], -2, ">=", q["prompts"], MIN_PROMPTS),
                "speedup": speedup_target(timing, 3.0, ">="),
            }
        )
    note = "needs the speed part on the SD-1.5 UNet at the quality part's step count (largest size used)"
    return combined(parts, how=any_of, note=note)


def _searched_target(smp: dict | None) -> dict:
    """The searched schedule's Fréchet distance to renders below DPM-Solver++'s at the same calls."""
    parts = {
        f"{s['calls']} calls": target(
            d["value"], d["ci95"], 0, "<", smp["prompts"], MIN_PROMPTS, measure="searched minus DPM-Solver++"
        )
        for s in (smp or {}).get("searched", [])
        if (d := s.get("fd_real_minus_dpm"))
    }
    return combined(parts)


# ---------------------------------------------------------------- main


def parse_args(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="stablekit bench accel",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common.add_common_args(p, seed=0, seed_help="noise seed of the speed part")
    p.add_argument(
        "--parts", nargs="+", choices=["speed", "quality", "samplers"], default=["speed", "quality", "samplers"]
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="entries of parts speed and quality: accel specs, '/scheduler', '/xF' (F of the steps)",
    )
    s = p.add_argument_group("speed")
    s.add_argument("--unet", choices=["sd15", "tiny"], default="sd15")
    s.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes (pixels)")
    s.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="DDIM steps")
    s.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    s.add_argument("--no-peer", action="store_true", help="skip the DeepCache package")
    _quality_args(p.add_argument_group("quality and samplers"))
    a = p.parse_args(args)
    if "samplers" in a.parts and a.search_metric == "fd" and a.search_budgets and a.calib_prompts < 2:
        p.error("--search-metric fd needs --calib-prompts >= 2 (a Fréchet distance fits a covariance)")
    return a


def _quality_args(q):
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


def main(args: list[str]) -> dict:
    a = parse_args(args)
    _common.set_threads(a)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # schedulers built from other schedulers' configs warn of unused keys
    methods = [Method.parse(s) for s in a.methods]
    res = {
        "command": "stablekit bench accel " + shlex.join(args),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(a),
        "plugins": {m.label: [_common.plugin_config(p) for p in m.plugins()] for m in methods},
        "plots": {},
    }
    t0 = time.perf_counter()
    for part, fn, plot in (
        ("speed", lambda save: speed(a, methods, save), plot_speed),
        ("quality", lambda save: quality(a, methods, res.get("speed"), save), plot_quality),
        ("samplers", lambda save: samplers(a, save), plot_samplers),
    ):
        if part in a.parts:
            _run_part(a, res, part, fn, plot)
    res["total_seconds"] = _r(time.perf_counter() - t0)
    _save(a, res)
    print(json.dumps(res["targets"], indent=1))
    return res


def _run_part(a, res: dict, part: str, fn, plot):
    """Run one part, writing the JSON as its results come in, then its plot."""
    t = time.perf_counter()

    def save(partial: dict):
        res[part] = partial
        _save(a, res)

    res[part] = fn(save)
    res[part]["part_seconds"] = _r(time.perf_counter() - t)
    png = a.json.with_name(f"{a.json.stem}_{part}.png")
    plot(res[part], png)
    res["plots"][part] = str(png)
    _save(a, res)
    print(f"{part}: done in {time.perf_counter() - t:.0f}s; wrote {a.json} and {png}", flush=True)


def _save(a, res: dict):
    res["targets"] = targets(res)
    _common.write_json(a.json, res)


if __name__ == "__main__":
    main(sys.argv[1:])
