"""benchmarks/inversion.py end to end at tiny scale on the default model: batches of images, every method."""

import json

from stablekit.cli.bench import load_benchmark


def test_inversion_benchmark_in_batches(tmp_path):
    bench = load_benchmark("inversion")
    out = tmp_path / "inv.json"
    res = bench.main(
        [
            "--json",
            str(out),
            "--images",
            "3",
            "--steps",
            "2",
            "--batch",
            "2",
            "--no-photos",
            "--methods",
            "edict",
            "direct",
            "infedit",
            "--grid-rows",
            "3",
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    methods = res["methods"]
    for m in ("vae", "edict", "direct", "infedit"):
        assert methods[m]["reconstruction"]["world"]["n"] == 3  # a batch of 2, then of 1
    assert methods["edict"]["reconstruction"]["world"]["latent_mse"] < 1e-12  # exact, batched too
    assert methods["direct"]["reconstruction"]["world"]["latent_mse"] == 0  # walks its pivot bit for bit
    vae_db = methods["vae"]["reconstruction"]["world"]["pixel_psnr_db"]
    assert abs(methods["edict"]["reconstruction"]["world"]["pixel_psnr_db"] - vae_db) < 0.01
    for m in ("edict", "direct", "infedit"):
        assert methods[m]["edit_color"]["n"] == methods[m]["edit_shape"]["n"] == 3
