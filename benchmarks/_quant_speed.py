"""The quant benchmark's speed and memory part: one UNet call on an SD-1.5-architecture UNet in fp32, bf16, our
W8A8 on the int8 kernels and a peer's int8 (see ``quant.py``)."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import _common
import torch
from _accel_speed import machine_info, speed_pipeline

from stablekit.eval.harness import rnd as _r


def unet_inputs(unet, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    side = size // 8
    width = unet.config.cross_attention_dim
    return dict(
        sample=torch.randn(2, 4, side, side, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, width, generator=g),
    )


def calibrated(pipe, spec: str):
    """`spec` calibrated on one short trajectory at 64 px (with random weights, ranges only set kernel scales)."""
    from stablekit.quant import method
    from stablekit.quant.calibration import CalibrationConfig, trajectories

    m = method(spec)
    traj = trajectories(pipe, CalibrationConfig(prompts=1, steps=2, samples=2, size=64))
    return m.quantize(pipe, traj)


def memory(pipe, q4, q8) -> dict:
    """Stored weight bytes of the UNet at 4 and 8 bits (quantized layers' state plus the other parameters)."""
    fp32 = sum(p.numel() * 4 for p in pipe.unet.parameters())
    layers = [pipe.unet.get_submodule(n) for n in q4.layers]
    rest = fp32 - sum(p.numel() * 4 for m in layers for p in m.parameters())
    out = {"fp32_bytes": fp32}
    for bits, q in (("w4a8", q4), ("w8a8", q8)):
        total = q.storage_bytes() + rest
        out[f"{bits}_bytes"] = total
        out[f"{bits}_ratio"] = _r(total / fp32)
    return out


def ort_session(unet, inputs: dict, folder: Path):
    """ONNX Runtime session of the UNet exported to ONNX and quantized with its dynamic int8 quantization."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = list(inputs)
    fp32, int8 = folder / "unet.onnx", folder / "unet-int8.onnx"
    with torch.no_grad():
        torch.onnx.export(unet, tuple(inputs.values()), str(fp32), input_names=names, output_names=["out"],
                          dynamo=False, opset_version=17)  # fmt: skip
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, use_external_data_format=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])


def int8_unet(unet, q8):
    """A copy of `unet` with `q8`'s layers in place of its own (the replaced layers are not copied)."""
    memo = {id(unet.get_submodule(n)): layer for n, layer in q8.layers.items()}
    return copy.deepcopy(unet, memo)


def runners(a, pipe, q8, folder: Path) -> dict:
    """{name: callable running one UNet call}."""
    unet = pipe.unet
    inputs = unet_inputs(unet, a.size)
    bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    bf16_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}

    ours = int8_unet(unet, q8)
    out = {"fp32": lambda: unet(**inputs), "bf16": lambda: bf16(**bf16_inputs)}
    out["ours_w8a8_int8"] = lambda: ours(**inputs)
    if a.peer == "onnxruntime":
        try:
            sess = ort_session(unet, inputs, folder)
            feed = {k: v.numpy() for k, v in inputs.items()}
            out["peer_onnxruntime_int8"] = lambda: sess.run(None, feed)
        except Exception as e:  # recorded, and the rest is measured
            print(f"speed: peer failed: {type(e).__name__}: {e}", flush=True)
            out["peer_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def timed_rounds(fns: dict, rounds: int, save) -> dict:
    """Seconds per call for each runner over `rounds` rounds, in a rotating order, after one warm-up each."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for r in range(rounds):
            names = list(fns)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
            save(times)
            print(f"speed: round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    return times


def speed(a, save) -> dict:
    _common.set_threads(a)
    pipe = speed_pipeline(a.unet)
    q8 = calibrated(pipe, "naive:bits=w8a8")
    q4 = calibrated(pipe, "naive:bits=w4a8")
    from stablekit.quant.int8 import to_int8

    q8i = to_int8(q8)
    res = {"unet": a.unet, "size": a.size, "machine": machine_info(a), "memory": memory(pipe, q4, q8)}
    res["execution"] = q8i.execution()
    with tempfile.TemporaryDirectory(prefix="stablekit-quant-") as tmp:
        fns = runners(a, pipe, q8i, Path(tmp))
        res["peer_error"] = fns.pop("peer_error", None)
        times = timed_rounds(fns, a.rounds, lambda t: save(res | {"seconds": t}))
    res["seconds"] = {k: _common.rounds(v) for k, v in times.items()}
    res["speedups_over_fp32"] = {k: _common.rounds([f / x for f, x in zip(times["fp32"], v, strict=True)])
                                 for k, v in times.items() if k != "fp32"}  # fmt: skip
    res["targets"] = speed_targets(res, times)
    return res


def speed_targets(res: dict, times: dict) -> dict:
    ours = times["ours_w8a8_int8"]
    fast = _common.speedup_target(res["speedups_over_fp32"]["ours_w8a8_int8"], 1.5, ">=")
    out = {"w8a8_speedup_over_fp32_ge_1.5": fast}
    if "peer_onnxruntime_int8" in times:
        ratios = [p / o for p, o in zip(times["peer_onnxruntime_int8"], ours, strict=True)]
        out["w8a8_not_slower_than_peer"] = _common.speedup_target(_common.rounds(ratios), 1.0, ">=")
    m = res["memory"]
    out["w4_weights_le_0.3x_fp32"] = _common.exact(m["w4a8_ratio"] <= 0.3, value=m["w4a8_ratio"], threshold=0.3)
    return out


def plot_speed(res: dict, path: Path):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(res["seconds"])
    axes[0].bar(names, [res["seconds"][k]["median"] for k in names])
    for i, k in enumerate(names):
        axes[0].scatter([i] * len(res["seconds"][k]["all"]), res["seconds"][k]["all"], color="black", s=8)
    axes[0].set_ylabel(f"seconds per UNet call (batch 2, {res['size']} px)")
    m = res["memory"]
    axes[1].bar(["fp32", "w8a8", "w4a8"], [1, m["w8a8_ratio"], m["w4a8_ratio"]])
    axes[1].axhline(0.3, color="gray", ls="--")
    axes[1].set_ylabel("weight memory / fp32")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{res['unet']} UNet, random weights", fontsize=10)
    _common.save_figure(fig, path)
