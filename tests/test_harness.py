"""The benchmarks' statistics on inputs with known answers: ``paired_delta`` (mean attribute accuracy minus a
reference's, with a paired bootstrap interval) and the ``Judge`` (the default model's attribute classifier) on
the world renderer's exact images and on renders with every colour wrong."""

import copy

import numpy as np
import pytest

from stablekit.default_model import classifier, world
from stablekit.eval.harness import ATTRS, Judge, heldout_prompts, paired_delta


def matches(n: int, seed: int) -> np.ndarray:
    """(n, 5) random judgements of a reference, with the first attribute always wrong."""
    m = np.random.default_rng(seed).random((n, len(ATTRS))) < 0.6
    m[:, 0] = False
    return m


def test_identical_samples_differ_by_zero():
    ref = matches(200, 0)
    d = paired_delta(ref.copy(), ref)
    assert d == {"points": 0.0, "ci95": [0.0, 0.0]}


def test_every_prompt_gaining_one_attribute_is_twenty_points():
    ref = matches(200, 1)
    better = ref.copy()
    better[:, 0] = True  # one more of five attributes right on every prompt: +20 points, no spread
    assert paired_delta(better, ref) == {"points": 20.0, "ci95": [20.0, 20.0]}
    assert paired_delta(ref, better) == {"points": -20.0, "ci95": [-20.0, -20.0]}


def test_half_the_prompts_gaining_gives_ten_points_with_a_paired_interval():
    ref = matches(200, 2)
    better = ref.copy()
    better[::2, 0] = True  # +0.2 on half the prompts: mean +10 points, per-prompt sd 10, standard error 0.71
    d = paired_delta(better, ref, seed=3)
    low, high = d["ci95"]
    assert d["points"] == 10.0
    assert low < 10 < high and low > 7.5 and high < 12.5 and high - low > 2  # about +-1.96 standard errors
    assert paired_delta(better, ref, seed=3) == d  # the bootstrap is seeded


def test_the_interval_is_paired():
    """Shared per-prompt difficulty cancels: unpaired, its spread would give an interval over ten times wider."""
    rng = np.random.default_rng(4)
    hard = rng.random(200) < 0.5  # prompts where everything fails
    ref = np.repeat(~hard[:, None], len(ATTRS), 1)
    better = ref.copy()
    better[:, 0] |= rng.random(200) < 0.1  # the difference: +0.2 on about 10% of the prompts
    low, high = paired_delta(better, ref)["ci95"]
    assert high - low < 4


def wrong_colours(scene: world.Scene) -> world.Scene:
    """The scene with each object's colour replaced by the next one in the world's list."""
    out = copy.deepcopy(scene)
    for obj in out.objects:
        obj.color = world.COLOR_NAMES[(world.COLOR_NAMES.index(obj.color) + 1) % len(world.COLOR_NAMES)]
    return out


@pytest.fixture(scope="module")
def judged():
    scenes, _ = heldout_prompts(24, 8, seed=5)
    judge = Judge(scenes, seed=6)
    rng = np.random.default_rng(7)
    exact = classifier.to_tensor([world.render(s, rng) for s in scenes])
    wrong = classifier.to_tensor([world.render(wrong_colours(s), rng) for s in scenes])
    return judge, judge.evaluate(exact), judge.evaluate(wrong)


def test_judge_scores_exact_renders_near_one(judged):
    _, (metrics, m, _), _ = judged
    assert m.shape == (32, len(ATTRS)) and m.dtype == bool
    assert metrics["attr_acc_mean"] > 0.9 and metrics["color_acc"] > 0.9 and metrics["shape_acc"] > 0.9
    low, high = metrics["attr_acc_mean_ci95"]
    assert low <= metrics["attr_acc_mean"] <= high <= 1


def test_judge_sees_wrong_colours_and_only_them(judged):
    _, (exact, m_exact, _), (wrong, m_wrong, _) = judged
    assert wrong["color_acc"] < 0.1  # every colour is wrong
    assert abs(wrong["shape_acc"] - exact["shape_acc"]) <= 0.1 and wrong["background_acc"] == exact["background_acc"]
    assert wrong["attr_acc_mean"] < exact["attr_acc_mean"] - 0.15
    assert wrong["joint_acc"] < 0.1 <= exact["joint_acc"]
    assert wrong["fd_real"] > exact["fd_real"]  # further from the real renders' features
    assert paired_delta(m_wrong, m_exact)["ci95"][1] < -15  # about 20 points lost, one attribute of five
