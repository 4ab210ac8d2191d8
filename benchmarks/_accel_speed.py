"""The accel benchmark's speed part: wall-clock speed-ups on an SD-1.5-architecture UNet (see ``accel.py``)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import time
from pathlib import Path

import _common
import numpy as np
import torch
from _accel_methods import MacCounter, Method, mac_check

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
SPEED_PROMPT = "a photograph of an astronaut riding a horse on the moon"
SPEED_GUIDANCE = 7.5  # > 1: classifier-free guidance, UNet batch 2


# ---------------------------------------------------------------- the machine


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


# ---------------------------------------------------------------- part 1: speed


def speed_pipeline(kind: str):
    """StableDiffusionPipeline around an SD-1.5-architecture UNet with random weights (compute only)."""
    cfg = SD15_UNET if kind == "sd15" else TINY_UNET
    width = cfg["cross_attention_dim"]
    text = dict(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=max(1, width // 64)
    )
    vae = dict(
        block_out_channels=(32,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
    )  # never run with output_type="latent"; sets the factor 8
    return _common.random_sd_pipeline(cfg, vae, text)


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


def speed(a, methods: list[Method], save) -> dict:
    """The speed part: every (size, steps) run, `save(results so far)` after each."""
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
        "scheduler": "DDIMScheduler " + json.dumps(_common.SD15_SCHEDULER),
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
            save(res)
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
    """One size and step count: a warm-up per entry, then ``--repeats`` timed rounds of every entry."""
    rows, outputs = {}, {}
    for e in entries:
        rows[e.label] = _warm_up(pipe, e, size, steps, a.seed, outputs)
    alive = [e for e in entries if "error" not in rows[e.label]]
    times = _timed_rounds(pipe, alive, rows, size, steps, a)
    for e in alive:
        _speed_stats(rows[e.label], times, rows["plain"])
    for e in alive:  # the package against our DeepCache at the same setting
        ours = next((m for m in alive if e.peer and not m.peer and m.peer_setting() == e.peer), None)
        if ours is not None:
            rows[e.label]["vs_ours"] = _vs_ours(ours.label, outputs[ours.label], outputs[e.label], times, e.label)
    return {"size": size, "steps": steps, "entries": list(rows.values())}


def _warm_up(pipe, e: Method, size: int, steps: int, seed: int, outputs: dict) -> dict:
    """An entry's untimed first run: its MACs counted, its output kept in `outputs`; an error is recorded."""
    kind = "peer" if e.peer else "plain" if e.label == "plain" else "ours"
    row = {"label": e.label, "kind": kind, "steps_run": e.steps(steps)}
    try:
        with MacCounter(pipe.unet) as mc:
            t, outputs[e.label] = _speed_call(pipe, e, size, steps, seed)
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
    return row


def _timed_rounds(pipe, alive: list[Method], rows: dict, size: int, steps: int, a) -> dict:
    """{label: {round: seconds}}: every entry once a round, the order rotating per round."""
    times = {e.label: {} for e in alive}
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
    return times


def _paired(times: dict, x: str, y: str) -> list[float]:
    """Time of x / time of y, in each round both ran."""
    return [times[x][r] / times[y][r] for r in times[x] if r in times[y]]


def _speed_stats(row: dict, times: dict, plain: dict):
    """Seconds, speed-up over plain (per round, paired) and the MAC ratio of one entry's row."""
    ts = list(times[row["label"]].values())
    if not ts:
        return
    row["seconds"] = _common.rounds(ts)
    if times.get("plain") and _paired(times, "plain", row["label"]):
        row["speedup"] = _common.rounds(_paired(times, "plain", row["label"]))
    if plain.get("gmacs") and row.get("gmacs"):
        row["mac_speedup"] = _r(plain["gmacs"] / row["gmacs"])
        if "speedup" in row:
            row["achieved_over_ideal"] = _r(row["speedup"]["median"] / row["mac_speedup"])


def _vs_ours(ours: str, x: torch.Tensor, y: torch.Tensor, times: dict, label: str) -> dict:
    """The package's output against ours, and the time ratio ours / package per round."""
    x, y = x.float(), y.float()
    ratio = _paired(times, ours, label)
    return {
        "ours": ours,
        "equal": bool(torch.equal(x, y)),
        "allclose": bool(torch.allclose(x, y, 1e-4, 1e-5)),
        "max_abs_diff": _r((x - y).abs().max()),
        "rel_l2": _r((x - y).norm() / y.norm()),
        "time_ratio_ours_over_package": _common.rounds(ratio) if ratio else None,
    }


def _per_call(calls: list[int]) -> dict:
    """{GMACs of a call: how many calls had it}, e.g. a full and a shallow step."""
    out = {}
    for c in calls:
        key = f"{c / 1e9:.4g}"
        out[key] = out.get(key, 0) + 1
    return out


def plot_speed(res: dict, path: Path):
    plt = _common.pyplot()
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
    _common.save_figure(fig, path)
