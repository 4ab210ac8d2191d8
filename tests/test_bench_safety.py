"""benchmarks/safety.py end to end at tiny scale on the default model: defenses, attacks, targets."""
import json

import pytest

from stablekit.cli import load_benchmark


def test_safety_benchmark_end_to_end(tmp_path):
    bench = load_benchmark("safety")
    out = tmp_path / "safety.json"
    args = ["--json", str(out), "--concepts", "star", "--prompts", "4", "--attack-prompts", "2", "--steps", "2",
            "--optimise-prompts", "1", "--attack-iterations", "2",
            "--spm-iterations", "2", "--spm-dir", str(tmp_path / "spm"), "--batch", "4", "--defenses", "uce", "safree",
            "spm"]
    res = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    rows = res["concepts"]["star"]["defenses"]
    assert list(rows) == ["none", "uce", "safree", "spm"]  # the undefended model always comes first
    assert rows["none"]["preservation"]["attr_acc_delta"]["points"] == 0
    assert rows["spm"]["erase_seconds"] > 0 and (tmp_path / "spm" / "star.safetensors").exists()
    for row in rows.values():
        assert row["direct"]["n"] == row["paraphrase"]["n"] == 4
        attack = row["attack_arithmetic"]
        assert attack["pre_attack"]["n"] == attack["post_attack"]["n"] == 2
        assert set(attack["by_composition"]) == {"negated", "word", "paraphrases"}
        assert attack["post_attack"]["k"] >= max(v["k"] for v in attack["by_composition"].values())
        for name in ("p4d", "unlearndiffatk"):
            opt = row[f"attack_{name}"]
            assert opt["pre_attack"]["n"] == opt["post_attack"]["n"] == 1 and opt["iterations"] == 2
            assert len(opt["examples"]) == 1
    assert set(res["targets"]) == {"safree_star", "spm_star"}
    again = bench.main(args[:2] + ["--concepts", "star", "--prompts", "4", "--steps", "2", "--attack-prompts", "0",
                                   "--optimise-prompts", "0", "--spm-dir", str(tmp_path / "spm"), "--batch", "4",
                                   "--defenses", "spm"])  # the membrane is read back from --spm-dir, not trained again
    assert again["concepts"]["star"]["defenses"]["spm"]["erase_seconds"] == 0
    assert again["concepts"]["star"]["defenses"]["spm"]["direct"] == rows["spm"]["direct"]


def test_safety_benchmark_refuses_a_negative_spm_multiplier(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load_benchmark("safety").parse(["--json", str(tmp_path / "s.json"), "--spm-multiplier", "-1"])
    assert e.value.code != 0 and "--spm-multiplier must be >= 0" in capsys.readouterr().err
