"""Loading pipelines: the embedded default model, local diffusers folders, single files, hub ids."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)

from .errors import StablekitError
from .plugins import SchedulerPlugin
from .registry import CATALOGUE, parse

STANDARD_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
    "plms": PNDMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
    "lcm": LCMScheduler,
}
PIPELINES = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
DEFAULT_MODEL = "stablekit-default"
# marker file -> loader(path, device=, dtype=, scheduler=) of model folders that are not diffusers folders;
# method packages add theirs (a quantized model folder: stablekit.quant)
FOLDER_FORMATS: dict[str, object] = {}
DEFAULT_STUDENT = "stablekit-default-1step"  # the embedded model's one-step student: its UNet, the rest shared


def set_scheduler(pipe: DiffusionPipeline, spec: str | None) -> DiffusionPipeline:
    """Swap the pipeline's scheduler for ``NAME[:k=v,...]``, NAME one of ``CATALOGUE["scheduler"]`` (diffusers'
    own, :data:`STANDARD_SCHEDULERS`, and those of :mod:`stablekit.sampling`), keeping its noise schedule; the
    ``k=v`` go to ``from_config(config, **params)``.
    A config without ``clip_sample`` (e.g. DPM-Solver's) gives DDIM/DDPM ``clip_sample=False``, not their
    pixel-space default True, which would clip latent x0 predictions to [-1, 1]."""
    if spec is None:
        return pipe
    _, cls, params = parse(spec, CATALOGUE["scheduler"], "scheduler")
    if "clip_sample" in inspect.signature(cls.__init__).parameters and "clip_sample" not in pipe.scheduler.config:
        params = {"clip_sample": False, **params}
    try:
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **params)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise StablekitError(f"scheduler '{spec}': {e}") from None
    return pipe


def scheduler_plugin(spec: str, schedulers: dict | None = None) -> SchedulerPlugin:
    """The scheduler of ``NAME[:k=v,...]`` (NAME in `schedulers`, by default ``CATALOGUE["scheduler"]``) as a
    reversible plugin; DDIM/DDPM without pixel-space clipping unless the spec says otherwise."""
    _, cls, params = parse(spec, CATALOGUE["scheduler"] if schedulers is None else schedulers, "scheduler")
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        params = {"clip_sample": False, **params}
    return SchedulerPlugin(cls, **params)


def guidance_rescale(pipe: DiffusionPipeline) -> float:
    """The classifier-free-guidance rescale a pipeline should sample with by default: 0.7 where its
    schedule has (near) zero terminal SNR, as Lin et al. ("Common diffusion noise schedules and sample
    steps are flawed", WACV 2024) prescribe with such schedules against over-exposure at high guidance
    (the embedded default model); 0 otherwise (SD's own schedules)."""
    acp = getattr(pipe.scheduler, "alphas_cumprod", None)
    return 0.7 if acp is not None and float(acp[-1]) < 1e-6 else 0.0


def _device(device: str | None) -> str:
    if device is not None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise StablekitError(f"device '{device}' asked for but CUDA is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _dtype(dtype, device: str) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise StablekitError(f"unknown dtype '{dtype}'; use float32, float16 or bfloat16")
        dtype = getattr(torch, dtype)
    check_dtype(dtype, device)
    return dtype


def check_dtype(dtype: torch.dtype, device: str) -> None:
    """A one-line error, before any loading, if `device` cannot run what a UNet runs (convolution, group norm,
    matmul, softmax) in `dtype`: tried on a tiny input."""
    name = str(dtype).removeprefix("torch.")
    if not dtype.is_floating_point:
        raise StablekitError(f"dtype {name} is not a floating-point type; use float32, float16 or bfloat16")
    try:
        x = torch.ones(1, 8, 4, 4, dtype=dtype, device=device)
        y = torch.nn.functional.conv2d(x, torch.ones(8, 8, 3, 3, dtype=dtype, device=device), padding=1)
        y = torch.nn.functional.group_norm(y, 4).flatten(1)
        torch.softmax(y @ y.T, -1).float().cpu()
    except (RuntimeError, NotImplementedError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StablekitError(f"device '{device}' cannot run {name} ({first}); use --dtype float32") from None


def _load_default(dtype) -> DiffusionPipeline:
    from .default_model import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "unet").exists():
        raise StablekitError(
            f"the embedded default model is missing from {WEIGHTS_DIR}; "
            "reinstall stablekit or train it with `python -m stablekit.default_model.train`"
        )
    pipe = _load_folder(WEIGHTS_DIR, dtype)
    pipe.register_to_config(_name_or_path=DEFAULT_MODEL)
    return pipe


def _load_default_student(dtype) -> DiffusionPipeline:
    from diffusers import UNet2DConditionModel

    from .default_model import STUDENT_DIR

    pipe = _load_default(dtype)
    pipe.unet = UNet2DConditionModel.from_pretrained(STUDENT_DIR / "unet", dtype=dtype)
    pipe.register_to_config(_name_or_path=DEFAULT_STUDENT)
    return pipe


def recommended(model: str | os.PathLike | None) -> dict:
    """The ``steps`` and ``guidance`` the ``recipe.json`` of `model` (a name or folder, as :func:`load` takes)
    says it is meant for (a distilled student's: one step, no guidance), or {} for models without them."""
    if str(model) == DEFAULT_STUDENT:
        from .default_model import STUDENT_DIR

        path = STUDENT_DIR / "recipe.json"
    else:
        path = Path(str(model or "")).expanduser() / "recipe.json"
    recipe = json.loads(path.read_text()) if model and path.is_file() else {}
    return {k: recipe[k] for k in ("steps", "guidance") if k in recipe}


def _load_folder(path: Path, dtype) -> DiffusionPipeline:
    index = path / "model_index.json"
    if not index.is_file():
        raise StablekitError(
            f"'{path}' is not a diffusers model folder (no model_index.json); "
            "pass a diffusers folder, a .safetensors/.ckpt file or a hub id"
        )
    try:
        spec = json.loads(index.read_text())
        cls_name = spec["_class_name"]
    except (json.JSONDecodeError, KeyError) as e:
        raise StablekitError(f"'{index}' is not a valid model_index.json ({e})") from None
    if cls_name not in PIPELINES:
        raise StablekitError(f"'{path}' holds a {cls_name}; stablekit loads {', '.join(PIPELINES)}")
    for part in spec.values():  # our own component classes (a compressed UNet): diffusers imports no module itself
        if isinstance(part, list) and part and isinstance(part[0], str) and part[0].startswith("stablekit."):
            importlib.import_module(part[0])
    kwargs = (
        {"safety_checker": None, "requires_safety_checker": False} if cls_name == "StableDiffusionPipeline" else {}
    )
    if spec.get("text_encoder", [None, None])[1] == "BertModel" and not (path / "text_encoder").exists():
        from .default_model import load_text_encoder  # stablekit-format folders take MiniLM from its package

        kwargs["text_encoder"] = load_text_encoder()[0].to(dtype)  # from_pretrained leaves given parts as they are
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "Expected types for text_encoder: CLIPTextModel" is expected here
    try:
        return PIPELINES[cls_name].from_pretrained(path, dtype=dtype, **kwargs)
    finally:
        diffusers_logging.set_verbosity(level)


def _load_single_file(path: Path, dtype, config: str | None) -> DiffusionPipeline:
    from safetensors import SafetensorError

    cls = StableDiffusionXLPipeline if "xl" in path.name.lower() else StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), dtype=dtype, config=config)
    except (SafetensorError, OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StablekitError(f"cannot load single-file checkpoint '{path}': {first}") from None


def load(
    model: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype=None,
    scheduler: str | None = None,
    config: str | None = None,
) -> DiffusionPipeline:
    """Load a Stable Diffusion pipeline, ready to call.

    `model` is None (the embedded default model, offline), a local diffusers folder (SD 1.x/2.x or
    SDXL, chosen from its model_index.json), a single-file ``.safetensors``/``.ckpt`` checkpoint
    (`config` may name a diffusers folder or hub id holding its component configs), or a hub id
    (needs internet; honours ``HF_HUB_OFFLINE``), or a folder of another format in :data:`FOLDER_FORMATS`
    (a quantized model written by ``stablekit quantize``). `scheduler`: ``NAME[:k=v,...]`` as in :func:`set_scheduler`.
    """
    device = _device(device)
    dtype = _dtype(dtype, device)
    if scheduler is not None:
        parse(scheduler, CATALOGUE["scheduler"], "scheduler")  # a bad name or parameter fails before any loading
    if model is None or str(model) == DEFAULT_MODEL:
        pipe = _load_default(dtype)
    elif str(model) == DEFAULT_STUDENT:
        pipe = _load_default_student(dtype)
    else:
        path = Path(model).expanduser()
        loader = next((f for m, f in FOLDER_FORMATS.items() if (path / m).is_file()), None)
        if loader is not None:
            return loader(path, device=device, dtype=dtype, scheduler=scheduler)
        if path.is_dir():
            pipe = _load_folder(path, dtype)
        elif path.suffix in (".safetensors", ".ckpt"):
            if not path.is_file():
                raise StablekitError(f"checkpoint file '{path}' does not exist")
            pipe = _load_single_file(path, dtype, config)
        elif path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
            raise StablekitError(
                f"'{model}' is not a model: pass a diffusers folder, a .safetensors/.ckpt file "
                "or a hub id like org/name"
            )
        else:
            pipe = _load_hub(str(model), dtype)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=None)
    return pipe.to(device)


def _load_hub(repo_id: str, dtype) -> DiffusionPipeline:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # huggingface_hub reads HF_HUB_OFFLINE only at import; check it at call time so it always holds
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return DiffusionPipeline.from_pretrained(repo_id, dtype=dtype, local_files_only=offline or None)
    except (OSError, LocalEntryNotFoundError, HfHubHTTPError, ValueError) as e:
        if offline:
            raise StablekitError(
                f"'{repo_id}' is not in the local hub cache and HF_HUB_OFFLINE is set; "
                "unset it to download, or pass a local diffusers folder"
            ) from None
        raise StablekitError(
            f"cannot load '{repo_id}' from the hub: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        ) from None


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """Turn off gradients of the modules' parameters for the block (for optimising something else through them),
    then restore each parameter's flag."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
