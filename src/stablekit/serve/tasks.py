"""The service's one adapter into the library: every call the server makes into stablekit is in this module.

Each task is a function ``(pipe, params, progress, cancelled) -> Result``: `params` is the job's validated
parameters with its plugins already built (:func:`prepare`), ``progress(step, total)`` reports steps done,
``cancelled()`` says whether the job was cancelled. Text-to-image and image-to-image stop at the next step
through the pipeline's ``callback_on_step_end`` (``pipe._interrupt``; the images finished so far, and the
interrupted one, are kept); the library's own loops (edit, invert, protect, detect) stop at the next call of
the UNet or VAE, through a forward pre-hook that raises :class:`Cancelled`.

:func:`catalogue` is the plugin catalogue ``{kind: {name: class}}`` that job requests name plugins from.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..accel import check_size
from ..edit import EDIT_GUIDANCE, EDIT_METHODS, EDIT_STEPS, GUIDANCE, reconstruct_image
from ..edit import METHODS as INVERSIONS
from ..edit import edit as edit_image
from ..errors import StablekitError
from ..latents import decode
from ..output import generation_metadata, scheduler_name
from ..pipeline import DEFAULT_MODEL, guidance_rescale, load, scheduler_plugin
from ..plugins import use
from ..protect import METHODS as PROTECTIONS
from ..protect import options as protect_options
from ..protect import protect as protect_image
from ..provenance import Key, make_key, watermark
from ..provenance import detect as detect_watermark
from ..registry import CATALOGUE, build, format_value, parameters

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PLUGIN_TASKS = ("txt2img", "img2img")  # the others run the library's own loops, which take no plugins
FILE_SCHEDULERS = ("searched",)  # replays a schedule file: no request may name a file on the server
CHOICES = {  # the method names a request may give, by parameter
    "edit": tuple(EDIT_METHODS),
    "invert": tuple(INVERSIONS),
    "protect": tuple(PROTECTIONS),
    "watermark": tuple(CATALOGUE["watermark"]),
}


class Cancelled(Exception):
    """The job was cancelled; `result` holds what was finished before (may be empty)."""

    def __init__(self, result: Result | None = None):
        super().__init__("cancelled")
        self.result = result or Result()


@dataclass
class Output:
    """One image of a result, with its PNG text chunks and seed (None where no seed applies)."""

    image: object
    meta: dict
    seed: int | None = None


@dataclass
class Result:
    images: list[Output] = field(default_factory=list)
    data: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the pipeline and the plugin catalogue


def load_pipeline(model: str | None, device: str | None):
    pipe = load(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_info(pipe, model: str | None) -> dict:
    f = pipe.vae_scale_factor
    return {
        "name": model or DEFAULT_MODEL,
        "pipeline": type(pipe).__name__,
        "native_size": pipe.unet.config.sample_size * f,
        "size_multiple": f,
        "scheduler": scheduler_name(pipe),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
    }


def catalogue() -> dict[str, dict[str, type]]:
    """``{kind: {name: class}}`` of every plugin a job may name."""
    return {
        "accel": dict(CATALOGUE["accel"]),
        "scheduler": {n: c for n, c in CATALOGUE["scheduler"].items() if n not in FILE_SCHEDULERS},
        "guard": dict(CATALOGUE["guard"]),
        "watermark": dict(CATALOGUE["watermark"]),
    }


def _describe(cls, kind: str) -> dict:
    if kind == "watermark":
        return {"key": {"default": None, "type": "the name of a server key (GET /v1/keys)"}}
    out = {}
    for name, p in parameters(cls).items():
        note = "" if p.annotation is inspect.Parameter.empty else str(p.annotation)
        default = p.default if isinstance(p.default, (int, str, bool, list, type(None))) else str(p.default)
        if isinstance(p.default, float) and math.isfinite(p.default):
            default = p.default
        out[name] = {"default": default, "type": note.replace("typing.", "")}
    return out


def plugin_schemas() -> list[dict]:
    """Every plugin: kind, name, first docstring line and parameters (default and annotation)."""
    return [
        {
            "kind": kind,
            "name": name,
            "doc": (inspect.getdoc(cls) or "").split("\n")[0],
            "params": _describe(cls, kind),
        }
        for kind, names in catalogue().items()
        for name, cls in names.items()
    ]


def _find(name: str) -> tuple[str, type]:
    for kind, names in catalogue().items():
        if name in names:
            return kind, names[name]
    known = ", ".join(n for names in catalogue().values() for n in names)
    raise StablekitError(f"unknown plugin '{name}'; choose one of: {known}")


def spec_text(name: str, args: dict) -> str:
    """``NAME:k=v,...`` of a plugin named with JSON arguments (the command line's spelling)."""
    items = [f"{k}={format_value(v)}" for k, v in args.items()]
    return name + (":" + ",".join(items) if items else "")


def _watermark(name: str, args: dict, keys_dir: Path):
    if set(args) - {"key"} or "key" not in args:
        raise StablekitError(f"watermark {name} takes one argument, key (the name of a server key)")
    key = load_key(keys_dir, args["key"])
    if key.method != name:
        raise StablekitError(f"key '{args['key']}' is a {key.method} key, not {name}")
    return watermark(key)


def build_plugins(specs: list[dict], keys_dir: Path) -> tuple[list, dict[str, list[str]]]:
    """(plugin objects, ``{kind: [NAME:k=v spec, ...]}``) of a job's ``[{name, args}, ...]``; new objects on
    every call, so that no job sees another's plugin state."""
    plugins, texts = [], {}
    for spec in specs:
        name, args = spec["name"], dict(spec.get("args") or {})
        kind = _find(name)[0]
        if kind == "watermark":
            plugins.append(_watermark(name, args, keys_dir))
            texts.setdefault(kind, []).append(f"{name}:key={args['key']}")
            continue
        if kind == "scheduler":
            plugins.append(scheduler_plugin(spec_text(name, args), catalogue()["scheduler"]))
        else:
            plugins.append(build(spec_text(name, args), catalogue()[kind], kind))
        texts.setdefault(kind, []).append(spec_text(name, args))
    if len(texts.get("scheduler", [])) > 1:
        raise StablekitError("give at most one scheduler plugin")
    return plugins, texts


# ---------------------------------------------------------------- watermark keys


def key_path(keys_dir: Path, name: str) -> Path:
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        raise StablekitError(f"key name {name!r} must be 1-64 letters, digits, '_', '-' or '.', starting alnum")
    return Path(keys_dir) / f"{name}.json"


def load_key(keys_dir: Path, name: str) -> Key:
    path = key_path(keys_dir, name)
    if not path.is_file():
        raise StablekitError(f"no key named '{name}' on this server; create it with POST /v1/keys")
    return Key.load(path)


def key_info(name: str, key: Key) -> dict:
    """What a client may know of a key: never its secret."""
    h, w = key.params["image_size"]
    return {"name": name, "method": key.method, "width": w, "height": h}


def create_key(pipe, keys_dir: Path, name: str, method: str, width: int | None, height: int | None) -> dict:
    from ..output import write_atomically

    path = key_path(keys_dir, name)
    if path.exists():
        raise StablekitError(f"a key named '{name}' exists; images marked with it need it: choose another name")
    key = make_key(pipe, method, height=height, width=width)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, key.save, mode=0o600)
    return key_info(name, key)


def list_keys(keys_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(keys_dir).glob("*.json")):
        try:
            out.append(key_info(path.stem, Key.load(path)))
        except StablekitError:
            continue  # not a key file: not listed
    return out


# ---------------------------------------------------------------- preparing a job


def prepare(task: str, params: dict, specs: list[dict], keys_dir: Path) -> dict:
    """`params` with the plugins built (``plugins``, ``specs``) and, for detect, the keys loaded (``keys``)."""
    if specs and task not in PLUGIN_TASKS:
        raise StablekitError(f"the {task} task takes no plugins (only {' and '.join(PLUGIN_TASKS)} do)")
    plugins, texts = build_plugins(specs, keys_dir)
    if task == "img2img" and "watermark" in texts:
        raise StablekitError("watermarks mark the initial noise of txt2img; img2img starts from an image")
    out = dict(params, plugins=plugins, specs=texts)
    if task == "detect":
        out["keys"] = [load_key(keys_dir, name) for name in params["keys"]]
        out["key_names"] = list(params["keys"])
    return out


def native_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


# ---------------------------------------------------------------- text to image, image to image


def _callback(offset: int, total: int, progress, cancelled, preview_every: int = 0):
    """Reports steps done (with the decoded current latents every `preview_every` steps) and interrupts the
    pipeline at the next step once the job is cancelled."""

    def on_step_end(pipe, i, t, kwargs):
        show = preview_every and (i + 1) % preview_every == 0 and "latents" in kwargs
        progress(offset + i + 1, total, decode(pipe, kwargs["latents"][:1]) if show else None)
        if cancelled():
            pipe._interrupt = True
        return kwargs

    return on_step_end


def _img2img_pipe(pipe):
    """The image-to-image pipeline over `pipe`'s own modules, made once per pipeline."""
    from diffusers import AutoPipelineForImage2Image

    if "_stablekit_img2img" not in pipe.__dict__:
        other = AutoPipelineForImage2Image.from_pipe(pipe)
        other.set_progress_bar_config(disable=True)
        pipe.__dict__["_stablekit_img2img"] = other
    return pipe.__dict__["_stablekit_img2img"]


def _generate(runner, pipe, p: dict, progress, cancelled, extra: dict) -> Result:
    """`p["n"]` images from `runner(generator, callback)`, seeds seed, seed+1, ...; plugins attached around them."""
    steps, n = p["steps"], p["n"]
    result = Result()
    with use(runner, *p["plugins"]):
        meta = dict(
            negative=p["negative_prompt"],
            steps=steps,
            guidance=p["guidance"],
            guidance_rescale=p["guidance_rescale"],
            size=(p["width"], p["height"]),
            scheduler=(p["specs"].get("scheduler") or [None])[0],
            model=p["model"],
            specs={k: v for k, v in p["specs"].items() if k != "scheduler"},
        )
        for i in range(n):
            seed = p["seed"] + i
            out = runner(
                p["prompt"],
                negative_prompt=p["negative_prompt"] or None,
                num_inference_steps=steps,
                guidance_scale=p["guidance"],
                guidance_rescale=p["guidance_rescale"],
                generator=torch.Generator("cpu").manual_seed(seed),
                callback_on_step_end=_callback(i * steps, n * steps, progress, cancelled, p["preview_every"]),
                **extra,
            ).images[0]
            result.images.append(Output(out, generation_metadata(runner, p["prompt"], seed, **meta) | p["more"], seed))
            if cancelled():
                raise Cancelled(result)
    return result


def _defaults(pipe, p: dict, model: str | None) -> dict:
    rescale = guidance_rescale(pipe) if p.get("guidance_rescale") is None else p["guidance_rescale"]
    return dict(p, guidance_rescale=rescale, model=model, more={})


def txt2img(pipe, params: dict, progress, cancelled) -> Result:
    p = _defaults(pipe, params, params.get("model"))
    p["width"] = p.get("width") or native_size(pipe)
    p["height"] = p.get("height") or native_size(pipe)
    check_size(pipe, p["width"], p["height"])
    return _generate(pipe, pipe, p, progress, cancelled, dict(width=p["width"], height=p["height"]))


def img2img(pipe, params: dict, progress, cancelled) -> Result:
    p = _defaults(pipe, params, params.get("model"))
    image = params["image"]
    check_size(pipe, image.width, image.height)
    p.update(width=image.width, height=image.height, more={"strength": p["strength"]})
    extra = dict(image=image, strength=p["strength"])
    return _generate(_img2img_pipe(pipe), pipe, p, progress, cancelled, extra)


# ---------------------------------------------------------------- the library's own loops


class _Watch:
    """Forward pre-hooks on the UNet and VAE: count UNet calls as progress, raise Cancelled when cancelled."""

    def __init__(self, pipe, total: int, progress, cancelled):
        self.pipe, self.total, self.progress, self.cancelled, self.calls = pipe, total, progress, cancelled, 0
        self.handles = []

    def _unet(self, module, args):
        self._vae(module, args)
        self.calls += 1
        self.progress(min(self.calls, self.total - 1), self.total)

    def _vae(self, module, args):
        if self.cancelled():
            raise Cancelled()

    def __enter__(self):
        self.handles = [self.pipe.unet.register_forward_pre_hook(self._unet)]
        self.handles += [
            m.register_forward_pre_hook(self._vae) for m in (self.pipe.vae.encoder, self.pipe.vae.decoder)
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        if exc[0] is None:
            self.progress(self.total, self.total)


def _base(params: dict) -> dict:
    from .. import __version__

    return dict(model=params.get("model") or DEFAULT_MODEL, stablekit=__version__)


def edit(pipe, params: dict, progress, cancelled) -> Result:
    method = params["method"]
    steps = params.get("steps") or EDIT_STEPS[method]
    guidance = EDIT_GUIDANCE[method] if params.get("guidance") is None else params["guidance"]
    with _Watch(pipe, 2 * steps, progress, cancelled):
        out = edit_image(
            pipe,
            params["image"],
            params["source"],
            params["target"],
            method,
            steps=steps,
            guidance=guidance,
            strength=params.get("strength"),
        )
    meta = dict(
        source=params["source"],
        target=params["target"],
        method=method,
        strength=params.get("strength") or "",
        controller="",
        weights="",
        blend="",
        steps=steps,
        guidance=guidance,
        decoder_steps=0,
    )
    return Result([Output(out, meta | _base(params))])


def invert(pipe, params: dict, progress, cancelled) -> Result:
    method, steps = params["method"], params["steps"]
    guidance = GUIDANCE[method] if params.get("guidance") is None else params["guidance"]
    with _Watch(pipe, 2 * steps, progress, cancelled):
        out, db = reconstruct_image(pipe, params["image"], params["prompt"], method, steps=steps, guidance=guidance)
    meta = dict(
        prompt=params["prompt"], method=method, steps=steps, guidance=guidance, decoder_steps=0, psnr_db=f"{db:.2f}"
    )
    return Result([Output(out, meta | _base(params))], {"psnr_db": round(float(db), 4)})


def protect(pipe, params: dict, progress, cancelled) -> Result:
    method = params["method"]
    settings = protect_options(method, params.get("steps"))
    with _Watch(pipe, max(1, settings["steps"]), progress, cancelled):
        out = protect_image(
            pipe,
            params["image"],
            method,
            eps=params["eps"],
            steps=settings["steps"],
            mask=params.get("mask"),
            seed=params["seed"],
            progress=False,
        )
    meta = dict(
        method=method,
        eps=f"{params['eps']:.6g}",
        min_psnr="",
        steps=settings["steps"],
        step_size=f"{settings['step_size']:.6g}",
        mode=settings.get("mode", ""),
        eot="",
        seed=params["seed"],
    )
    return Result([Output(out, meta | _base(params), params["seed"])])


def detect(pipe, params: dict, progress, cancelled) -> Result:
    with _Watch(pipe, params["steps"], progress, cancelled):
        found = detect_watermark(pipe, params["image"], params["keys"], steps=params["steps"])
    data = dataclasses.asdict(found)
    data["key"] = params["key_names"][found.user or 0]
    data.pop("user")
    return Result([], data)


TASKS = {"txt2img": txt2img, "img2img": img2img, "edit": edit, "invert": invert, "protect": protect, "detect": detect}
