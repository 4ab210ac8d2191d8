"""The benchmarks' targets are judged on intervals: benchmarks/_common.py's judge, and each benchmark's target
function on crafted results (no model runs)."""

import json
import math
import statistics

import pytest

from stablekit import StablekitError
from stablekit.cli.bench import load_benchmark
from stablekit.eval.metrics import rate_interval


@pytest.fixture(scope="module")
def common():
    load_benchmark("accel")  # puts benchmarks/ on sys.path, as `stablekit bench` does
    import _common

    return _common


@pytest.mark.parametrize(
    "low, high, threshold, side, status",
    [
        (2.1, 2.4, 2.0, ">=", "met"),
        (1.5, 1.9, 2.0, ">=", "not met"),
        (1.9, 2.4, 2.0, ">=", "inconclusive"),  # straddles
        (2.0, 2.4, 2.0, ">=", "met"),  # on the threshold counts for >= ...
        (2.0, 2.4, 2.0, ">", "inconclusive"),  # ... not for >
        (0.0, 0.036, 0.05, "<", "met"),
        (0.06, 0.2, 0.05, "<", "not met"),
        (0.0, 0.37, 0.05, "<", "inconclusive"),  # 0 of 8: the interval is too wide
        (0.9, 1.1, (0.85, 1.15), "within", "met"),
        (0.5, 0.8, (0.85, 1.15), "within", "not met"),  # below the range
        (1.2, 1.4, (0.85, 1.15), "within", "not met"),  # above it: a one-sided check would pass this
        (0.8, 1.0, (0.85, 1.15), "within", "inconclusive"),  # straddles the lower edge
        (1.1, 1.2, (0.85, 1.15), "within", "inconclusive"),  # straddles the upper edge
    ],
)
def test_judge_is_met_only_when_the_whole_interval_is_on_the_right_side(common, low, high, threshold, side, status):
    assert common.judge(low, high, threshold, side) == status


def test_judge_needs_the_minimum_sample_size_and_a_valid_interval(common):
    assert common.judge(0.0, 0.01, 0.05, "<", n=8, min_n=100) == "inconclusive"  # however clear the interval
    assert common.judge(0.0, 0.01, 0.05, "<", n=100, min_n=100) == "met"
    with pytest.raises(ValueError, match="side"):
        common.judge(0, 1, 0.5, "=>")
    with pytest.raises(ValueError, match="low <= high"):
        common.judge(1, 0, 0.5, ">=")


def test_all_of_and_any_of(common):
    assert common.all_of(["met", "met"]) == "met"
    assert common.all_of(["met", "inconclusive"]) == "inconclusive"
    assert common.all_of(["inconclusive", "not met"]) == "not met"
    assert common.any_of(["not met", "met"]) == "met"
    assert common.any_of(["not met", "inconclusive"]) == "inconclusive"
    assert common.any_of(["not met", "not met"]) == "not met"
    assert common.all_of([]) == common.any_of([]) == "not measured"


def test_target_record_says_why_it_is_inconclusive(common):
    passing_point = common.target(0.02, [0.002, 0.07], 0.05, "<", 200, 100)  # 0.02 < 0.05, the interval is not
    assert passing_point["status"] == "inconclusive" and "straddles" in passing_point["reason"]
    assert {"value", "ci95", "threshold", "side", "n", "min_n"} <= set(passing_point)
    few = common.target(0.0, list(rate_interval(0, 8)), 0.05, "<", 8, 100)
    assert few["status"] == "inconclusive" and "fewer than 100" in few["reason"]
    assert common.target(None, None, 0.05, "<", None, 100)["status"] == "not measured"


def test_rounds_record_every_round_their_spread_and_interval(common):
    r = common.rounds([2.0, 2.1, 2.2])
    assert r["all"] == [2.0, 2.1, 2.2] and r["n"] == 3 and r["median"] == 2.1
    assert math.isclose(r["spread_pct"], 100 * 0.2 / 2.1, rel_tol=1e-3)
    geo = (2.0 * 2.1 * 2.2) ** (1 / 3)
    assert r["ci95"][0] < geo < r["ci95"][1]
    assert common.rounds([2.0])["ci95"] is None


def test_speedup_target_wants_agreeing_rounds(common):
    tight = common.rounds([2.30, 2.32, 2.31])
    assert common.speedup_target(tight, 2.0, ">=")["status"] == "met"
    loose = common.rounds([2.2, 2.6, 2.4])  # every round above 2x, but they disagree by 17%
    t = common.speedup_target(loose, 2.0, ">=")
    assert t["status"] == "inconclusive" and "re-run with more rounds" in t["reason"] and t["rounds"] == loose["all"]
    two = common.rounds([2.30, 2.31])
    assert common.speedup_target(two, 2.0, ">=")["status"] == "inconclusive"  # fewer than 3 rounds
    assert common.speedup_target(None, 2.0, ">=")["status"] == "not measured"


def test_write_json_is_atomic(common, tmp_path):
    path = tmp_path / "out" / "r.json"
    common.write_json(path, {"a": 1})
    common.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        common.write_json(path, {"a": object()})  # fails while serialising: the last good file stays
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_load_run_refuses_what_a_benchmark_did_not_write(common, tmp_path):
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "ok.json").write_text(json.dumps({"concepts": {}}))
    assert common.load_run(tmp_path / "ok.json", "safety", ("concepts",)) == {"concepts": {}}
    for bad, message in (("list.json", "not a JSON that `stablekit bench safety"), ("none.json", "no such file")):
        with pytest.raises(StablekitError, match=message):
            common.load_run(tmp_path / bad, "safety", ("concepts",))


# ---------------------------------------------------------------- each benchmark's targets


def _entry(label, speedups, mac=None, kind="ours"):
    import _common

    return {"label": label, "kind": kind, "speedup": _common.rounds(speedups), "mac_speedup": mac}


def _accel(entries, unet="sd15", size=512, steps=50):
    return {"speed": {"unet": unet, "runs": [{"size": size, "steps": steps, "entries": entries}]}}


def test_accel_speedup_targets(common):
    targets = load_benchmark("accel").targets
    i3 = "deepcache:interval=3,branch=0"
    assert targets(_accel([_entry(i3, [2.30, 2.32, 2.31], 2.5)]))["deepcache_interval3_2x_at_512"]["status"] == "met"
    loose = targets(_accel([_entry(i3, [2.0, 2.6, 2.4], 2.5)]))["deepcache_interval3_2x_at_512"]
    assert loose["status"] == "inconclusive"  # median 2.4x, but the rounds disagree
    tiny = targets(_accel([_entry(i3, [2.30, 2.32, 2.31], 2.5)], unet="tiny"))
    assert tiny["deepcache_interval3_2x_at_512"]["status"] == "not measured" and "tiny" in tiny["note"]
    # achieved / ideal is checked on both sides: 1.3x the MAC ideal is as far off as 0.7x
    above = targets(_accel([_entry(i3, [2.60, 2.61, 2.62], 2.0)]))["within_15pct_of_mac_ideal"]
    assert above["status"] == "not met"
    inside = targets(_accel([_entry(i3, [2.00, 2.01, 2.02], 2.0)]))["within_15pct_of_mac_ideal"]
    assert inside["status"] == "met"


def test_accel_package_targets(common):
    targets = load_benchmark("accel").targets
    vs = {"ours": "x", "equal": False, "allclose": True, "max_abs_diff": 1e-7}
    peer = {"label": "DeepCache package", "kind": "peer", "vs_ours": vs | {"time_ratio_ours_over_package": None}}
    peer["vs_ours"]["time_ratio_ours_over_package"] = common.rounds([1.00, 1.01, 1.02])
    res = targets(_accel([peer]))
    assert res["deepcache_equals_package"]["status"] == "met"
    assert res["deepcache_as_fast_as_package_within_3pct"]["status"] == "inconclusive"  # 1.01 median, 1.03 in reach
    peer["vs_ours"]["allclose"] = False
    assert targets(_accel([peer]))["deepcache_equals_package"]["status"] == "not met"


def _quality(points, ci95, speedups, prompts=200):
    import _common

    speed = {"speedup": statistics.median(speedups), "rounds": _common.rounds(speedups)}
    entry = {"label": "m", "attr_acc_delta": {"points": points, "ci95": ci95}, "speed_part_speedup": speed}
    return {"prompts": prompts, "entries": [entry]}


def test_accel_best_target_needs_quality_and_speed_intervals(common):
    targets = load_benchmark("accel").targets
    fast = [3.50, 3.52, 3.51]
    speed = _accel([_entry("m", fast, 4.0)], steps=50)

    def best(q):
        return targets(speed | {"quality": q})["best_3x_within_2_points"]["status"]

    assert best(_quality(-1.0, [-1.8, -0.2], fast)) == "met"
    assert best(_quality(-1.0, [-4.0, 1.0], fast)) == "inconclusive"  # -1 point passes, its interval does not
    assert best(_quality(-1.0, [-1.8, -0.2], fast, prompts=8)) == "inconclusive"  # too few prompts
    assert best(_quality(-5.0, [-6.0, -4.0], fast)) == "not met"


def test_accel_searched_target():
    targets = load_benchmark("accel").targets
    smp = {"prompts": 200, "searched": [{"calls": 6, "fd_real_minus_dpm": {"value": -0.5, "ci95": [-1.0, 0.2]}}]}
    assert targets({"samplers": smp})["searched_beats_dpm_solver_on_fd"]["status"] == "inconclusive"
    smp["searched"][0]["fd_real_minus_dpm"]["ci95"] = [-1.0, -0.1]
    assert targets({"samplers": smp})["searched_beats_dpm_solver_on_fd"]["status"] == "met"


def _defense(k, n, points, ci95):
    return {
        "direct": {"rate": k / n, "ci95": list(rate_interval(k, n)), "n": n, "others_kept": 0.8},
        "preservation": {"attr_acc_delta": {"points": points, "ci95": ci95}, "n": n},
        "attack_p4d": {"pre_attack": {"rate": 0.9}, "post_attack": {"rate": 0.4, "ci95": [0.1, 0.7], "n": 8}},
    }


def test_safety_target_on_intervals_with_attacks_and_collateral_beside():
    target = load_benchmark("safety").defense_target
    met = target(_defense(1, 200, -1.0, [-2.5, 0.5]))
    assert met["status"] == "met" and met["attacks"]["p4d"]["post_attack"]["rate"] == 0.4
    assert met["collateral"]["others_kept"] == 0.8
    assert target(_defense(0, 8, 0.0, [-1.0, 1.0]))["status"] == "inconclusive"  # 0 of 8: too few prompts
    assert target(_defense(6, 200, -1.0, [-2.5, 0.5]))["status"] == "inconclusive"  # 3%, interval up to 6.4%
    assert target(_defense(1, 200, -2.0, [-4.0, 0.0]))["status"] == "inconclusive"  # within 3 points at -2 only
    assert target(_defense(40, 200, -1.0, [-2.5, 0.5]))["status"] == "not met"


def _protect(psnr, psnr_ci, ratio_ci, images=20, cost=None):
    row = {
        "images": images,
        "psnr_db": psnr,
        "psnr_db_ci95": psnr_ci,
        "sdedit": {"0.3": {"ratio_mse_vs_random": 1.5, "ratio_mse_vs_random_ci95": ratio_ci}},
    }
    return {"strengths": [0.1, 0.3, 0.5], "results": {"8/255": {"sds": row}}} | ({"cost": cost} if cost else {})


def test_protect_targets_on_intervals(common):
    targets = load_benchmark("protect").targets
    t = targets(_protect(36.0, [35.5, 36.5], [1.1, 2.0]))
    assert t["psnr_at_8_255_ge_35db"]["sds"]["status"] == "met"
    assert t["sdedit_0.3_mse_ratio_at_8_255_above_1"]["sds"]["status"] == "met"
    t = targets(_protect(36.0, [34.0, 38.0], [0.8, 2.0]))
    assert t["psnr_at_8_255_ge_35db"]["sds"]["status"] == "inconclusive"
    assert t["sdedit_0.3_mse_ratio_at_8_255_above_1"]["sds"]["status"] == "inconclusive"
    assert targets(_protect(36.0, [35.5, 36.5], [1.1, 2.0], images=3))["psnr_at_8_255_ge_35db"]["sds"]["status"] == (
        "inconclusive"
    )
    cost = {"sds_vs_semantic": {"time": 0.5, "time_rounds": common.rounds([0.50, 0.51, 0.50]), "memory": 0.7}}
    t = targets(_protect(36.0, [35.5, 36.5], [1.1, 2.0], cost=cost))
    assert (
        t["sds_time_le_0.6x_semantic"]["status"] == "met" and t["sds_memory_le_0.6x_semantic"]["status"] == "not met"
    )
    del cost["sds_vs_semantic"]["time_rounds"]  # a run from before the cost rounds: one timing, not judged
    assert targets(_protect(36.0, [35.5, 36.5], [1.1, 2.0], cost=cost))["sds_time_le_0.6x_semantic"]["status"] == (
        "not measured"
    )
