"""benchmarks/restore.py end to end at tiny scale: every method on both sets, the JSON, the plot, the targets."""

import json

from stablekit.cli.bench import load_benchmark


def test_restore_benchmark_tiny(tmp_path):
    bench = load_benchmark("restore")
    out = tmp_path / "restore.json"
    res = bench.main(
        ["--json", str(out), "--images", "3", "--photos", "2", "--baseline-steps", "3", "--obc-steps", "2"]
        + ["--batch", "2", "--edits", "2", "--asym", "2", "--asym-steps", "2"]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert (tmp_path / "restore_pixelman.png").exists()
    for name in ("world", "photos"):
        methods = res["sets"][name]
        names = ("bicubic", "resshift", "resshift_ode", "obc_resshift", "diffusion_3", "obc_diffusion_3")
        names += ("diffusion_2", "obc_diffusion_2")
        assert set(methods) == set(names)
        assert [methods[m]["network_calls"] for m in names] == [0, 4, 4, 4, 3, 3, 2, 2]
        assert methods["resshift"]["n"] == (3 if name == "world" else 2)
    assert res["targets"]["resshift_matches_diffusion_3_world"]["status"] == "inconclusive"  # 3 images < 20
    assert res["targets"]["obc_beats_diffusion_2_photos"]["n"] == 2
    assert res["targets"]["obc_resshift_beats_resshift_world"]["n"] == 3
    pixelman = res["pixelman"]["methods"]
    assert res["pixelman"]["n"] == 2 and set(pixelman) == {"copy", "fill", "pixelman"}
    assert pixelman["copy"]["background_psnr_db"] > 45  # pasting changes nothing outside the masks
    assert 0 < pixelman["pixelman"]["network_calls"] <= 16
    asym = res["asymmetric_decoder"]
    assert (tmp_path / "restore_asymmetric.png").exists() and asym["text_to_image"]["n"] == 2
    assert set(asym["editing"]) == {"vae", "asymmetric_mask", "asymmetric_auto"}
    assert asym["reconstruction"]["asymmetric_object"]["n"] == 2
    assert res["targets"]["asym_background_psnr_beats_vae_mask"]["status"] == "inconclusive"  # 2 edits < 20
