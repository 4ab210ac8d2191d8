"""The web studio in a real browser: Debian's chromium, driven by Playwright, against ``stablekit serve`` (a
subprocess on the embedded model, with a token). The page asks for the token once, fills its choices from the
server, generates with plugins and a watermark key it makes, shows live progress from the event stream, cancels
a queued job and a running one (each alone), shows every image with its metadata, and runs the detect tab."""

import base64
from pathlib import Path

import pytest
from serve_process import Server

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "studio-test-token-0123456789"
LONG = 150  # steps: the server's limit, long enough to watch and cancel

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("studio")
    (tmp / "token").write_text(TOKEN + "\n")
    server = Server(tmp / "data", tmp / "server.log", "--token-file", str(tmp / "token"), token=TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(server.url + "/")
        page.locator("#token").fill(TOKEN)  # the first API call got 401: the page asks for the token
        page.locator("#token-form button[type=submit]").click()
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        yield page
        browser.close()


def _card(page, job_id: str):
    return page.locator(f"article.job[data-id='{job_id}']")


def _newest_id(page) -> str:
    return page.locator("article.job").first.get_attribute("data-id")


def _submit(page, panel: str) -> str:
    """Submit the form of `panel` and return the new job's id."""
    before = page.locator("article.job").count()
    page.locator(f"#panel-{panel} button[type=submit]").click()
    page.wait_for_function(f"document.querySelectorAll('article.job').length > {before}")
    return _newest_id(page)


def _generate(page, prompt: str, steps: int) -> str:
    page.locator("#prompt").fill(prompt)
    page.locator("#steps").fill(str(steps))
    return _submit(page, "generate")


def _terms(card, which: str) -> dict[str, str]:
    names = card.locator(f"dl.{which} dt").all_inner_texts()
    return dict(zip(names, card.locator(f"dl.{which} dd").all_inner_texts(), strict=True))


def test_the_page_asks_for_the_token_once_and_lists_the_servers_choices(page, server):
    assert page.evaluate("sessionStorage.getItem('stablekit.token')") == TOKEN
    assert not page.locator("#token-dialog").is_visible()
    names = {p["kind"]: [] for p in server.client.get("/v1/plugins").json()}
    for p in server.client.get("/v1/plugins").json():
        names[p["kind"]].append(p["name"])
    for select, kind in (("#sampler", "scheduler"), ("#accel", "accel"), ("#guard", "guard")):
        options = page.locator(f"{select} option").evaluate_all("os => os.map(o => o.value)")
        assert options == ["", *names[kind]]
    assert page.locator("#edit-method option").count() >= 2 and page.locator("#protect-method option").count() >= 2
    assert "stablekit-default" in page.locator("#model").inner_text()
    assert page.locator("#width").input_value() == "64"


def test_generate_with_plugins_and_a_key_shows_the_image_and_its_metadata(page, server, tmp_path):
    page.locator("#new-key summary").click()
    page.locator("#key-name").fill("studio-key")
    page.locator("#key-method").select_option("tree-ring")
    page.locator("#make-key").click()
    page.wait_for_selector("#watermark option[value='studio-key']", state="attached")
    assert page.locator("#watermark").input_value() == "studio-key"
    page.locator("#seed").fill("7")
    page.locator("#guidance").fill("5")
    page.locator("#sampler").select_option("euler")
    page.locator("#accel").select_option("deepcache")
    page.locator("#guard").select_option("sld")
    assert "concepts" in page.locator("#guard-args").get_attribute("placeholder")  # the plugin's parameters
    page.locator("#guard-args").fill('{"concepts": ["star"], "warmup": 1}')
    job_id = _generate(page, "a blue circle", 6)
    card = _card(page, job_id)
    card.locator("figure img").wait_for(timeout=60_000)
    page.wait_for_function(
        f"document.querySelector(\"article.job[data-id='{job_id}'] img\").naturalWidth === 64", timeout=30_000
    )
    job = server.job(job_id)
    assert job["status"] == "succeeded" and card.get_attribute("data-status") == "succeeded"
    assert {p["name"] for p in job["plugins"]} == {"euler", "deepcache", "sld", "tree-ring"}
    assert job["plugins"][2] == {"name": "sld", "args": {"concepts": ["star"], "warmup": 1}}
    (image,) = job["result"]["images"]
    meta = _terms(card, "meta")
    assert meta["prompt"] == "a blue circle" and meta["seed"] == "7" and meta["steps"] == "6"
    assert meta["sha256"] == image["sha256"] and "euler" in meta["scheduler"]
    png = tmp_path / "marked.png"
    png.write_bytes(server.client.get(image["url"]).content)
    page.locator("#tab-detect").click()
    assert page.locator("#panel-detect").is_visible() and not page.locator("#panel-generate").is_visible()
    page.locator("#detect-image").set_input_files(str(png))
    page.locator("#detect-key").select_option("studio-key")
    page.locator("#detect-steps").fill("4")
    detected = _card(page, _submit(page, "detect"))
    detected.and_(page.locator("[data-status=succeeded]")).wait_for(timeout=60_000)
    found = _terms(detected, "result")
    assert found["key"] == "studio-key" and "detected" in found
    page.locator("#tab-generate").click()


def test_bad_input_is_answered_on_the_page_and_nothing_is_queued(page, server):
    before = page.locator("article.job").count()
    page.locator("#guard").select_option("sld")
    page.locator("#guard-args").fill("{oops")
    page.locator("#generate").click()
    assert "arguments of guard: not JSON" in page.locator("#message").inner_text()
    page.locator("#guard-args").fill("{}")  # the server refuses SLD without concepts, with its reason
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#message').textContent.includes('concepts')")
    assert page.locator("#message").is_visible() and page.locator("article.job").count() == before
    page.locator("#guard").select_option("")
    page.locator("#guard-args").fill("")
    page.locator("#generate").click()  # a good request clears the message
    page.wait_for_function(f"document.querySelectorAll('article.job').length > {before}")
    assert not page.locator("#message").is_visible()
    page.locator("article.job").first.and_(page.locator("[data-status=succeeded]")).wait_for(timeout=60_000)


def test_more_jobs_than_the_browser_has_connections_all_finish_on_the_page(page, server):
    page.locator("#accel").select_option("")
    page.locator("#guard").select_option("")
    page.locator("#watermark").select_option("")
    ids = [_generate(page, f"quick {i}", 1) for i in range(8)]  # each followed job holds a connection
    for job_id in ids:
        _card(page, job_id).and_(page.locator("[data-status=succeeded]")).wait_for(timeout=60_000)
        _card(page, job_id).locator("figure img").wait_for()
    assert len(set(ids)) == 8 and all(server.job(j)["status"] == "succeeded" for j in ids)


def _progress(card) -> tuple[float, float]:
    bar = card.locator("progress")
    return float(bar.evaluate("b => b.value")), float(bar.evaluate("b => b.max"))


def test_progress_moves_and_cancel_stops_only_that_job(page, server, tmp_path):
    running = _generate(page, "a long job", LONG)
    queued = _generate(page, "a job that waits", LONG)
    assert _card(page, queued).get_attribute("data-status") == "queued"
    page.wait_for_function(
        f"document.querySelector(\"article.job[data-id='{running}'] progress\").value >= 2", timeout=60_000
    )
    first, total = _progress(_card(page, running))
    assert total == LONG
    _card(page, queued).locator("button.cancel").click()
    _card(page, queued).and_(page.locator("[data-status=cancelled]")).wait_for(timeout=10_000)
    page.wait_for_function(
        f"document.querySelector(\"article.job[data-id='{running}'] progress\").value > {first + 2}",
        timeout=60_000,
    )
    assert "step" in _card(page, running).locator(".progress-text").inner_text()
    preview = _card(page, running).locator("img.preview")  # the running job's image every 5 steps
    preview.wait_for(state="visible", timeout=30_000)
    assert preview.get_attribute("src").startswith("data:image/png;base64,")
    assert server.job(running)["status"] == "running"
    _card(page, running).locator("button.cancel").click()
    _card(page, running).and_(page.locator("[data-status=cancelled]")).wait_for(timeout=30_000)
    stopped = server.job(running)
    assert stopped["status"] == "cancelled" and server.job(queued)["status"] == "cancelled"
    assert first < _progress(_card(page, running))[0] < LONG
    assert not _card(page, running).locator("button.cancel").is_visible()
    after = _generate(page, "after the cancel", 2)  # the worker goes on
    _card(page, after).and_(page.locator("[data-status=succeeded]")).wait_for(timeout=60_000)
    page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
    shot = (tmp_path / "studio.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    assert page.errors == []


def test_protect_and_edit_tabs_upload_an_image(page, server, tmp_path):
    from serve_helpers import png_b64

    photo = tmp_path / "photo.png"
    photo.write_bytes(base64.b64decode(png_b64((64, 64))))
    page.locator("#tab-protect").click()
    page.locator("#protect-image").set_input_files(str(photo))
    page.locator("#protect-eps").fill("4")
    page.locator("#protect-steps").fill("1")
    protected = _submit(page, "protect")
    _card(page, protected).locator("figure img").wait_for(timeout=60_000)
    job = server.job(protected)
    assert job["task"] == "protect" and abs(job["params"]["eps"] - 4 / 255) < 1e-9
    page.locator("#tab-edit").click()
    page.locator("#edit-image").set_input_files(str(photo))
    page.locator("#edit-source").fill("a gray square")
    page.locator("#edit-target").fill("a red square")
    page.locator("#edit-steps").fill("2")
    edited = _submit(page, "edit")
    _card(page, edited).locator("figure img").wait_for(timeout=60_000)
    job = server.job(edited)
    assert job["task"] == "edit" and job["params"]["target"] == "a red square" and job["status"] == "succeeded"
    assert page.errors == []
