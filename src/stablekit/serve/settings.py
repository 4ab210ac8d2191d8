"""What a server is started with: the model, where it keeps its data, its token and its limits."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import StablekitError, require_counts


def default_data_dir() -> Path:
    """The per-user data folder: ``$XDG_DATA_HOME/stablekit/serve`` (``~/.local/share/stablekit/serve``)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "stablekit" / "serve"


def is_loopback(host: str) -> bool:
    """Whether binding `host` reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path | None) -> str | None:
    """The token in the file at `path` (its first line), or None without a file."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text().strip().splitlines()
    except OSError as e:
        raise StablekitError(f"cannot read token file '{path}': {e.strerror}") from None
    if not lines or len(lines[0].strip()) < 16:
        raise StablekitError(f"token file '{path}' must hold a token of at least 16 characters on its first line")
    return lines[0].strip()


@dataclass(frozen=True)
class Settings:
    """`model`: as :func:`stablekit.load` takes it (None: the embedded model). `token`: required from every
    client when set. Limits: `max_queue` waiting jobs, `max_body` bytes per request, `max_pixels` per image
    (uploaded or generated), `max_steps` per job, `max_images` per job. `origins`: browser origins besides
    the server's own that may POST."""

    data_dir: Path
    model: str | None = None
    device: str | None = None
    token: str | None = None
    max_queue: int = 32
    max_body: int = 32 * 1024 * 1024
    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    max_images: int = 8
    origins: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        require_counts(self, ("max_queue", "max_body", "max_pixels", "max_steps", "max_images"))
