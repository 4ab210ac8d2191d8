"""The AUTOMATIC1111-compatible layer, ``/sdapi/v1/...``, so that existing clients of that API work unchanged.

``txt2img`` and ``img2img`` become jobs of the native queue (``source: "a1111"``) and answer when the job
ends: base64 PNGs, the request as ``parameters``, and ``info``, a JSON string with ``seed`` and
``all_seeds`` (a seed of -1 is resolved to the one used). Sampler names ("Euler a", "DPM++ 2M", "DDIM", ...)
and the schedule types ``automatic`` and ``karras`` map to our schedulers (:mod:`.infotext`).

Clients send A1111's whole field set. A field we do not implement is accepted at A1111's default values
(:data:`UNIMPLEMENTED`) and refused with 422 naming it at any other value; a field A1111 does not have
either is refused too. ``POST /interrupt`` stops the running job only if it came through this layer
(A1111's interrupt is global; here no client can stop a native job with it).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import __version__
from . import tasks
from .infotext import ALIASES, KARRAS, SAMPLERS, SCHEDULES, parse_infotext
from .jobs import Jobs, validation_message
from .schemas import ApiError, JobRequest, decode_image
from .store import TERMINAL

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

ANY = object()  # a field we accept at every value: it changes nothing in the images
NONE = (None, "")
UNIMPLEMENTED: dict[str, tuple] = {
    "styles": (None, []),
    "subseed": (-1, None),
    "subseed_strength": (0, None),
    "seed_resize_from_h": (-1, 0, None),
    "seed_resize_from_w": (-1, 0, None),
    "restore_faces": (None, False),
    "tiling": (None, False),
    "eta": (None,),
    "s_min_uncond": (None, 0),
    "s_churn": (None, 0),
    "s_tmax": (None, 0),
    "s_tmin": (None, 0),
    "s_noise": (None, 1),
    "refiner_checkpoint": NONE,
    "refiner_switch_at": (None, 0),
    "disable_extra_networks": (False, None),
    "firstpass_image": NONE,
    "comments": (None, {}),
    "enable_hr": (False, None),
    "firstphase_width": (0, None),
    "firstphase_height": (0, None),
    "hr_scale": (2, None),
    "hr_upscaler": (*NONE, "Latent"),
    "hr_second_pass_steps": (0, None),
    "hr_resize_x": (0, None),
    "hr_resize_y": (0, None),
    "hr_checkpoint_name": NONE,
    "hr_sampler_name": NONE,
    "hr_scheduler": NONE,
    "hr_prompt": NONE,
    "hr_negative_prompt": NONE,
    "hr_additional_modules": (None, []),
    "script_name": NONE,
    "script_args": ([], None),
    "alwayson_scripts": ({}, None),
    "infotext": NONE,
    "resize_mode": (0, None),
    "image_cfg_scale": (None,),
    "mask": NONE,
    "mask_blur_x": (4, None),
    "mask_blur_y": (4, None),
    "mask_blur": (None, 4),
    "mask_round": (True, None),
    "inpainting_fill": (0, None),
    "inpaint_full_res": (True, None),
    "inpaint_full_res_padding": (0, 32, None),
    "inpainting_mask_invert": (0, None),
    "initial_noise_multiplier": (None, 1),
    "latent_mask": NONE,
    "include_init_images": (False, None),
    "force_task_id": (ANY,),
    "do_not_save_samples": (ANY,),
    "do_not_save_grid": (ANY,),
    "save_images": (ANY,),
    "send_images": (ANY,),
    "override_settings_restore_afterwards": (ANY,),
}
OPTIONS = {"samples_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic"}


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, lt=2**32)
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    denoising_strength: float | None = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(min_length=1)
    denoising_strength: float | None = Field(0.75, gt=0, le=1)


def _parse(model, body: dict):
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise ApiError(validation_message(e), 422) from None
    for name, value in (req.model_extra or {}).items():
        accepted = UNIMPLEMENTED.get(name)
        if accepted is None:
            raise ApiError(f"{name}: not a field of this API", 422)
        if ANY not in accepted and not any(_same(value, a) for a in accepted):
            allowed = " or ".join(json.dumps(a) for a in accepted)
            raise ApiError(f"{name}: not implemented by stablekit; send it at A1111's default ({allowed})", 422)
    return req


def _same(value, default) -> bool:
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def _model_name(jobs: Jobs) -> str:
    return jobs.settings.model or tasks.DEFAULT_MODEL


def _overrides(jobs: Jobs, overrides: dict | None) -> None:
    for key, value in (overrides or {}).items():
        if key == "sd_model_checkpoint":
            if value not in (_model_name(jobs), None, ""):
                raise ApiError(f"override_settings.sd_model_checkpoint: this server serves '{_model_name(jobs)}' only")
        elif key not in OPTIONS or value != OPTIONS[key]:
            raise ApiError(f"override_settings.{key}: not implemented by stablekit", 422)


def _sampler(jobs: Jobs, req: Txt2ImgRequest) -> list[dict]:
    """The scheduler plugin for the request's sampler_name (or sampler_index) and scheduler; [] for the model's
    own sampler and schedule."""
    name = req.sampler_name or (req.sampler_index if "sampler_index" in req.model_fields_set else None)
    schedule = SCHEDULES.get(req.scheduler or "automatic")
    if schedule is None:
        raise ApiError(f"scheduler: '{req.scheduler}' is not one of {', '.join(sorted(set(SCHEDULES)))}", 422)
    if not name:
        if not schedule:
            return []
        ours, config = tasks.model_info(jobs.pipe, None)["scheduler"], {}
    else:
        if ALIASES.get(name, name) not in SAMPLERS:
            raise ApiError(f"sampler_name: unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}", 422)
        ours, config = SAMPLERS[ALIASES.get(name, name)]
        if name.endswith("Karras"):
            schedule = SCHEDULES["karras"]
    if schedule and ours not in KARRAS:
        raise ApiError(f"scheduler: the Karras schedule does not apply to sampler '{name}'", 422)
    return [{"name": ours, "args": {**config, **schedule}}]


def _job(jobs: Jobs, req: Txt2ImgRequest, task: str) -> JobRequest:
    _overrides(jobs, req.override_settings)
    params = dict(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        seed=None if req.seed == -1 else req.seed,
        steps=req.steps,
        guidance=req.cfg_scale,
        n=req.batch_size * req.n_iter,
    )
    if task == "img2img":
        if len(req.init_images) != 1:
            raise ApiError("init_images: stablekit takes exactly one init image", 422)
        params.update(image=req.init_images[0], strength=req.denoising_strength or 0.75)
    else:
        params.update(width=req.width, height=req.height)
    return JobRequest(task=task, params=params, plugins=_sampler(jobs, req))


async def _finished(jobs: Jobs, job_id: str) -> dict:
    while True:
        job = jobs.store.get(job_id)
        if job["status"] in TERMINAL:
            return job
        await asyncio.sleep(0.02)


def _info(jobs: Jobs, req: Txt2ImgRequest, job: dict, name: str) -> dict:
    images = job["result"]["images"] if job["result"] else []
    seeds = [im["seed"] for im in images] or [job["params"]["seed"]]
    first = images[0]["metadata"] if images else {}
    n = len(images)
    return {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * n,
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * n,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": int(first.get("size", "0x0").split("x")[0]),
        "height": int(first.get("size", "0x0").split("x")[1]),
        "sampler_name": first.get("parameters", "").partition("Sampler: ")[2].partition(",")[0] or None,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "sd_model_name": name,
        "sd_model_hash": None,
        "denoising_strength": job["params"].get("strength"),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [im["metadata"].get("parameters", "") for im in images],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job["created"])),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"stablekit {__version__}",
        "job_id": job["id"],
        "interrupted": job["status"] == "cancelled",
    }


async def _generate(request: Request, model, task: str) -> dict:
    jobs: Jobs = request.app.state.jobs
    if jobs.pipe is None:
        raise ApiError("the model is still loading; retry in a few seconds", 503)
    try:
        body = await request.json()
    except ValueError:
        raise ApiError("the request body is not JSON", 400) from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", 422)
    req = _parse(model, body)
    accepted = await asyncio.to_thread(jobs.submit, _job(jobs, req, task), "a1111")
    job = await _finished(jobs, accepted["id"])
    if job["status"] == "failed":
        raise ApiError(job["error"] or "the job failed", 400)
    images = [im["id"] for im in (job["result"] or {}).get("images", [])]
    files = [jobs.store.image_path(i).read_bytes() for i in images] if req.send_images else []
    return {
        "images": [base64.b64encode(f).decode() for f in files],
        "parameters": body,
        "info": json.dumps(_info(jobs, req, job, _model_name(jobs))),
    }


@router.post("/txt2img")
async def txt2img(request: Request):
    """A1111's txt2img: the request's fields as A1111 defines them; answers when the images are made."""
    return await _generate(request, Txt2ImgRequest, "txt2img")


@router.post("/img2img")
async def img2img(request: Request):
    """A1111's img2img: init_images (one) and denoising_strength, with txt2img's fields."""
    return await _generate(request, Img2ImgRequest, "img2img")


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False):
    """The running job's progress (A1111's progress is the server's: whichever job runs)."""
    jobs: Jobs = request.app.state.jobs
    live = jobs.live
    step, total = (live.step, live.total) if live else (0, 0)
    return {
        "progress": step / total if total else 0.0,
        "eta_relative": (live.eta() or 0.0) if live else 0.0,
        "state": {
            "skipped": False,
            "interrupted": bool(live and live.cancel.is_set()),
            "job": live.id if live else "",
            "job_count": len(jobs.queue) + (1 if live else 0),
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": total,
        },
        "current_image": None,
        "textinfo": None,
    }


@router.post("/interrupt")
def interrupt(request: Request):
    """Stop the running job at its next step if it came through this API; native jobs are never touched."""
    jobs: Jobs = request.app.state.jobs
    job_id = jobs.running_job("a1111")
    if job_id is not None:
        jobs.cancel(job_id)
    return {}


class PngInfoRequest(BaseModel):
    image: str


@router.post("/png-info")
def png_info(req: PngInfoRequest, request: Request):
    """The text chunks of a PNG: ``info`` (A1111's parameters), ``items`` (the others), ``parameters`` (parsed)."""
    jobs: Jobs = request.app.state.jobs
    _, raw = decode_image(req.image, "image", jobs.settings.max_pixels)
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        chunks = {k: v for k, v in im.info.items() if isinstance(v, str)}
    info = chunks.pop("parameters", "")
    return {"info": info, "items": chunks, "parameters": parse_infotext(info) if info else {}}


@router.get("/samplers")
def samplers():
    return [
        {"name": name, "aliases": [a for a, n in ALIASES.items() if n == name], "options": {}} for name in SAMPLERS
    ]


@router.get("/schedulers")
def schedulers():
    return [
        {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
        {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
    ]


@router.get("/sd-models")
def sd_models(request: Request):
    name = _model_name(request.app.state.jobs)
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]


@router.get("/options")
def get_options(request: Request):
    return {"sd_model_checkpoint": _model_name(request.app.state.jobs), **OPTIONS}


@router.post("/options")
def set_options(body: dict[str, Any], request: Request):
    """Options are fixed by how the server was started: setting one to its current value is accepted, any
    other value refused naming it."""
    current = get_options(request)
    for key, value in body.items():
        if key not in current:
            raise ApiError(f"{key}: not an option stablekit implements", 422)
        if value != current[key]:
            raise ApiError(f"{key}: cannot be changed on a running stablekit server (it is {current[key]!r})", 422)
    return None
