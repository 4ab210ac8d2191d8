"""The studio's files as the server serves them, and GET /v1/tasks, which fills the page's method lists."""

import re

import pytest
from serve_helpers import make_client

from stablekit.serve import tasks

TOKEN = "studio-token-0123456789abcdef"


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path, token=TOKEN) as c:
        yield c


def test_the_page_and_its_files_are_served_without_the_token_the_api_asks_for(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "stablekit studio" in page.text
    files = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    assert sorted(files) == ["/static/studio.css", "/static/studio.js"]
    kinds = {"/static/studio.css": "text/css", "/static/studio.js": "javascript"}
    for path in files:
        r = client.get(path)
        assert r.status_code == 200 and kinds[path] in r.headers["content-type"] and r.content
    assert client.get("/v1/plugins").status_code == 401


def test_every_id_the_script_reads_is_in_the_page(client):
    page = client.get("/").text
    script = client.get("/static/studio.js").text
    used = set(re.findall(r'\$\("#([a-z-]+)"\)', script)) | set(re.findall(r'"#([a-z-]+)"', script))
    assert used and used <= set(re.findall(r'id="([a-z-]+)"', page))


def test_tasks_lists_each_tasks_parameters_and_method_choices(client):
    schemas = client.get("/v1/tasks", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert set(schemas) == {"txt2img", "img2img", "edit", "invert", "protect", "detect"}
    for task in ("edit", "invert", "protect"):
        assert tuple(schemas[task]["properties"]["method"]["enum"]) == tasks.CHOICES[task]
    assert schemas["txt2img"]["required"] == ["prompt"] and "negative_prompt" in schemas["txt2img"]["properties"]
