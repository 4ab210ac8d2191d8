"""Memorization: the noise-magnitude detector's exact value, prompt adjustment, neuron-pruning adapters (exact
removal, round trip, refusal by another model), and the CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_sd

import stablekit
from stablekit import StablekitError, cli
from stablekit.memorization import (
    MemorizationAdapter,
    NeuronPruning,
    PromptAdjustment,
    ground_truth,
    informative_start,
    memcontrol,
    noise_magnitude,
    prune,
)
from stablekit.memorization.activations import feed_forward_outputs
from stablekit.memorization.pruning import shared_neurons


@pytest.fixture(scope="module")
def tiny():
    pipe = make_tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_magnitude_is_the_norm_of_the_conditional_minus_unconditional_prediction(tiny):
    s = noise_magnitude(tiny, ["a red star", ""], steps=2, num_inference_steps=3, batch=2)
    assert s.shape == (2, 2) and s[0, 0] > 0
    assert np.all(s[1] < 1e-4)  # the empty prompt is the unconditional one: no text-conditional part
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    tiny.scheduler.set_timesteps(3)
    emb = tiny.encode_prompt(["a red star"], "cpu", 1, True)
    with torch.no_grad():
        c, u = (tiny.unet(x, tiny.scheduler.timesteps[0], e).sample for e in emb[:2])
    assert s[0, 0] == pytest.approx(float((c - u).norm()), rel=1e-4)
    assert not tiny.__dict__.get("_interrupt")  # the pipeline runs whole generations again
    with pytest.raises(StablekitError, match="at least one prompt"):
        noise_magnitude(tiny, [])


def test_prompt_adjustment_lowers_the_magnitude_and_detaches(tiny):
    def run():
        g = torch.Generator().manual_seed(1)
        return tiny("a red star", num_inference_steps=2, generator=g, output_type="np").images

    plain = run()
    adjust = PromptAdjustment(iterations=4, lr=0.1)
    with stablekit.use(tiny, adjust):
        adjusted = run()
    first, last = (float(h.mean()) for h in (adjust.history[0], adjust.history[-1]))
    assert len(adjust.history) == 4 and last < first
    assert not np.array_equal(plain, adjusted) and np.array_equal(run(), plain)


def test_shared_neurons_are_those_most_memorized_prompts_push_out_of_distribution():
    z = torch.zeros(4, 10)
    z[:, 7] = 5.0  # every memorized prompt
    z[:3, 2] = 4.0  # three of four
    z[0, 5] = 9.0  # one prompt only: not shared
    assert shared_neurons(z, 3.0, 0.5, 1.0) == [2, 7]
    assert shared_neurons(z, 3.0, 0.5, 0.1) == [7]  # one neuron of ten: the highest median


def test_pruning_removes_exactly_the_neurons_round_trips_and_detaches(tiny, tmp_path):
    layer = next(iter(feed_forward_outputs(tiny.unet)))
    name = f"unet.{layer}.weight"
    w0 = dict(tiny.unet.named_parameters())[f"{layer}.weight"].detach().clone()
    edit = NeuronPruning.make(tiny, "subspace", {name: [1, 5]}, "in")
    edit.save(tmp_path / "a.safetensors")
    loaded = NeuronPruning.load(tmp_path / "a.safetensors")
    assert loaded.neurons == {name: [1, 5]} and loaded.method == "subspace"
    assert torch.equal(loaded.deltas[name], edit.deltas[name])
    with stablekit.use(tiny, loaded):
        w = dict(tiny.unet.named_parameters())[f"{layer}.weight"]
        assert torch.all(w[:, [1, 5]] == 0)
        keep = [j for j in range(w.shape[1]) if j not in (1, 5)]
        assert torch.equal(w[:, keep], w0[:, keep])
    assert torch.equal(dict(tiny.unet.named_parameters())[f"{layer}.weight"], w0)
    other = make_tiny_sd()
    with torch.no_grad():
        dict(other.unet.named_parameters())[f"{layer}.weight"].mul_(1.5)
    with pytest.raises(StablekitError, match="another model"):
        stablekit.use(other, NeuronPruning.load(tmp_path / "a.safetensors"))
    assert torch.equal(dict(other.unet.named_parameters())[f"{layer}.weight"], w0 * 1.5)  # nothing changed


def test_subspace_pruning_moves_a_memorized_generation_away_from_its_render():
    from skimage.metrics import structural_similarity

    from stablekit.default_model import world

    pipe = stablekit.load()
    pipe.set_progress_bar_config(disable=True)
    caption, scene = ground_truth.memorized()[3]
    render = np.asarray(world.render(scene))
    memorized = [c for c, _ in ground_truth.memorized()]
    edit = prune(pipe, memorized, [c for c, _ in ground_truth.heldout(40, 2026)])

    def ssim():
        g = torch.Generator().manual_seed(0)
        im = pipe(caption, num_inference_steps=20, generator=g, output_type="np").images[0]
        return structural_similarity((im * 255).round().astype(np.uint8), render, channel_axis=2)

    before = ssim()
    with stablekit.use(pipe, edit):
        after = ssim()
    assert after < before - 0.05, (before, after)


def test_memcontrol_fine_tunes_only_the_chosen_mask_and_lowers_the_magnitude(tiny, tmp_path):
    from stablekit.memorization.memcontrol import choose, mask_parameters
    from stablekit.registry import load_adapter

    mem = ["a red star", "a blue moon"]
    before = noise_magnitude(tiny, mem, steps=1, num_inference_steps=3, batch=2)
    w0 = {n: p.detach().clone() for n, p in tiny.unet.named_parameters()}
    cands = ["cross-attention-kv", "feed-forward"]
    refs = ["a cat", "a dog", "a green square", "a yellow circle"]
    params = dict(inner_steps=2, steps=12, lr=1e-3, num_inference_steps=3, batch=4, candidates=cands)
    edit = memcontrol(tiny, mem, refs, **params)
    assert all(torch.equal(w0[n], p) for n, p in tiny.unet.named_parameters())  # the search restored the model
    assert edit.meta["mask"] in cands and len(json.loads(edit.meta["search"])) == 2
    assert set(edit.deltas) == {f"unet.{n}" for n in mask_parameters(tiny.unet, edit.meta["mask"])}
    edit.save(tmp_path / "m.safetensors")
    loaded = MemorizationAdapter.load(tmp_path / "m.safetensors")
    assert type(load_adapter(tmp_path / "m.safetensors")) is MemorizationAdapter  # what `generate --adapter` opens
    with stablekit.use(tiny, loaded):
        after = noise_magnitude(tiny, mem, steps=1, num_inference_steps=3, batch=2)
    assert after.mean() < before.mean(), (before, after)
    assert all(torch.equal(w0[n], p) for n, p in tiny.unet.named_parameters())
    rows = [{"mask": "a", "memorization": 0.2, "quality": 0.5}, {"mask": "b", "memorization": 0.6, "quality": 0.01}]
    assert choose(rows, 0.05) == "b" and choose(rows, 1.0) == "a" and choose(rows[:1], 0.05) == "a"
    with pytest.raises(StablekitError, match="candidates"):
        memcontrol(tiny, mem, refs, candidates=["everything"])


def test_informative_start_skips_only_a_zero_snr_first_step(tiny):
    assert informative_start(tiny, 3) == 0  # SD's schedule: the first step already has signal
    assert informative_start(stablekit.load(), 10) == 1  # zero terminal SNR, sampled from the last timestep


def test_benchmark_model_memorizes_fifty_distinct_scenes_including_the_embedded_ten():
    from stablekit.default_model import train as teacher
    from stablekit.memorization.benchmark_model import BenchmarkModelConfig, memorized_set

    rows = memorized_set()
    captions = [c for c, _ in rows]
    assert len(set(captions)) == 50 and all(c.startswith("the ") and c.endswith(" emblem") for c in captions)
    assert captions[:10] == [c for c, _ in teacher.memorization_set()]
    assert len({repr(s) for _, s in rows}) == 50
    with pytest.raises(StablekitError):
        BenchmarkModelConfig(steps=0)


def invoke(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args])


def one_line_error(result, folder, *fragments):
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and all(f in line for f in fragments), line
    assert result.stdout == "" and list(folder.iterdir()) == []


def test_cli_mitigate_writes_an_adapter_that_generate_applies_and_refuses_bad_input(tiny_sd_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    adapter = tmp_path / "memo.safetensors"
    refs = [x for p in ("a red star", "a blue circle", "a green square", "a white cross") for x in ("--reference", p)]
    result = invoke(
        "memorization",
        "mitigate",
        "--method",
        "nemo",
        "--memorized",
        "the zorvex emblem",
        *refs,
        "-o",
        adapter,
        "--model",
        tiny_sd_path,
    )
    assert result.exit_code == 0 and result.stdout == f"{adapter}\n", result.output
    gen = ["generate", "a red star", "--model", tiny_sd_path, "--size", "32x32", "--steps", "2"]
    assert invoke(*gen, "-o", out / "a.png", "--adapter", adapter).exit_code == 0
    (out / "a.png").unlink()
    one_line_error(invoke("memorization", "detect"), out, "no prompt")
    one_line_error(invoke("memorization", "detect", " "), out, "no prompt")
    one_line_error(invoke("memorization", "mitigate", "--method", "bogus", "-o", out / "x.safetensors"), out, "bogus")
    one_line_error(invoke("generate", "a red star", "-o", out / "b.png", "--adapter", adapter), out, "another model")


def test_cli_detect_prints_score_and_decision_at_the_shipped_threshold():
    from stablekit.memorization import detect, shipped_threshold

    prompts = ["the zorvex emblem", "a red circle on a gray background"]
    result = invoke("memorization", "detect", *prompts)
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert [p for _, _, p in lines] == prompts
    threshold = shipped_threshold(1)["value"]
    for score, decision, _ in lines:
        assert decision == ("memorized" if float(score) > threshold else "not memorized")
    pipe = stablekit.load()
    pipe.set_progress_bar_config(disable=True)
    assert [round(d.score, 4) for d in detect(pipe, prompts)] == [float(s) for s, _, _ in lines]
    with pytest.raises(StablekitError, match="shipped threshold"):
        detect(make_tiny_sd(), prompts)
    later = invoke("memorization", "detect", "--start", "1", prompts[0])  # the first step with signal
    score, decision, _ = later.stdout.strip().split("\t")
    assert later.exit_code == 0 and float(score) != float(lines[0][0])
    assert decision == ("memorized" if float(score) > shipped_threshold(1, 1)["value"] else "not memorized")
