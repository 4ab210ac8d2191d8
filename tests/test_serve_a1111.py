"""The AUTOMATIC1111-compatible layer: A1111's whole request field set, sampler names, seeds, PNG info, progress,
interrupt, models and options."""

import base64
import json
import threading
import time

import pytest
from serve_helpers import LONG, make_client, open_png, png_b64, wait

# A1111 1.10's txt2img request with every field at its default (small size and few steps aside)
A1111_TXT2IMG = {
    "prompt": "a red star on a gray background",
    "negative_prompt": "",
    "styles": [],
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": "Euler a",
    "scheduler": "automatic",
    "batch_size": 1,
    "n_iter": 1,
    "steps": 3,
    "cfg_scale": 7,
    "width": 64,
    "height": 64,
    "restore_faces": None,
    "tiling": None,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "denoising_strength": None,
    "s_min_uncond": None,
    "s_churn": None,
    "s_tmax": None,
    "s_tmin": None,
    "s_noise": None,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "disable_extra_networks": False,
    "firstpass_image": None,
    "comments": None,
    "enable_hr": False,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2,
    "hr_upscaler": None,
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": None,
    "hr_sampler_name": None,
    "hr_scheduler": None,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "force_task_id": None,
    "sampler_index": "Euler",
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
    "infotext": None,
}


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def _scheduler_of(client, b64: str) -> str:
    return client.post("/sdapi/v1/png-info", json={"image": b64}).json()["items"]["scheduler"]


def test_whole_field_set_at_defaults_works_and_seed_minus_one_is_resolved(client):
    r = client.post("/sdapi/v1/txt2img", json=A1111_TXT2IMG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"] == A1111_TXT2IMG
    info = json.loads(body["info"])
    assert info["seed"] != -1 and info["all_seeds"] == [info["seed"]] and 0 <= info["seed"] < 2**32
    assert info["sampler_name"] == "Euler a" and (info["width"], info["height"]) == (64, 64)
    (b64,) = body["images"]
    image = open_png(base64.b64decode(b64))
    assert image.size == (64, 64)
    assert image.text["parameters"] == info["infotexts"][0]
    assert image.text["parameters"].startswith(A1111_TXT2IMG["prompt"] + "\nSteps: 3, Sampler: Euler a")
    assert image.text["seed"] == str(info["seed"]) and image.text["scheduler"] == "euler-a"


@pytest.mark.parametrize(
    "field,value", [("enable_hr", True), ("restore_faces", True), ("subseed_strength", 0.5), ("styles", ["x"])]
)
def test_unimplemented_field_at_another_value_is_refused_by_name(client, field, value):
    r = client.post("/sdapi/v1/txt2img", json={**A1111_TXT2IMG, field: value})
    assert r.status_code == 422 and r.json()["error"].startswith(f"{field}: not implemented")


def test_unknown_fields_and_bad_values_are_refused_by_name(client):
    for body, words in [
        ({**A1111_TXT2IMG, "colour": "red"}, "colour: not a field"),
        ({**A1111_TXT2IMG, "sampler_name": "Warp 9"}, "sampler_name: unknown sampler 'Warp 9'"),
        ({**A1111_TXT2IMG, "sampler_name": "DDIM", "scheduler": "karras"}, "scheduler"),
        ({**A1111_TXT2IMG, "scheduler": "exponential"}, "scheduler"),
        ({**A1111_TXT2IMG, "steps": 0}, "steps"),
        ({**A1111_TXT2IMG, "override_settings": {"sd_model_checkpoint": "sd-xl"}}, "sd_model_checkpoint"),
        ({**A1111_TXT2IMG, "override_settings": {"CLIP_stop_at_last_layers": 2}}, "CLIP_stop_at_last_layers"),
    ]:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert 400 <= r.status_code < 500 and words in r.json()["error"], (words, r.text)
    r = client.post("/sdapi/v1/img2img", json={**A1111_TXT2IMG, "init_images": ["bm90IGFuIGltYWdl"]})
    assert r.status_code == 400 and "not a readable image" in r.json()["error"]


@pytest.mark.parametrize("sampler,ours", [("Euler a", "euler-a"), ("DPM++ 2M", "dpm++"), ("DDIM", "ddim")])
def test_sampler_names_map_to_ours(client, sampler, ours):
    body = {"prompt": "a red star", "steps": 2, "width": 64, "height": 64, "sampler_name": sampler, "seed": 7}
    r = client.post("/sdapi/v1/txt2img", json=body).json()
    assert _scheduler_of(client, r["images"][0]) == ours
    assert json.loads(r["info"])["sampler_name"] == sampler


def test_karras_schedule_and_batches_give_consecutive_seeds(client):
    body = {"prompt": "a red star", "steps": 2, "width": 64, "height": 64, "seed": 11, "batch_size": 2, "n_iter": 2}
    r = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "DPM++ 2M", "scheduler": "karras"}).json()
    assert json.loads(r["info"])["all_seeds"] == [11, 12, 13, 14] and len(r["images"]) == 4
    assert _scheduler_of(client, r["images"][0]) == "dpm++:use_karras_sigmas=true"


def test_img2img_keeps_the_init_image_size(client):
    body = {"prompt": "a red star", "steps": 4, "init_images": [png_b64((96, 64))], "denoising_strength": 0.5}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    assert open_png(base64.b64decode(r.json()["images"][0])).size == (96, 64)
    assert json.loads(r.json()["info"])["denoising_strength"] == 0.5


def test_progress_and_interrupt_touch_a1111_jobs_only(client):
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt").json() == {}

    native = client.post("/v1/jobs", json={"task": "txt2img", "params": LONG}).json()["id"]
    wait(client, native, ("running",), step=1)
    client.post("/sdapi/v1/interrupt")
    assert wait(client, native, ("running",), step=3)["status"] == "running"  # not stopped by interrupt
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["state"]["job"] == native and 0 < progress["progress"] < 1
    client.delete(f"/v1/jobs/{native}")
    wait(client, native)

    answer = {}
    a1111 = {"prompt": "a red star", "steps": 150, "width": 128, "height": 128, "seed": 3}
    thread = threading.Thread(target=lambda: answer.update(r=client.post("/sdapi/v1/txt2img", json=a1111)))
    thread.start()
    job, end = None, time.monotonic() + 60
    while job is None and time.monotonic() < end:
        running = client.get("/v1/queue").json()["running"]
        job = running["id"] if running and running["step"] >= 1 else None
        time.sleep(0.02)
    client.post("/sdapi/v1/interrupt")
    thread.join(60)
    info = json.loads(answer["r"].json()["info"])
    assert answer["r"].status_code == 200 and info["interrupted"] and info["all_seeds"] == [3]
    assert len(answer["r"].json()["images"]) == 1  # as A1111: the interrupted image is returned
    assert client.get(f"/v1/jobs/{job}").json()["status"] == "cancelled"


def test_models_samplers_options_and_png_info(client):
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "stablekit-default"
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(names)
    assert [s["name"] for s in client.get("/sdapi/v1/schedulers").json()] == ["automatic", "karras"]
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "stablekit-default"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "stablekit-default"}).status_code == 200
    refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
    assert refused.status_code == 422 and refused.json()["error"].startswith("sd_model_checkpoint")
    plain = client.post("/sdapi/v1/png-info", json={"image": png_b64()}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}
    assert client.post("/sdapi/v1/png-info", json={"image": "@@"}).status_code == 400
