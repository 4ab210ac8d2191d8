"""Few-step students and compressed UNets against their teacher: attribute accuracy, classifier Fréchet distance,
UNet calls, MACs, parameters, UNet latency and seconds per image on held-out prompts, in one table.

    stablekit bench students --json bench_out/students.json --prompts 200
    stablekit bench students --json bench_out/students.json --student runs/instaflow:1
    stablekit bench students --json bench_out/compressed.json --student none --compressed runs/laptop
    stablekit bench students --json bench_out/sun.json --student none --speedupnet runs/sun/speedupnet.safetensors

Each row is ``MODEL:STEPS[:GUIDANCE]`` (the teacher at 25 and 4 steps, and every student at its own steps and
guidance, by default the shipped one-step student). Every row draws the same held-out prompts (seed 777) with the
same fresh noise per prompt; the judge is the embedded model's attribute classifier. Each row's accuracy is
compared with the 25-step teacher's by a paired bootstrap (points, 95% interval); the targets: a one-step student
within 5 points, a 4-step one within 2, a compressed UNet (``--compressed``: sampled like the teacher's first row) at
half the MACs within 3. After the rows, every row's UNet is timed on the same guided batch in this process, the
models taking turns, and its latency is reported as a ratio to the first row's (mean over rounds, 95% interval).
``--speedupnet FILE`` adds rows of the teacher with that SpeedUpNet adapter, unguided, at ``--speedupnet-steps``;
``--teacher MODEL`` takes another teacher (a fine-tuned copy, say, for the adapter's transfer without retraining).
"""

from __future__ import annotations

import argparse
import json
import time

import _common
import torch

TEACHER = "stablekit-default"


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench students", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=777, seed_help="held-out prompt and noise seed", model=False)
    p.add_argument("--prompts", type=int, default=200, help="held-out single-object prompts")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[25, 4], help="the teacher's rows")
    p.add_argument(
        "--student",
        action="append",
        default=None,
        metavar="MODEL:STEPS[:GUIDANCE]",
        help="a student row (repeatable) [default: stablekit-default-1step:1:1; 'none': no student rows]",
    )
    p.add_argument("--compressed", action="append", default=[], metavar="MODEL", help="a compressed model's row")
    p.add_argument("--latency-rounds", type=int, default=20, help="rounds of the interleaved UNet timing")
    p.add_argument("--lcm-lora", default=None, metavar="FILE", help="an LCM-LoRA for the teacher (its own rows)")
    p.add_argument("--lcm-steps", type=int, nargs="+", default=[2, 4, 8], help="steps of the LCM-LoRA rows")
    p.add_argument("--speedupnet", default=None, metavar="FILE", help="a SpeedUpNet adapter for the teacher")
    p.add_argument("--speedupnet-steps", type=int, nargs="+", default=[4], help="steps of the SpeedUpNet rows")
    p.add_argument("--teacher", default=TEACHER, help="the teacher's model (a name or folder)")
    p.add_argument("--device", default=None)
    return p.parse_args(args)


def rows(a) -> list[tuple]:
    """(model, steps, guidance, LCM-LoRA or SpeedUpNet file or None) of each row: the teacher's, then the students'
    (guidance 1 unless given), then the teacher with the LCM-LoRA, then with the SpeedUpNet adapter."""
    out = [(a.teacher, s, 7.5, None) for s in a.teacher_steps]
    for spec in [s for s in a.student or ["stablekit-default-1step:1:1"] if s != "none"]:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"--student {spec}: write MODEL:STEPS[:GUIDANCE], e.g. runs/instaflow:1")
        out.append((parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else 1.0, None))
    out += [(a.teacher, s, 1.0, a.lcm_lora) for s in (a.lcm_steps if a.lcm_lora else [])]
    out += [(a.teacher, s, 1.0, a.speedupnet) for s in (a.speedupnet_steps if a.speedupnet else [])]
    return out + [(model, a.teacher_steps[0], 7.5, None) for model in a.compressed]


def unet_macs(pipe, texts: int = 1) -> int:
    """Multiply-accumulates of one UNet call on one latent (FLOPs / 2, counted by torch); `texts` prompt embeddings
    travel concatenated (2 with SpeedUpNet: the prompt's and the negative prompt's)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    c = unet.config
    x = torch.zeros(1, c.in_channels, c.sample_size, c.sample_size, dtype=unet.dtype)
    text = torch.zeros(1, texts * pipe.tokenizer.model_max_length, c.cross_attention_dim, dtype=unet.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500]), text)
    return counter.get_total_flops() // 2


def run_row(row, prompts, judge, a) -> tuple[dict, object]:
    import stablekit
    from stablekit.eval.harness import generate
    from stablekit.train.speedupnet import SpeedUpNet

    model, steps, guidance, lora = row
    pipe = stablekit.load(model, device=a.device)
    sun = lora is not None and lora == a.speedupnet
    if lora:
        stablekit.use(pipe, SpeedUpNet.load(lora) if sun else stablekit.accel.LCMLoRA(lora))
    rescale = stablekit.pipeline.guidance_rescale(pipe) if guidance > 1 else 0.0
    images, seconds = generate(
        pipe,
        prompts,
        steps=steps,
        guidance=guidance,
        seed=a.seed,
        batch=a.batch,
        guidance_rescale=rescale,
        desc=f"{model}:{steps}",
    )
    scores, matches, _ = judge.evaluate(images)
    calls = steps * (2 if guidance > 1 else 1)
    res = {
        "model": model,
        "steps": steps,
        "guidance": guidance,
        "lcm_lora": None if sun else lora,
        "unet_calls": calls,
    }
    res["speedupnet"] = lora if sun else None
    res |= {
        "macs_per_image": calls * unet_macs(pipe, 2 if sun else 1),
        "seconds_per_image": round(seconds, 4),
        **scores,
    }
    res["unet_parameters"] = sum(p.numel() for p in pipe.unet.parameters())
    return res, matches, pipe


def main(args: list[str]) -> dict:
    a = parse(args)
    _common.set_threads(a)
    from stablekit.eval.harness import Judge, heldout_prompts, paired_delta

    scenes, prompts = heldout_prompts(a.prompts, 0, a.seed)
    judge = Judge(scenes, a.seed)
    res = {"prompts": a.prompts, "seed": a.seed, "rows": []}
    ref = None
    pipes = []
    for i, row in enumerate(rows(a)):
        out, matches, pipe = run_row(row, prompts, judge, a)
        pipes.append(pipe)
        out["role"] = "teacher" if i < len(a.teacher_steps) else "student"  # LCM-LoRA rows count as students
        out["role"] = "compressed" if row[0] in a.compressed else out["role"]
        ref = matches if ref is None else ref
        out["delta_vs_first_points"] = paired_delta(matches, ref)
        res["rows"].append(out)
        res["targets"] = targets(res["rows"], a.prompts)
        _common.write_json(a.json, res)  # a stopped run keeps the rows it finished
    latencies = unet_latency([p.unet for p in pipes], a.batch, a.latency_rounds)
    for r, latency in zip(res["rows"], latencies, strict=True):
        r |= latency
    _common.write_json(a.json, res)
    plot(res, a.json.with_suffix(".png"))
    print(json.dumps([{k: r[k] for k in ("model", "steps", "attr_acc_mean", "fd_real")} for r in res["rows"]]))
    return res


def unet_latency(unets: list, batch: int, rounds: int) -> list[dict]:
    """Each UNet's seconds per call on the same guided batch (2 x `batch` latents), the UNets taking turns in each
    round; its ratio to the first UNet's, per round, as a mean with a 95% bootstrap interval."""
    import numpy as np

    c = unets[0].config
    x = torch.randn(2 * batch, c.in_channels, c.sample_size, c.sample_size, dtype=unets[0].dtype)
    text = torch.zeros(2 * batch, 16, c.cross_attention_dim, dtype=unets[0].dtype)
    t = torch.full((2 * batch,), 500)
    seconds = np.zeros((rounds + 1, len(unets)))
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up
            for i, unet in enumerate(unets):
                t0 = time.perf_counter()
                unet(x.to(unet.device), t.to(unet.device), text.to(unet.device))
                seconds[r, i] = time.perf_counter() - t0
    ratios = seconds[1:] / seconds[1:, :1]
    rng = np.random.default_rng(0)
    boot = ratios[rng.integers(0, rounds, (2000, rounds))].mean(1)
    return [
        {
            "unet_seconds_per_call": round(float(np.median(seconds[1:, i])), 5),
            "latency_vs_first": round(float(ratios[:, i].mean()), 4),
            "latency_vs_first_ci95": [round(float(v), 4) for v in np.percentile(boot[:, i], [2.5, 97.5])],
        }
        for i in range(len(unets))
    ]


def label(r: dict) -> str:
    return (
        f"{r['model']}:{r['steps']}"
        + (" + LCM-LoRA" if r.get("lcm_lora") else "")
        + (" + SpeedUpNet" if r.get("speedupnet") else "")
    )


def targets(rows_: list[dict], n: int) -> dict:
    """The targets: a one-step student within 5 points of the 25-step teacher, a 4-step one within 2, a compressed
    UNet at half the teacher's MACs (or fewer) within 3."""
    bounds = {1: -5.0, 4: -2.0}
    out = {}
    for r in rows_:
        if r["role"] == "compressed":
            d = r["delta_vs_first_points"]
            share = r["macs_per_image"] / rows_[0]["macs_per_image"]
            name = f"{r['model']} ({share:.2f} of the teacher's MACs) within 3 points of the 25-step teacher"
            out[name] = _common.target(d["points"], d["ci95"], -3.0, ">=", n, 100, half_the_macs=share <= 0.5)
        if r["role"] != "student" or r["steps"] not in bounds:
            continue
        d, bound = r["delta_vs_first_points"], bounds[r["steps"]]
        name = f"{label(r)} within {-bound:g} points of the 25-step teacher"
        out[name] = _common.target(d["points"], d["ci95"], bound, ">=", n, 100)
    return out


def plot(res: dict, path) -> None:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["rows"]:
        ax.scatter(r["macs_per_image"] / 1e9, 100 * r["attr_acc_mean"], label=label(r))
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per image (UNet)")
    ax.set_ylabel("attribute accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
