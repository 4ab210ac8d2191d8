"""Request and response models of the native API (``/v1``), the error type, and uploaded-image decoding."""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from .tasks import CHOICES, TASKS

Task = Literal[tuple(TASKS)]
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Seed = Field(default=None, ge=0, lt=2**32, description="null: a random seed, resolved when the job is queued")


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with `status` (4xx) and `headers`."""

    def __init__(self, message: str, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.headers = message, status, headers or {}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginSpec(Strict):
    name: str = Field(description="a name from GET /v1/plugins")
    args: dict[str, Any] = Field(default_factory=dict, description='its parameters, e.g. {"interval": 3}')


class Txt2Img(Strict):
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    seed: int | None = Seed
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.5, ge=0, le=100)
    guidance_rescale: float | None = Field(None, ge=0, le=1, description="null: the model's default")
    width: int | None = Field(None, ge=8, description="null: the model's native size")
    height: int | None = Field(None, ge=8)
    n: int = Field(1, ge=1, description="images, seeds seed, seed+1, ...")
    preview_every: int = Field(0, ge=0, description="a preview event every this many steps (0: none)")


class Img2Img(Txt2Img):
    image: str = Field(description="base64 PNG or JPEG; its size is the output's")
    strength: float = Field(0.75, gt=0, le=1)
    width: None = None
    height: None = None


class Edit(Strict):
    image: str
    source: str = Field(min_length=1, description="what the image shows")
    target: str = Field(min_length=1, description="what it should show")
    method: Literal[CHOICES["edit"]] = "direct"
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0, le=100)
    strength: float | None = Field(None, gt=0, le=1)


class Invert(Strict):
    image: str
    prompt: str = Field(min_length=1)
    method: Literal[CHOICES["invert"]] = "direct"
    steps: int = Field(50, ge=1)
    guidance: float | None = Field(None, ge=0, le=100)


class Protect(Strict):
    image: str
    method: Literal[CHOICES["protect"]] = "sds"
    eps: float = Field(8 / 255, gt=0, le=1, description="L-infinity budget in [0, 1] pixel units")
    steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)
    mask: str | None = Field(None, description="base64 image, white over the region to protect")


class Detect(Strict):
    image: str
    keys: list[str] = Field(min_length=1, description="names of server keys (GET /v1/keys)")
    steps: int = Field(50, ge=1)


PARAMS = {"txt2img": Txt2Img, "img2img": Img2Img, "edit": Edit, "invert": Invert, "protect": Protect, "detect": Detect}


class JobRequest(Strict):
    task: Task
    params: dict[str, Any] = Field(description="the task's parameters (see the Txt2Img, Edit, ... schemas)")
    plugins: list[PluginSpec] = Field(default_factory=list, max_length=16)


class Progress(BaseModel):
    step: int = 0
    total: int = 0
    eta_s: float | None = None


class ImageOut(BaseModel):
    id: str
    url: str
    seed: int | None
    sha256: str
    width: int
    height: int
    metadata: dict[str, str]


class JobOut(BaseModel):
    id: str
    task: str
    status: Status
    position: int | None = Field(None, description="jobs ahead of this one while queued (0: next)")
    created: float
    started: float | None = None
    finished: float | None = None
    params: dict[str, Any]
    plugins: list[PluginSpec]
    progress: Progress
    result: dict[str, Any] | None = Field(None, description="{images: [ImageOut], ...task data}")
    error: str | None = None


class Accepted(BaseModel):
    id: str
    status: Status
    position: int | None


class KeyRequest(Strict):
    name: str = Field(description="letters, digits, '_', '-', '.'; how jobs refer to the key")
    method: Literal[CHOICES["watermark"]]
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)


# ---------------------------------------------------------------- uploaded images


def decode_image(data: str, field: str, max_pixels: int) -> tuple[Image.Image, bytes]:
    """(RGB image, the raw bytes) of a base64 image (a ``data:image/...;base64,`` prefix allowed), refusing
    anything that is not an image or has more than `max_pixels` pixels before decoding its pixels."""
    if not isinstance(data, str) or not data:
        raise ApiError(f"{field}: expected a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{field}: not valid base64") from None
    return open_image(raw, field, max_pixels), raw


def open_image(raw: bytes, field: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > max_pixels:
                    raise ApiError(
                        f"{field}: image is {im.width}x{im.height}, more than this server's {max_pixels} pixels",
                        413,
                    )
                im.load()
                return im.convert("RGB")
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(f"{field}: image refused as a decompression bomb (too many pixels)", 413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ApiError(f"{field}: not a readable image ({type(e).__name__})") from None
