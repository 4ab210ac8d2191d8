"""`stablekit batch` with the local executor on the tiny pipeline: every line checked before any work, images equal to
`generate`'s (pixels and metadata), bit-identical with 1 or 2 worker processes, resumable without writing a row
twice, and a Parquet copy of the manifest."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from stablekit import StablekitError, batch, cli
from stablekit.batch.manifest import MANIFEST
from stablekit.eval.harness import rnd

ROWS = [
    {"id": "star", "prompt": "a red star on a gray background"},
    {"prompt": "a blue circle on a black background", "seed": 7, "negative": "red"},
    {"prompt": "a red star on a gray background", "scheduler": "dpm++", "plugins": ["deepcache:interval=2"]},
    {"id": "wide", "prompt": "a green square", "size": "48x32", "guidance": 1},
]


def write_jobs(path, rows, steps=2, size="32x32"):
    lines = [json.dumps({"steps": steps, "size": size} | row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tmp_path, jobs, out, *extra, model):
    argv = ["batch", str(jobs), "--out", str(out), "--model", str(model), "--device", "cpu", *extra]
    return CliRunner().invoke(cli.cli, argv)


def manifest(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


BAD_LINES = {
    "malformed JSON": ('{"prompt": "a red star"', "not JSON"),
    "not an object": ('["a red star"]', "not a JSON object"),
    "no prompt": ('{"seed": 3}', "no prompt"),
    "unknown field": ('{"prompt": "a", "colour": "red"}', "unknown field 'colour'"),
    "unknown plugin": ('{"prompt": "a", "plugins": ["warp-speed"]}', "unknown plugin 'warp-speed'"),
    "bad plugin parameter": ('{"prompt": "a", "plugins": ["deepcache:speed=3"]}', "has no parameter 'speed'"),
    "size not a multiple of 8": ('{"prompt": "a", "size": "30x32"}', "multiples of 8"),
    "size not WxH": ('{"prompt": "a", "size": "big"}', "is not"),
    "unknown scheduler": ('{"prompt": "a", "scheduler": "fastest"}', "unknown scheduler 'fastest'"),
    "steps 0": ('{"prompt": "a", "steps": 0}', "at least 1"),
    "seed as text": ('{"prompt": "a", "seed": "7"}', 'seed "7" is not a whole number'),
    "negative without guidance": ('{"prompt": "a", "guidance": 1, "negative": "b"}', "guidance <= 1"),
    "bad id": ('{"prompt": "a", "id": "../x"}', "id '../x' must be"),
    "duplicate id": ('{"prompt": "a", "id": "star"}', "id 'star' is already line 1's"),
    "missing key file": ('{"prompt": "a", "watermark": "no-such-key.json"}', "key file 'no-such-key.json' does not"),
    "bad inline key": ('{"prompt": "a", "watermark": {"method": "seal"}}', "is not a valid stablekit watermark key"),
    "watermark as a number": ('{"prompt": "a", "watermark": 7}', "watermark must be a key file's path"),
    "missing adapter": ('{"prompt": "a", "adapters": ["gone.safetensors"]}', "adapter file 'gone.safetensors' does"),
    "adapters not a list": ('{"prompt": "a", "adapters": "x.safetensors"}', "adapters must be a list"),
    "negative spm_multiplier": ('{"prompt": "a", "spm_multiplier": -1}', "spm_multiplier -1 must be >= 0"),
}


@pytest.mark.parametrize("line, message", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_a_bad_line_stops_the_run_before_any_work_and_names_its_line(tmp_path, tiny_sd_path, line, message):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "star", "prompt": "a red star"}\n\n' + line + "\n")  # a blank line 2 still counts
    out = tmp_path / "out"
    result = run(tmp_path, jobs, out, model=tiny_sd_path)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {jobs}:3: ") and message in result.stderr
    assert not out.exists()  # nothing written


def test_rows_are_the_images_generate_makes_with_its_metadata(tmp_path, tiny_sd_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", ROWS)
    out = tmp_path / "out"
    result = run(tmp_path, jobs, out, model=tiny_sd_path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("4 written, 0 already done, of 4 rows")
    records = manifest(out)
    assert [r["id"] for r in records] == ["star", "000002", "000003", "wide"]
    assert [r["seed"] for r in records] == [0, 7, 2, 3]  # a row's position is its default seed
    assert Image.open(out / "images" / "wide.png").size == (48, 32)
    for record, args in zip(
        records[:3],
        (
            ["--seed", "0"],
            ["--seed", "7", "--negative", "red"],
            ["--seed", "2", "--scheduler", "dpm++", "--accel", "deepcache:interval=2"],
        ),
        strict=True,
    ):
        png = tmp_path / f"{record['id']}.png"
        argv = ["generate", record["params"]["prompt"], *args, "--steps", "2", "--size", "32x32", "-o", str(png)]
        assert CliRunner().invoke(cli.cli, [*argv, "--model", str(tiny_sd_path), "--device", "cpu"]).exit_code == 0
        assert png.read_bytes() == (out / record["image"]).read_bytes()  # pixels and every text chunk


def test_one_or_two_workers_give_bit_identical_images(tmp_path, tiny_sd_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", ROWS + [{"prompt": f"a red star number {i}"} for i in range(3)])
    one = batch.run(jobs, tmp_path / "one", model=str(tiny_sd_path), device="cpu", workers=1)
    two = batch.run(jobs, tmp_path / "two", model=str(tiny_sd_path), device="cpu", workers=2)
    assert one["written"] == two["written"] == 7
    by_id = {r["id"]: r for r in manifest(tmp_path / "one")}
    workers = set()
    for record in manifest(tmp_path / "two"):
        assert record["sha256"] == by_id[record["id"]]["sha256"]
        assert (tmp_path / "two" / record["image"]).read_bytes() == (tmp_path / "one" / record["image"]).read_bytes()
        workers.add(record["worker"])
    # the second run's images were made in pool processes, not in this one (how the pool splits rows between its
    # two processes is its own choice on a loaded machine; every row is bit-identical whichever made it)
    assert workers and not workers & {r["worker"] for r in by_id.values()}


def test_a_rerun_skips_done_rows_and_never_writes_a_row_twice(tmp_path, tiny_sd_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", ROWS[:3])
    out = tmp_path / "out"
    batch.run(jobs, out, model=str(tiny_sd_path), device="cpu")
    first = manifest(out)
    kept = (out / MANIFEST).read_text().splitlines(keepends=True)
    (out / MANIFEST).write_text("".join(kept[:2]) + kept[2][:40])  # stopped while writing the third line
    again = batch.run(jobs, out, model=str(tiny_sd_path), device="cpu")
    assert (again["written"], again["skipped"]) == (1, 2)
    records = manifest(out)
    assert [r["id"] for r in records] == [r["id"] for r in first]
    assert [r["sha256"] for r in records] == [r["sha256"] for r in first]  # the redone row is the same image
    assert batch.run(jobs, out, model=str(tiny_sd_path), device="cpu")["written"] == 0
    assert len(manifest(out)) == 3
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{r['id']}.png" for r in first)


def test_a_done_id_with_other_parameters_is_refused(tmp_path, tiny_sd_path):
    out = tmp_path / "out"
    batch.run(write_jobs(tmp_path / "a.jsonl", ROWS[:1]), out, model=str(tiny_sd_path), device="cpu")
    before = (out / MANIFEST).read_text()
    changed = write_jobs(tmp_path / "b.jsonl", [ROWS[0] | {"seed": 5}])
    with pytest.raises(StablekitError, match="line 1: id 'star' is in .* with other parameters"):
        batch.run(changed, out, model=str(tiny_sd_path), device="cpu")
    assert (out / MANIFEST).read_text() == before


def test_the_parquet_copy_holds_the_manifest(tmp_path, tiny_sd_path):
    out = tmp_path / "out"
    summary = batch.run(write_jobs(tmp_path / "jobs.jsonl", ROWS), out, model=str(tiny_sd_path), device="cpu")
    table = pq.read_table(summary["parquet"]).to_pylist()
    records = manifest(out)
    assert [r["id"] for r in table] == [r["id"] for r in records]
    assert [r["sha256"] for r in table] == [r["sha256"] for r in records]
    assert [r["params.size"] for r in table] == [[32, 32], [32, 32], [32, 32], [48, 32]]
    assert all(r["seconds"] > 0 for r in table)


def test_the_batch_benchmark_at_tiny_scale(tmp_path, tiny_sd_path):
    from stablekit.cli.bench import load_benchmark

    out = tmp_path / "batch.json"
    argv = ["--json", str(out), "--model", str(tiny_sd_path), "--device", "cpu", "--images", "3", "--rounds", "1"]
    res = load_benchmark("batch").main([*argv, "--steps", "1", "--size", "32", "--no-ray"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res)) and out.with_suffix(".png").exists()
    assert [len(res["seconds"][w]) for w in ("one", "two")] == [1, 1] and "ray" not in res["seconds"]
    assert res["targets"]["identical_images"]["status"] == "met"  # 1 and 2 workers: the same images
    assert res["targets"]["two_workers_speedup"]["status"] == "not measured"  # one round gives no interval
    assert res["images_per_second"]["one"]["all"] == [rnd(3 / s) for s in res["seconds"]["one"]]
    assert res["speedup_two_over_one"]["all"] == [rnd(res["seconds"]["one"][0] / res["seconds"]["two"][0])]


def test_a_watermark_row_is_the_image_generate_makes_with_that_key(tmp_path, tiny_sd_path):
    key = tmp_path / "key.json"
    model = ["--model", str(tiny_sd_path)]
    assert CliRunner().invoke(cli.cli, ["keygen", "tree-ring", "-o", str(key), "--seed", "3", *model]).exit_code == 0
    inline = json.loads(key.read_text())
    rows = [
        {"id": "file", "prompt": "a red star", "seed": 5, "watermark": str(key)},
        {"id": "inline", "prompt": "a red star", "seed": 5, "watermark": inline},
        {"id": "plain", "prompt": "a red star", "seed": 5},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"steps": 2} | row) + "\n" for row in rows))
    out = tmp_path / "out"
    assert run(tmp_path, jobs, out, model=tiny_sd_path).exit_code == 0
    png = tmp_path / "generate.png"
    argv = ["generate", "a red star", "--seed", "5", "--steps", "2", "--key-file", str(key), "-o", str(png), *model]
    assert CliRunner().invoke(cli.cli, [*argv, "--device", "cpu"]).exit_code == 0
    marked = png.read_bytes()
    assert (out / "images" / "file.png").read_bytes() == marked  # pixels and every text chunk
    assert (out / "images" / "inline.png").read_bytes() == marked
    assert (out / "images" / "plain.png").read_bytes() != marked  # the key changed the image
    records = {r["id"]: r for r in manifest(out)}
    shown = records["file"]["params"]["watermark"]
    assert shown == records["inline"]["params"]["watermark"] and shown["method"] == "tree-ring"
    assert inline["secret"] not in (out / MANIFEST).read_text()  # the manifest never holds the secret


def test_a_watermark_key_for_another_size_is_refused(tmp_path, tiny_sd_path):
    key = tmp_path / "key.json"
    argv = ["keygen", "seal", "-o", str(key), "--seed", "1", "--model", str(tiny_sd_path)]
    assert CliRunner().invoke(cli.cli, argv).exit_code == 0
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a", "watermark": str(key), "size": "48x48"}])
    result = run(tmp_path, jobs, tmp_path / "out", model=tiny_sd_path)
    assert result.exit_code == 2 and f"{jobs}:1: size 48x48 but the watermark key is for" in result.stderr
    assert not (tmp_path / "out").exists()


def test_generate_groups_rows_into_batches_and_returns_them_in_order(tiny_sd_path):
    rows = [{"prompt": f"a red star number {i}", "seed": i, "steps": 2, "size": "32x32"} for i in range(5)]
    rows[3] |= {"guidance": 3.0}  # another setting: a batch of its own
    units = batch.units_of(batch.check_rows(rows), 2)
    assert [[r.seed for r in unit] for unit in units] == [[0, 1], [2], [3], [4]]
    alone = batch.generate(rows, model=str(tiny_sd_path), device="cpu", threads=1)
    grouped = batch.generate(rows, model=str(tiny_sd_path), device="cpu", threads=1, group=2)
    assert [r["record"]["seed"] for r in grouped] == [0, 1, 2, 3, 4]
    for one, many in zip(alone, grouped, strict=True):
        difference = np.abs(np.asarray(one["image"], float) - np.asarray(many["image"], float))
        assert difference.max() <= 2  # batched or not: the same image up to float rounding
    with pytest.raises(StablekitError, match="row 1: id 'x' is already row 0's"):
        batch.generate([{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}], model=str(tiny_sd_path))


def test_an_adapter_and_guard_row_is_the_image_generate_makes_with_them(tmp_path, tiny_sd_path):
    adapter = tmp_path / "no-star.safetensors"
    erase = ["erase", "--concept", "star", "--preserve", "circle", "-o", str(adapter), "--model", str(tiny_sd_path)]
    assert CliRunner().invoke(cli.cli, erase).exit_code == 0
    row = {
        "id": "erased",
        "prompt": "a red star",
        "seed": 4,
        "adapters": [str(adapter)],
        "plugins": ["sld:concepts=[red]"],
    }
    out = tmp_path / "out"
    assert run(tmp_path, write_jobs(tmp_path / "jobs.jsonl", [row]), out, model=tiny_sd_path).exit_code == 0
    png = tmp_path / "generate.png"
    argv = ["generate", "a red star", "--seed", "4", "--steps", "2", "--size", "32x32", "--adapter", str(adapter)]
    argv += ["--guard", "sld:concepts=[red]", "-o", str(png), "--model", str(tiny_sd_path), "--device", "cpu"]
    assert CliRunner().invoke(cli.cli, argv).exit_code == 0
    assert (out / "images" / "erased.png").read_bytes() == png.read_bytes()  # pixels and every text chunk
    assert manifest(out)[0]["params"]["adapters"] == [str(adapter.resolve())]
