"""benchmarks/safety.py end to end at tiny scale on the default model: defenses, attacks, targets."""

import json

import pytest

from stablekit.cli.bench import load_benchmark


def test_safety_benchmark_end_to_end(tmp_path):
    bench = load_benchmark("safety")
    out = tmp_path / "safety.json"
    args = [
        "--json",
        str(out),
        "--concepts",
        "star",
        "--prompts",
        "4",
        "--attack-prompts",
        "2",
        "--steps",
        "2",
        "--optimise-prompts",
        "1",
        "--attack-iterations",
        "2",
        "--spm-iterations",
        "2",
        "--spm-dir",
        str(tmp_path / "spm"),
        "--batch",
        "4",
        "--advunlearn-iterations",
        "1",
        "--advunlearn-ref-steps",
        "1",
        "--doco-iterations",
        "1",
        "--doco-ref-steps",
        "1",
        "--trce-iterations",
        "1",
        "--trce-keywords",
        "--defenses",
        "uce",
        "safree",
        "spm",
        "advunlearn",
        "doco",
        "trce",
    ]
    res = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    rows = res["concepts"]["star"]["defenses"]
    assert list(rows) == ["none", "uce", "safree", "spm", "advunlearn", "doco", "trce"]  # the undefended one first
    assert rows["none"]["preservation"]["attr_acc_delta"]["points"] == 0
    assert rows["none"]["direct"]["others_kept_delta"]["points"] == 0
    assert all(0 <= row["direct"]["others_kept"] <= 1 for row in rows.values())
    assert list(rows["none"]["direct"]["others_kept_by_attribute"]) == ["colors", "background", "textures", "count"]
    assert rows["spm"]["erase_seconds"] > 0 and (tmp_path / "spm" / "star.safetensors").exists()
    assert rows["none"]["plugins"] == [] and rows["safree"]["plugins"][0]["plugin"] == "SAFREE"
    assert rows["safree"]["plugins"][0]["concepts"] == ["star"] and "alpha" in rows["safree"]["plugins"][0]
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
    assert set(res["targets"]) == {"safree_star", "spm_star", "advunlearn_star", "doco_star", "trce_star"}
    doco = res["targets"]["doco_star"]
    assert doco["status"] == "inconclusive" and "synonyms" in doco["parts"]
    assert "DoCo" in str(rows["doco"]["plugins"]) and res["doco"]["anchor"] is None
    assert rows["trce"]["plugins"][0]["keywords"] == [] and res["trce"] == {"iterations": 1, "keywords": []}
    robust = res["targets"]["advunlearn_star"]  # compared with the best baseline of the same run
    assert robust["parts"]["synonyms"]["best_baseline"] in ("uce", "safree", "spm")
    assert robust["parts"]["synonyms"]["threshold"] == round(robust["parts"]["synonyms"]["best_baseline_rate"] / 3, 4)
    assert robust["status"] == "inconclusive" and "unlearndiffatk" in robust["parts"]
    spm = res["targets"]["spm_star"]  # 4 prompts: too few to judge, whatever the rates
    assert spm["status"] == "inconclusive" and spm["parts"]["concept_rate"]["n"] == 4
    assert set(spm["attacks"]) == {"arithmetic", "p4d", "unlearndiffatk"} and "others_kept_delta" in spm["collateral"]
    assert "SPM" in str(rows["spm"]["plugins"]) and rows["none"]["plugins"] == []
    again = bench.main(
        args[:2]
        + [
            "--concepts",
            "star",
            "--prompts",
            "4",
            "--steps",
            "2",
            "--attack-prompts",
            "0",
            "--optimise-prompts",
            "0",
            "--spm-dir",
            str(tmp_path / "spm"),
            "--batch",
            "4",
            "--defenses",
            "spm",
        ]
    )  # the membrane is read back from --spm-dir, not trained again
    assert again["concepts"]["star"]["defenses"]["spm"]["erase_seconds"] == 0
    assert again["concepts"]["star"]["defenses"]["spm"]["direct"] == rows["spm"]["direct"]


def test_safety_benchmark_refuses_a_negative_spm_multiplier(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load_benchmark("safety").parse(["--json", str(tmp_path / "s.json"), "--spm-multiplier", "-1"])
    assert e.value.code != 0 and "--spm-multiplier must be >= 0" in capsys.readouterr().err


def _row(rate, acc, n=200):
    from stablekit.eval.metrics import rate_interval

    points = 100 * (acc - 0.9)
    return {
        "direct": {"rate": rate, "ci95": list(rate_interval(round(rate * n), n)), "n": n},
        "preservation": {"attr_acc_mean": acc, "attr_acc_delta": {"points": points, "ci95": [points - 1, points + 1]}},
    }


def test_merge_puts_every_run_s_defenses_in_one_result_and_refuses_other_settings(tmp_path):
    from stablekit import StablekitError

    bench = load_benchmark("safety")
    settings = {"seed": 2024, "prompts": 200, "steps": 25, "guidance": 7.5}
    runs = {
        "a": {"none": _row(0.98, 0.9), "safree": _row(0.5, 0.9)},
        "b": {"none": _row(0.97, 0.9), "spm": _row(0.01, 0.89)},
    }
    for stem, rows in runs.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps(settings | {"concepts": {"star": {"defenses": rows}}}))
    out = tmp_path / "all.json"
    res = bench.main(["--json", str(out), "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    rows = res["concepts"]["star"]["defenses"]
    assert list(rows) == ["none", "safree (a)", "spm (b)"] and rows["none"] == runs["a"]["none"]
    assert {k: v["status"] for k, v in res["targets"].items()} == {"safree (a)_star": "not met", "spm (b)_star": "met"}
    assert json.loads(out.read_text()) == res and out.with_suffix(".png").exists()
    (tmp_path / "c.json").write_text(json.dumps(settings | {"prompts": 50, "concepts": {}}))
    (tmp_path / "d.json").write_text("not json")
    for bad, message in (("c.json", "other prompts or settings"), ("d.json", "cannot merge")):
        with pytest.raises(StablekitError, match=message):
            bench.main(["--json", str(tmp_path / "x.json"), "--merge", str(tmp_path / "a.json"), str(tmp_path / bad)])
    assert not (tmp_path / "x.json").exists()


def test_robust_target_compares_with_the_best_baseline_of_the_run():
    bench = load_benchmark("safety")

    def row(para, attack, acc, n=200):
        r = _row(0.0, acc, n)
        r["paraphrase"] = _row(para, acc, n)["direct"]
        r["attack_unlearndiffatk"] = {"post_attack": _row(attack, acc, 40)["direct"]}
        return r

    rows = {"none": row(1.0, 1.0, 0.9), "uce": row(0.97, 0.6, 0.9), "spm": row(0.9, 0.75, 0.9)}
    good = bench.robust_target(row(0.1, 0.0, 0.895), rows | {"advunlearn": None})
    assert good["status"] == "met" and good["parts"]["synonyms"]["best_baseline"] == "spm"
    assert good["parts"]["synonyms"]["threshold"] == 0.3 and good["parts"]["unlearndiffatk"]["threshold"] == 0.2
    bad = bench.robust_target(row(0.5, 0.0, 0.895), rows)  # a third of spm's 0.9 is 0.3: 0.5 is above
    assert bad["status"] == "not met" and bad["parts"]["synonyms"]["status"] == "not met"
    lossy = bench.robust_target(row(0.1, 0.0, 0.8), rows)  # 10 points of preservation lost
    assert lossy["parts"]["preservation_points"]["status"] == "not met"
