"""benchmarks/accel.py end to end at tiny scale: every part runs, MACs are counted right, the package matches."""

import json

import pytest

from stablekit.cli.bench import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("accel")


def test_accel_benchmark_tiny(bench, tmp_path):
    pytest.importorskip("DeepCache", reason="the reference package is not installed: pip install DeepCache==0.1.1")
    out = tmp_path / "accel.json"
    res = bench.main(
        [
            "--json",
            str(out),
            "--unet",
            "tiny",
            "--sizes",
            "64",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--methods",
            "deepcache:interval=2,branch=0",
            "encoder-propagation:interval=2,parallel=true",
            "--prompts",
            "2",
            "--quality-steps",
            "3",
            "--batch",
            "2",
            "--samplers",
            "dpm++",
            "--calls",
            "2",
            "--reference-steps",
            "3",
            "--search-budgets",
            "3",
            "--calib-prompts",
            "2",
            "--search-generations",
            "1",
            "--search-children",
            "1",
            "--search-reference-steps",
            "3",
            "--threads",
            "1",
        ]
    )
    assert json.loads(out.read_text())["command"].startswith("stablekit bench accel --json")
    assert all((tmp_path / f"accel_{part}.png").is_file() for part in ("speed", "quality", "samplers"))

    speed = res["speed"]
    assert speed["mac_check"]["ratio"] == 1.0  # the hooks count what FlopCounterMode counts
    rows = {e["label"]: e for e in speed["runs"][0]["entries"]}
    assert not [e for e in rows.values() if "error" in e]
    assert rows["plain"]["unet_calls"] == 3 and rows["plain"]["mac_speedup"] == 1.0
    ours, theirs = rows["deepcache:interval=2,branch=0"], rows["DeepCache package: interval=2,branch=0"]
    assert ours["gmacs"] == theirs["gmacs"] and 1 < ours["mac_speedup"] < 2  # steps 0 and 2 full, step 1 shallow
    assert theirs["vs_ours"]["equal"] and res["targets"]["deepcache_equals_package"]["status"] == "met"
    assert theirs["speedup"]["n"] == len(theirs["speedup"]["all"]) == 1  # every round is recorded
    assert res["targets"]["deepcache_interval3_2x_at_512"]["status"] == "not measured"  # tiny UNet: not judged
    (config,) = res["plugins"]["deepcache:interval=2,branch=0"]  # the plugin's config dataclass, or its repr
    assert "DeepCache" in str(config) and "interval" in str(config)
    parallel = rows["encoder-propagation:interval=2,parallel=true"]
    assert parallel["gmacs_per_call"]["0"] == 1  # step 1's decoder ran in step 0's call
    assert parallel["mac_speedup"] > 1 and "speedup" in parallel

    quality = res["quality"]
    assert [e["label"] for e in quality["entries"]] == [
        "deepcache:interval=2,branch=0",
        "encoder-propagation:interval=2,parallel=true",
    ]
    assert all("error" not in e and e["mac_speedup_default_model"] > 1 for e in quality["entries"])
    (ep,) = res["plugins"]["encoder-propagation:interval=2,parallel=true"]  # every parameter, defaults included
    assert ep["plugin"] == "EncoderPropagation" and ep["interval"] == 2 and ep["parallel"] is True
    assert ep["key_steps"][:4] == [0, 1, 2, 3] and ep["reference_steps"] == 50

    samplers = res["samplers"]
    assert [p["calls"] for p in samplers["curves"]["dpm++"]] == [2, 3]  # the searched budget is added for dpm++
    assert all(p["model_calls_counted"] == p["calls"] for p in samplers["curves"]["dpm++"])
    assert samplers["searched"][0]["model_calls_counted"] == 3
    assert samplers["searched_stacks"][0]["full_call_equivalents"] < 3
    assert (tmp_path / "accel_schedule3.json").is_file()
    assert "SearchedScheduler" in str(samplers["searched"][0]["plugin"])
    delta = samplers["searched"][0]["fd_real_minus_dpm"]  # against DPM-Solver++ at the same 3 calls
    assert delta["ci95"][0] <= delta["ci95"][1]
    assert res["targets"]["searched_beats_dpm_solver_on_fd"]["status"] == "inconclusive"  # 2 prompts: too few
