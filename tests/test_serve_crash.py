"""Nothing lost: the real server (``stablekit serve``) is killed with SIGKILL while one job runs and others wait,
then restarted on the same data folder: every job ends in a stated status and every finished image is intact."""

import hashlib
import signal
import sys

import pytest
from serve_process import Server


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_server_loses_nothing(tmp_path):
    data, log = tmp_path / "data", tmp_path / "server.log"
    server = Server(data, log)
    try:
        done = server.submit({"prompt": "a red star", "steps": 3, "seed": 1})
        finished = server.wait(done)
        assert finished["status"] == "succeeded"
        running = server.submit({"prompt": "a blue circle", "steps": 150, "width": 128, "height": 128})
        queued = [server.submit({"prompt": f"shape {i}", "steps": 2, "seed": i}) for i in range(3)]
        server.wait(running, lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
        server.stop(signal.SIGKILL)

        server = Server(data, log)
        for job_id in [done, running, *queued]:
            server.wait(job_id)
        lost = server.job(running)
        assert lost["status"] == "failed" and lost["error"] == "server stopped while running"
        assert [server.job(j)["status"] for j in queued] == ["succeeded"] * 3
        history = {j["id"]: j for j in server.client.get("/v1/jobs?limit=100").json()}
        assert set(history) == {done, running, *queued}
        for job_id in [done, *queued]:
            (image,) = server.job(job_id)["result"]["images"]
            png = server.client.get(image["url"]).content
            assert hashlib.sha256(png).hexdigest() == image["sha256"]
            assert hashlib.sha256((data / "images" / f"{image['id']}.png").read_bytes()).hexdigest() == image["sha256"]
        assert server.job(done)["result"] == finished["result"]
        assert not list((data / "images").glob(".*.part"))
    finally:
        server.stop()
