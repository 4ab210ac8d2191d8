"""The HTTP service's native API on the embedded model: jobs, events, cancellation, the queue bound, persistence
of results, plugin isolation, keys, auth, and every kind of bad input answered 4xx with a JSON error."""

import base64
import hashlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from serve_helpers import LONG, embedded, make_client, open_png, png_b64, run_job, wait

import stablekit
from stablekit import cli

TOKEN = "t0ken-for-the-tests-0123456789"


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def _events(client, job_id: str, last: int | None = None) -> list[tuple[int, str, dict]]:
    headers = {} if last is None else {"Last-Event-ID": str(last)}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if not line.startswith(":"))
        out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return out


def test_txt2img_image_and_metadata_match_the_command_line(client, tmp_path):
    params = {"prompt": "a red star on a gray background", "seed": 5, "steps": 3}
    plugins = [{"name": "deepcache", "args": {"interval": 2}}]
    job = run_job(client, "txt2img", params, plugins)
    assert job["status"] == "succeeded" and job["error"] is None
    (image,) = job["result"]["images"]
    assert image["seed"] == 5 and image["url"] == f"/v1/images/{image['id']}.png"
    png = client.get(image["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert hashlib.sha256(png.content).hexdigest() == image["sha256"]
    served = open_png(png.content)

    out = tmp_path / "cli.png"
    args = ["generate", params["prompt"], "--seed", "5", "--steps", "3", "--accel", "deepcache:interval=2"]
    result = CliRunner().invoke(cli.cli, [*args, "-o", str(out), "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = open_png(out.read_bytes())
    ours = dict(served.text)
    assert ours.pop("parameters").startswith(params["prompt"] + "\nSteps: 3, Sampler: DPM++ 2M")
    assert ours == dict(written.text)
    assert {k: v for k, v in image["metadata"].items() if k != "parameters"} == ours
    assert np.array_equal(np.asarray(served), np.asarray(written))


def test_events_arrive_in_order_and_resume_after_last_event_id(client):
    job = run_job(client, "txt2img", {"prompt": "a blue circle", "steps": 4})
    events = _events(client, job["id"])
    ids = [e[0] for e in events]
    names = [e[1] for e in events]
    assert ids == list(range(1, len(events) + 1))
    assert names == ["queued", "running", "progress", "progress", "progress", "progress", "completed"]
    assert [e[2]["step"] for e in events if e[1] == "progress"] == [1, 2, 3, 4]
    assert events[-1][2]["status"] == "succeeded" and events[-1][2]["result"] == job["result"]
    resumed = _events(client, job["id"], last=4)
    assert resumed == events[4:]
    bad = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]


def test_preview_events_carry_the_current_image_while_the_job_runs(client):
    ahead = client.post("/v1/jobs", json={"task": "txt2img", "params": {"prompt": "a red star", "steps": 50}})
    params = {"prompt": "a blue circle", "steps": 6, "preview_every": 3}
    job = client.post("/v1/jobs", json={"task": "txt2img", "params": params}).json()
    events = _events(client, job["id"])  # connected while the job waits behind the first one
    previews = [e[2] for e in events if e[1] == "preview"]
    assert [p["step"] for p in previews] == [3, 6]
    head, _, data = previews[-1]["image"].partition(",")
    assert head == "data:image/png;base64" and open_png(base64.b64decode(data)).size == (64, 64)
    final = open_png(client.get(events[-1][2]["result"]["images"][0]["url"]).content)
    assert np.array_equal(np.asarray(open_png(base64.b64decode(data))), np.asarray(final))  # the last step's image
    after = _events(client, job["id"])  # only the newest preview keeps its image
    assert [sorted(e[2]) for e in after if e[1] == "preview"] == [["step"], ["image", "step"]]
    assert ahead.status_code == 202


def test_queue_bound_cancel_queued_and_running(tmp_path):
    with make_client(tmp_path, max_queue=1) as client:
        running = client.post("/v1/jobs", json={"task": "txt2img", "params": LONG}).json()["id"]
        wait(client, running, ("running",), step=1)
        queued = client.post("/v1/jobs", json={"task": "txt2img", "params": LONG}).json()
        assert queued["status"] == "queued" and queued["position"] == 0
        full = client.post("/v1/jobs", json={"task": "txt2img", "params": LONG})
        assert full.status_code == 429 and "queue is full" in full.json()["error"]
        assert int(full.headers["Retry-After"]) >= 1
        assert client.get("/v1/queue").json()["queued"] == [{"id": queued["id"], "position": 0}]

        gone = client.delete(f"/v1/jobs/{queued['id']}").json()
        assert gone["status"] == "cancelled" and gone["started"] is None
        assert client.get(f"/v1/jobs/{running}").json()["status"] == "running"  # cancel is by job
        client.delete(f"/v1/jobs/{running}")
        stopped = wait(client, running)
        assert stopped["status"] == "cancelled"
        assert client.get("/v1/queue").json() == {"running": None, "queued": [], "max_queue": 1}
        assert _events(client, running)[-1][1] == "cancelled"
        again = client.delete(f"/v1/jobs/{running}")
        assert again.status_code == 409 and "already cancelled" in again.json()["error"]
        assert stablekit.attached(embedded()) == []


def test_plugins_are_attached_per_job_only(client):
    plain = {"prompt": "a green square", "seed": 3, "steps": 3}
    before = run_job(client, "txt2img", plain)["result"]["images"][0]["sha256"]
    scheduler = type(embedded().scheduler)
    changed = run_job(
        client, "txt2img", plain, [{"name": "euler-a", "args": {}}, {"name": "deepcache", "args": {"interval": 2}}]
    )
    assert changed["result"]["images"][0]["metadata"]["scheduler"] == "euler-a"
    assert changed["result"]["images"][0]["sha256"] != before
    assert stablekit.attached(embedded()) == [] and type(embedded().scheduler) is scheduler
    assert run_job(client, "txt2img", plain)["result"]["images"][0]["sha256"] == before


def test_a_failed_job_fails_alone(client):
    odd = run_job(client, "img2img", {"prompt": "a red star", "image": png_b64((30, 30)), "steps": 2})
    assert odd["status"] == "failed" and "multiples of 4" in odd["error"]
    assert stablekit.attached(embedded()) == []
    assert run_job(client, "txt2img", {"prompt": "a red star", "steps": 2})["status"] == "succeeded"


def test_img2img_edit_invert_protect(client):
    image = png_b64((64, 64))
    source = open_png(base64.b64decode(image)).convert("RGB")
    img2img = run_job(client, "img2img", {"prompt": "a red star", "image": image, "steps": 4, "strength": 0.5})
    assert img2img["status"] == "succeeded" and img2img["result"]["images"][0]["metadata"]["strength"] == "0.5"
    edit = run_job(client, "edit", {"image": image, "source": "a red star", "target": "a blue star", "steps": 3})
    assert edit["status"] == "succeeded"
    assert {"source", "target", "method", "steps", "guidance", "model", "stablekit"} <= set(
        edit["result"]["images"][0]["metadata"]
    )
    inv = run_job(client, "invert", {"image": image, "prompt": "a red star", "method": "ddim", "steps": 3})
    assert inv["status"] == "succeeded" and inv["result"]["psnr_db"] > 0
    eps = 4 / 255
    prot = run_job(client, "protect", {"image": image, "method": "encoder", "eps": eps, "steps": 2})
    assert prot["status"] == "succeeded"
    out = open_png(client.get(prot["result"]["images"][0]["url"]).content).convert("RGB")
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(source, dtype=int))
    assert out.size == source.size and 0 < diff.max() <= 4


def test_keys_stay_on_the_server_and_name_watermarks(client, tmp_path):
    made = client.post("/v1/keys", json={"name": "k1", "method": "tree-ring"})
    assert made.status_code == 201 and made.json() == {"name": "k1", "method": "tree-ring", "width": 64, "height": 64}
    assert "secret" not in json.dumps(client.get("/v1/keys").json())
    path = tmp_path / "data" / "keys" / "k1.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert client.post("/v1/keys", json={"name": "k1", "method": "tree-ring"}).status_code == 409
    bad = client.post("/v1/keys", json={"name": "../evil", "method": "tree-ring"})
    assert bad.status_code == 400 and "key name" in bad.json()["error"]

    marked = run_job(
        client, "txt2img", {"prompt": "a red star", "steps": 4}, [{"name": "tree-ring", "args": {"key": "k1"}}]
    )
    assert marked["result"]["images"][0]["metadata"]["watermark"] == "tree-ring:key=k1"
    png = client.get(marked["result"]["images"][0]["url"]).content
    found = run_job(client, "detect", {"image": base64.b64encode(png).decode(), "keys": ["k1"], "steps": 4})
    assert found["status"] == "succeeded", found["error"]
    result = found["result"]
    assert result["key"] == "k1" and result["method"] == "tree-ring" and 0 <= result["p_value"] <= 1
    assert "secret" not in json.dumps(found)


def test_read_endpoints(client):
    run_job(client, "txt2img", {"prompt": "a red star", "steps": 2})
    assert client.get("/health").json()["status"] == "ok"
    (model,) = client.get("/v1/models").json()
    assert model["name"] == "stablekit-default" and model["native_size"] == 64
    plugins = client.get("/v1/plugins").json()
    kinds = {p["kind"] for p in plugins}
    assert kinds == {"accel", "scheduler", "guard", "watermark"}
    deepcache = next(p for p in plugins if p["name"] == "deepcache")
    assert deepcache["params"]["interval"]["default"] == 3
    assert "searched" not in {p["name"] for p in plugins}  # it reads a file named in the request
    metrics = client.get("/metrics").text
    assert 'stablekit_jobs{status="succeeded"} 1' in metrics and "stablekit_step_seconds_count 2" in metrics
    assert client.get("/v1/jobs").json()[0]["status"] == "succeeded"
    assert client.get("/docs").status_code == 200 and "/v1/jobs" in client.get("/openapi.json").json()["paths"]
    assert client.get("/").headers["content-type"].startswith("text/html")


def _bomb() -> str:
    """A PNG whose header claims 60000 x 60000 pixels (its data is 8 x 8)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    struct.pack_into(">II", data, 16, 60000, 60000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return base64.b64encode(bytes(data)).decode()


def _big() -> str:
    """A real 1100 x 1000 PNG: more pixels than the server allows, though small in bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (1100, 1000)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


TXT = {"prompt": "a red star", "steps": 2}
BAD = [
    ({"task": "paint", "params": TXT}, 422, "task"),
    ({"task": "txt2img", "params": {**TXT, "steps": 0}}, 422, "params.steps"),
    ({"task": "txt2img", "params": {**TXT, "steps": 151}}, 400, "limit of 150"),
    ({"task": "txt2img", "params": {**TXT, "width": 60}}, 400, "multiple of 8"),
    ({"task": "txt2img", "params": {**TXT, "width": 2048, "height": 2048}}, 400, "pixels"),
    ({"task": "txt2img", "params": {**TXT, "n": 99}}, 400, "params.n"),
    ({"task": "txt2img", "params": {**TXT, "colour": "red"}}, 422, "params.colour: unknown field"),
    ({"task": "txt2img", "params": {"steps": 2}}, 422, "params.prompt"),
    ({"task": "txt2img", "params": TXT, "plugins": [{"name": "warp"}]}, 400, "unknown plugin 'warp'"),
    ({"task": "txt2img", "params": TXT, "plugins": [{"name": "deepcache", "args": {"speed": 9}}]}, 400, "speed"),
    ({"task": "txt2img", "params": TXT, "plugins": [{"name": "deepcache", "args": {"interval": "x"}}]}, 400, "x"),
    ({"task": "txt2img", "params": TXT, "plugins": [{"name": "tree-ring", "args": {"key": "none"}}]}, 400, "no key"),
    ({"task": "txt2img", "params": TXT, "plugins": [{"name": "searched", "args": {"schedule": "/etc/x"}}]}, 400, ""),
    ({"task": "img2img", "params": {**TXT, "image": "!!notbase64!!"}}, 400, "base64"),
    ({"task": "img2img", "params": {**TXT, "image": base64.b64encode(b"plain text").decode()}}, 400, "not a readable"),
    ({"task": "img2img", "params": {**TXT, "image": _bomb()}}, 413, "decompression bomb"),
    ({"task": "img2img", "params": {**TXT, "image": _big()}}, 413, "1100x1000"),
    (
        {"task": "edit", "params": {"image": png_b64(), "source": "a", "target": "b"}, "plugins": [{"name": "sld"}]},
        400,
        "no plugins",
    ),
    ({"task": "edit", "params": {"image": png_b64(), "source": "a", "target": "b", "method": "magic"}}, 422, "method"),
    ({"task": "detect", "params": {"image": png_b64(), "keys": ["nokey"]}}, 400, "no key named 'nokey'"),
    ({"task": "detect", "params": {"image": png_b64(), "keys": ["../../etc/passwd"]}}, 400, "key name"),
    ({"task": "protect", "params": {"image": png_b64(), "method": "diffusionguard"}}, 400, "mask"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[f"{b['task']}-{w or i}" for i, (b, _, w) in enumerate(BAD)])
def test_bad_jobs_get_a_4xx_json_error(client, body, status, words):
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"] and "Traceback" not in r.text


@pytest.mark.parametrize(
    "method,path,status,words",
    [
        ("GET", "/v1/jobs/0123", 404, "no job"),
        ("GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd", 404, ""),
        ("DELETE", "/v1/jobs/" + "a" * 32, 404, "no job"),
        ("GET", "/v1/images/" + "b" * 32 + ".png", 404, "no image"),
        ("GET", "/v1/images/..%2Fjobs.sqlite3", 404, ""),
        ("GET", "/v1/nothing", 404, "no route"),
        ("PUT", "/v1/jobs", 405, "no route"),
        ("GET", "/v1/jobs?status=done", 422, "status"),
    ],
)
def test_bad_paths_get_a_4xx_json_error(client, method, path, status, words):
    r = client.request(method, path)
    assert r.status_code == status and words in r.json()["error"]


def test_bodies_that_are_not_json_or_too_large(tmp_path):
    with make_client(tmp_path, max_body=4096) as client:
        r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.json()["error"]
        big = {"task": "img2img", "params": {"prompt": "x", "image": png_b64((256, 256), 1)}}
        r = client.post("/v1/jobs", json=big)
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]


def test_token_bearer_basic_and_origin(tmp_path):
    with make_client(tmp_path, token=TOKEN) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/queue").status_code == 401
        assert client.get("/metrics").status_code == 401
        wrong = client.get("/v1/queue", headers={"Authorization": "Bearer " + TOKEN[:-1] + "X"})
        assert wrong.status_code == 401 and "token" in wrong.json()["error"]
        assert client.get("/v1/queue", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
        assert client.get("/sdapi/v1/options", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        auth = {"Authorization": f"Bearer {TOKEN}"}
        body = {"task": "txt2img", "params": {"prompt": "x", "steps": 1}}
        evil = client.post("/v1/jobs", json=body, headers={**auth, "Origin": "http://evil.example"})
        assert evil.status_code == 403 and "origin" in evil.json()["error"]
        same = client.post("/v1/jobs", json=body, headers={**auth, "Origin": "http://testserver"})
        assert same.status_code == 202
        assert client.get("/v1/queue", headers={**auth, "Origin": "http://evil.example"}).status_code == 200


def test_serve_command_refuses_a_public_host_without_a_token(tmp_path):
    result = CliRunner().invoke(cli.cli, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--host 0.0.0.0 is reachable from other machines: give --token-file" in result.output
    short = tmp_path / "token"
    short.write_text("abc\n")
    result = CliRunner().invoke(cli.cli, ["serve", "--token-file", str(short), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "at least 16 characters" in result.output
