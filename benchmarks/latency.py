"""``stablekit bench latency``: where the wall-clock time of ``stablekit generate`` goes, and how near the UNet
runs to the machine's own limits, in float32 and bfloat16.

* **command line** -- ``stablekit --help``, ``stablekit generate --help`` and ``stablekit generate PROMPT -o
  FILE`` with the embedded model, each timed as a fresh process over rounds (the first generate run is kept
  apart: it may build caches); the interpreter's import of the generation stack timed alone, and its biggest
  imports from ``python -X importtime``.
* **breakdown** of one ``generate`` in process: load, prompt encoding, each denoising step (step callbacks'
  timestamps), decoding, saving the PNG.
* **UNet** per call: seconds and achieved GFLOP/s (FLOPs counted by ``torch.utils.flop_counter``) for the embedded
  model at batch 1, 2 and 32 and an SD-1.5-architecture UNet (random weights) at ``--sd15-size`` px and batch 2
  (one guided step), against the fp32 and bf16 matmul rates measured in the same run; with ``--peer openvino``
  the same SD-1.5 UNet compiled by OpenVINO at each precision beside ours.
* **accuracy** of bfloat16 against float32: the judge's attribute accuracy on held-out prompts, paired.

Everything is timed over ``--rounds`` rounds and judged on 95% intervals (:mod:`_common`). JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch

PROMPT = "a red star on a gray background"
TINY_SD15 = dict(sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32)


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stablekit bench latency", description=__doc__.splitlines()[0])
    _common.add_common_args(p, seed=0, model=False)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of everything")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of the generate runs")
    p.add_argument("--batches", default="1,2,32", help="batches of the embedded UNet")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--sd15-size", type=int, default=512, help="image side of the SD-1.5 UNet (0: skip it)")
    p.add_argument("--tiny-sd15", action="store_true", help="a tiny UNet of the SD-1.5 block layout (for tests)")
    p.add_argument("--matmul", type=int, default=1024, help="side of the square matmuls that measure the peak")
    p.add_argument("--accuracy-prompts", type=int, default=32, help="held-out prompts of the bf16 check (0: skip)")
    p.add_argument("--cli-rounds", type=int, default=None, help="fresh-process rounds [default: --rounds]; 0: skip")
    p.add_argument("--peer", choices=("none", "openvino"), default="none")
    p.add_argument("--folder-size", type=int, default=256, help="image side of the SD-1.5 folder runs (0: skip)")
    p.add_argument("--folder", type=Path, default=Path("bench_out/sd15-random"), help="where that folder is kept")
    return p.parse_args(args)


# ---------------------------------------------------------------- the machine's limits


def matmul_rates(n: int, dtypes: list[str], rounds: int) -> dict:
    """GFLOP/s of an n x n x n matmul per dtype, over rounds (each the best of 3 calls)."""
    out = {}
    for name in dtypes:
        a = torch.randn(n, n).to(getattr(torch, name))
        b = torch.randn(n, n).to(getattr(torch, name))
        a @ b
        per = []
        for _ in range(rounds):
            best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(3))
            per.append(2 * n**3 / best / 1e9)
        out[name] = _common.rounds(per)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- UNet calls


def unet_inputs(unet, batch: int, side: int, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    c = unet.config
    return dict(
        sample=torch.randn(batch, c.in_channels, side, side, generator=g).to(dtype),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, c.cross_attention_dim, generator=g).to(dtype),
    )


def unet_row(unet, inputs: dict, rounds: int, peaks: dict, dtype: str) -> dict:
    """Seconds per call over rounds, the FLOPs of one call, and the achieved rate against each matmul peak."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            unet(**inputs)
        flops = counter.get_total_flops()
        seconds = [_timed(lambda: unet(**inputs)) for _ in range(rounds)]
    timing = _common.rounds(seconds)
    rate = flops / timing["median"] / 1e9
    return {
        "dtype": dtype,
        "batch": int(inputs["sample"].shape[0]),
        "side": int(inputs["sample"].shape[-1]),
        "seconds": timing,
        "gflop": _common.rnd(flops / 1e9),
        "gflop_per_s": _common.rnd(rate),
        "of_peak": {k: _common.rnd(rate / v["median"]) for k, v in peaks.items()},
    }


def unet_rows(unet, batches: list[int], side: int, dtypes: list[str], rounds: int, peaks: dict) -> list[dict]:
    rows = []
    for name in dtypes:
        dtype = getattr(torch, name)
        unet.to(dtype)
        for batch in batches:
            rows.append(unet_row(unet, unet_inputs(unet, batch, side, dtype), rounds, peaks, name))
            print(f"unet {name} batch {batch}: {rows[-1]['seconds']['median']} s", flush=True)
    unet.to(torch.float32)
    return rows


def sd15_unet(a):
    from _accel_speed import SD15_UNET
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(dict(SD15_UNET, **TINY_SD15) if a.tiny_sd15 else SD15_UNET)).eval()


def openvino_rows(unet, side: int, dtypes: list[str], rounds: int) -> list[dict]:
    """The same UNet converted by OpenVINO and compiled for the CPU at each inference precision, batch 2."""
    import openvino as ov

    inputs = unet_inputs(unet, 2, side, torch.float32)
    model = ov.convert_model(PlainUNet(unet).eval(), example_input=tuple(inputs.values()))
    feed = [v.numpy() for v in inputs.values()]
    rows = []
    for name in dtypes:
        precision = {"float32": "f32", "bfloat16": "bf16"}[name]
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        compiled(feed)
        seconds = [_timed(lambda c=compiled, f=feed: c(f)) for _ in range(rounds)]
        timing = _common.rounds(seconds)
        row = {"dtype": name, "batch": 2, "side": side, "seconds": timing, "engine": f"openvino {ov.__version__}"}
        rows.append(row)
        print(f"openvino {name}: {timing['median']} s", flush=True)
    return rows


class PlainUNet(torch.nn.Module):
    """The UNet as a module of positional tensors returning a tensor (what a graph converter traces)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


# ---------------------------------------------------------------- generate, in process


def breakdown(pipe_load, steps: int, rounds: int, out_dir: Path) -> dict:
    """Seconds of load, prompt encoding, each denoising step, decoding and saving, over rounds."""
    from stablekit.output import save_png

    parts = {k: [] for k in ("load", "encode", "denoise", "step", "decode", "save")}
    for r in range(rounds):
        t0 = time.perf_counter()
        pipe = pipe_load()
        parts["load"].append(time.perf_counter() - t0)
        with torch.inference_mode():
            parts["encode"].append(_timed(lambda p=pipe: p.encode_prompt(PROMPT, "cpu", 1, True)))
            stamps = []

            def stamp(p, i, t, kw, stamps=stamps):
                stamps.append(time.perf_counter())
                return kw

            g = torch.Generator().manual_seed(r)
            latents = pipe(
                PROMPT, num_inference_steps=steps, generator=g, output_type="latent", callback_on_step_end=stamp
            )
            latents = latents.images
            parts["denoise"].append(stamps[-1] - stamps[0])
            parts["step"].append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1))
            t0 = time.perf_counter()
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
            image = pipe.image_processor.postprocess(image, output_type="pil")[0]
            parts["decode"].append(time.perf_counter() - t0)
        parts["save"].append(_timed(lambda im=image: save_png(im, out_dir / "breakdown.png", {"prompt": PROMPT})))
    return {k: _common.rounds(v) for k, v in parts.items()}


# ---------------------------------------------------------------- the command line, in fresh processes


def cli_times(steps: int, rounds: int, out_dir: Path) -> dict:
    """Wall seconds of fresh ``stablekit`` processes over rounds; the first generate apart."""
    env = dict(os.environ)
    base = [sys.executable, "-c", "from stablekit.cli import main; main()"]
    gen = [*base, "generate", PROMPT, "-o", str(out_dir / "s.png"), "--steps", str(steps)]
    runs = {
        "help": [*base, "--help"],
        "generate_help": [*base, "generate", "--help"],
        "import_generation_stack": [sys.executable, "-c", "import stablekit.output, stablekit.cli.generate"],
    }
    out = {"generate_first_s": _common.rnd(_run(gen, env))}
    for name, cmd in runs.items():
        out[name] = _common.rounds([_run(cmd, env) for _ in range(rounds)])
    out["generate"] = _common.rounds([_run(gen, env) for _ in range(rounds)])
    out["biggest_imports_s"] = biggest_imports(env)
    return out


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def biggest_imports(env: dict, top: int = 8) -> dict:
    """Cumulative seconds of the top-level packages that ``import stablekit.output`` pulls in (``-X importtime``)."""
    cmd = [sys.executable, "-X", "importtime", "-c", "import stablekit.output"]
    err = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stderr
    totals = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)$", line)
        if m and "." not in m[2]:  # a top-level package
            totals[m[2]] = max(totals.get(m[2], 0), int(m[1]) / 1e6)
    return {k: _common.rnd(v) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:top]}


# ---------------------------------------------------------------- an SD-1.5-sized folder through the command line

SD_VAE = dict(  # runwayml/stable-diffusion-v1-5 vae/config.json
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=32,
    layers_per_block=2,
    sample_size=512,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def sd15_folder(a) -> Path:
    """A diffusers folder of SD 1.5's architecture (UNet, VAE, 12-layer CLIP text encoder; random weights), saved
    once at ``a.folder`` and reused."""
    from _accel_speed import SD15_UNET

    if (a.folder / "model_index.json").exists():
        return a.folder
    if a.tiny_sd15:
        tiny_vae = dict(SD_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1)
        tiny_text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1)
        pipe = _common.random_sd_pipeline(dict(SD15_UNET, **TINY_SD15), tiny_vae, tiny_text)
    else:
        pipe = _common.random_sd_pipeline(SD15_UNET, SD_VAE, CLIP_L)
    pipe.save_pretrained(a.folder)
    return a.folder


def folder_times(a, out_dir: Path) -> dict:
    """Fresh ``stablekit generate --model FOLDER`` processes with 1 and 3 steps, alternated over rounds; the fixed
    cost of a call (everything but the steps) is the 1-step time less one step, a step being half the difference."""
    folder = sd15_folder(a)
    side = f"{a.folder_size}x{a.folder_size}"
    base = [sys.executable, "-c", "from stablekit.cli import main; main()", "generate", PROMPT, "--model", str(folder)]
    _run([*base, "--steps", "1", "--size", side, "-o", str(out_dir / "warm.png")], dict(os.environ))  # page cache
    times = {1: [], 3: []}
    for _ in range(a.rounds):
        for steps in times:
            cmd = [*base, "--steps", str(steps), "--size", side, "-o", str(out_dir / f"f{steps}.png")]
            times[steps].append(_run(cmd, dict(os.environ)))
    fixed = [t1 - (t3 - t1) / 2 for t1, t3 in zip(times[1], times[3], strict=True)]
    size_gb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9
    return {
        "folder_gb": _common.rnd(size_gb),
        "side": a.folder_size,
        "steps_1": _common.rounds(times[1]),
        "steps_3": _common.rounds(times[3]),
        "fixed_cost": _common.rounds(fixed),
    }


# ---------------------------------------------------------------- bf16 accuracy


def accuracy(n: int, steps: int, seed: int) -> dict:
    """The judge's attribute accuracy of the embedded model in float32 and bfloat16 on `n` held-out prompts."""
    import stablekit
    from stablekit.eval.harness import Judge, generate, heldout_prompts, paired_delta

    scenes, prompts = heldout_prompts(n - n // 4, n // 4, seed)
    judge = Judge(scenes, seed)
    matches, out = {}, {}
    for name in ("float32", "bfloat16"):
        pipe = stablekit.load(device="cpu", dtype=name)
        images, per_image = generate(pipe, prompts, steps=steps, guidance=7.5, seed=seed, guidance_rescale=0.7)
        matches[name] = judge.matches(images)
        out[name] = {"attr_acc_mean": _common.rnd(matches[name].mean()), "s_per_image": _common.rnd(per_image)}
    out["bf16_minus_fp32"] = paired_delta(matches["bfloat16"], matches["float32"], seed)
    out["n"] = n
    return out


# ---------------------------------------------------------------- targets, plot, main


def paired_ratio(num: dict, den: dict) -> dict:
    """Round-by-round ratios of two timings (as :func:`_common.rounds` gives them), over rounds."""
    return _common.rounds([x / y for x, y in zip(num["all"], den["all"], strict=False)])


def targets(res: dict) -> dict:
    t = {}
    cli = res.get("cli")
    if cli:
        t["help_under_0_5s"] = _common.combined(
            {
                k: _common.target(cli[k]["median"], cli[k]["ci95"], 0.5, "<", cli[k]["n"], 3)
                for k in ("help", "generate_help")
            }
        )
        g = cli["generate"]
        t["generate_under_3_5s"] = _common.target(g["median"], g["ci95"], 3.5, "<", g["n"], 3)
        t["first_generate_not_over_8_2s"] = _common.exact(
            cli["generate_first_s"] <= 8.2, value=cli["generate_first_s"]
        )
    d = res["breakdown"]["denoise"]
    t["steps_under_0_5s"] = _common.target(d["median"], d["ci95"], 0.5, "<", d["n"], 3, steps=res["config"]["steps"])
    acc = res.get("accuracy")
    if acc:
        delta = acc["bf16_minus_fp32"]
        t["bf16_accuracy_within_1_point"] = _common.target(
            delta["points"], delta["ci95"], (-1, 1), "within", acc["n"], 32
        )
        per_image = acc["float32"]["s_per_image"]
        t["batched_s_per_image_le_0_273"] = _common.exact(per_image <= 0.41 / 1.5, value=per_image, n=1)
    sd = {r["dtype"]: r["seconds"] for r in res["unet"]["sd15"]}
    if {"float32", "bfloat16"} <= set(sd):
        t["sd15_bf16_speedup_ge_1_8"] = _common.speedup_target(paired_ratio(sd["float32"], sd["bfloat16"]), 1.8, ">=")
    fc = res.get("folder")
    if fc:
        f = fc["fixed_cost"]
        t["sd15_folder_fixed_cost_under_5s"] = _common.target(f["median"], f["ci95"], 5, "<", f["n"], 3)
    for row in res.get("peer", []):
        if row["dtype"] in sd:
            ratio = paired_ratio(sd[row["dtype"]], row["seconds"])
            t[f"sd15_{row['dtype']}_vs_openvino_le_1_1"] = _common.speedup_target(ratio, 1.1, "<=")
    return t


def plot(res: dict, path: Path) -> None:
    plt = _common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    parts = {k: v["median"] for k, v in res["breakdown"].items() if k != "step"}
    left.bar(list(parts), list(parts.values()), color="tab:blue")
    left.set_ylabel("seconds (median over rounds)")
    left.set_title(f"generate in process, {res['config']['steps']} steps")
    rows = [
        (f"{m} {r['dtype'][:4]} b{r['batch']}", r["gflop_per_s"]) for m in ("embedded", "sd15") for r in res["unet"][m]
    ]
    right.barh([r[0] for r in rows], [r[1] for r in rows], color="tab:green")
    for (name, peak), style in zip(res["matmul_gflop_per_s"].items(), ("--", ":"), strict=False):
        right.axvline(peak["median"], color="k", linestyle=style, label=f"{name} matmul peak")
    right.set_xlabel("achieved GFLOP/s per UNet call")
    right.legend()
    _common.save_figure(fig, path, dpi=100)


def main(args: list[str]) -> dict:
    import stablekit

    a = parse(args)
    _common.set_threads(a)
    dtypes = a.dtypes.split(",")
    out_dir = Path(tempfile.mkdtemp(prefix="stablekit-latency-"))
    res = {
        "config": vars(a) | {"json": str(a.json), "folder": str(a.folder)},
        "torch": torch.__version__,
        "load_avg": [os.getloadavg()],
    }
    res["matmul_gflop_per_s"] = matmul_rates(a.matmul, dtypes, a.rounds)
    cli_rounds = a.rounds if a.cli_rounds is None else a.cli_rounds
    if cli_rounds:
        res["cli"] = cli_times(a.steps, cli_rounds, out_dir)
    res["breakdown"] = breakdown(lambda: stablekit.load(device="cpu"), a.steps, a.rounds, out_dir)
    embedded = stablekit.load(device="cpu").unet
    batches = [int(b) for b in a.batches.split(",")]
    peaks = res["matmul_gflop_per_s"]
    res["unet"] = {
        "sd15": [],
        "embedded": unet_rows(embedded, batches, embedded.config.sample_size, dtypes, a.rounds, peaks),
    }
    save(res, a)
    if a.accuracy_prompts:
        res["accuracy"] = accuracy(a.accuracy_prompts, a.steps, a.seed)
        save(res, a)
    if a.folder_size:
        res["folder"] = folder_times(a, out_dir)
        save(res, a)
    if a.sd15_size:
        unet = sd15_unet(a)
        for name in dtypes:
            res["unet"]["sd15"] += unet_rows(unet, [2], a.sd15_size // 8, [name], a.rounds, peaks)
            save(res, a)
        if a.peer == "openvino":
            res["peer"] = openvino_rows(unet, a.sd15_size // 8, dtypes, a.rounds)
    return save(res, a)


def save(res: dict, a) -> dict:
    """Judge the targets on what is measured so far; write the JSON and the plot."""
    res["load_avg"].append(os.getloadavg())
    res["targets"] = targets(res)
    _common.write_json(a.json, res)
    plot(res, Path(a.json).with_suffix(".png"))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
