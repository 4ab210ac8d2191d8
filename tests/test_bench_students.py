"""benchmarks/students.py end to end at tiny scale: every row judged on the same prompts, calls, MACs, parameters
and latency counted."""

import json

import stablekit
from stablekit.cli.bench import load_benchmark
from stablekit.train import compress, koala, lcm_distill
from stablekit.train.slim_unet import SlimUNet2DConditionModel


def test_students_benchmark_compares_rows_on_the_same_prompts(tmp_path):
    pipe = stablekit.load()
    lora, recipe = lcm_distill.distill(pipe, lcm_distill.Config(images=4, iterations=1, batch=4, rank=4))
    lcm_distill.save(pipe, lora, tmp_path / "lcm.safetensors", recipe)
    out = tmp_path / "students.json"
    args = ["--json", str(out), "--prompts", "4", "--teacher-steps", "2", "--student", "stablekit-default:2:7.5"]
    args += ["--batch", "4", "--latency-rounds", "1"]
    args += ["--student", "stablekit-default:1", "--lcm-lora", str(tmp_path / "lcm.safetensors"), "--lcm-steps", "2"]
    res = load_benchmark("students").main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    first, same, one, lcm = res["rows"]
    assert first["unet_calls"] == 4 and one["unet_calls"] == 1 and lcm["unet_calls"] == 2
    assert same["attr_acc_mean"] == first["attr_acc_mean"]  # the same model, prompts and noise
    assert same["delta_vs_first_points"]["points"] == 0
    assert first["macs_per_image"] == 4 * one["macs_per_image"] > 0
    assert lcm["lcm_lora"] and lcm["role"] == "student"
    assert list(res["targets"]) == ["stablekit-default:1 within 5 points of the 25-step teacher"]


def test_students_benchmark_times_and_judges_a_compressed_unet(tmp_path):
    pipe = stablekit.load()
    names = koala.design(pipe.unet)
    compress.save(pipe, SlimUNet2DConditionModel.from_unet(pipe.unet, names), tmp_path / "slim", {"method": "test"})
    out = tmp_path / "compressed.json"
    args = ["--json", str(out), "--prompts", "4", "--teacher-steps", "2", "--student", "none", "--batch", "4"]
    res = load_benchmark("students").main([*args, "--compressed", str(tmp_path / "slim"), "--latency-rounds", "3"])
    teacher, slim = res["rows"]
    assert slim["role"] == "compressed" and slim["steps"] == 2 and slim["unet_calls"] == teacher["unet_calls"]
    assert slim["unet_parameters"] < teacher["unet_parameters"] and slim["macs_per_image"] < teacher["macs_per_image"]
    assert teacher["latency_vs_first"] == 1 and slim["latency_vs_first"] > 0
    (name,) = res["targets"]
    assert "within 3 points" in name and res["targets"][name]["half_the_macs"] is False


def test_students_benchmark_judges_a_speedupnet_adapter_on_a_chosen_teacher(tmp_path):
    from stablekit.train.speedupnet import SpeedUpNet

    SpeedUpNet.fresh(stablekit.load().unet).save(tmp_path / "sun.safetensors")
    out = tmp_path / "sun.json"
    args = ["--json", str(out), "--prompts", "4", "--teacher-steps", "4", "--student", "none", "--batch", "4"]
    args += ["--speedupnet", str(tmp_path / "sun.safetensors"), "--teacher", "stablekit-default"]
    res = load_benchmark("students").main([*args, "--latency-rounds", "1"])
    teacher, sun = res["rows"]
    assert teacher["unet_calls"] == 8 and sun["unet_calls"] == 4 and sun["guidance"] == 1.0
    assert sun["speedupnet"] and not sun["lcm_lora"] and sun["role"] == "student"
    assert sun["macs_per_image"] > teacher["macs_per_image"] / 2  # the adapter's branches cost a little
    assert list(res["targets"]) == ["stablekit-default:4 + SpeedUpNet within 2 points of the 25-step teacher"]
