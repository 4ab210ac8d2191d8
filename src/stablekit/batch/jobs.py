"""A job file, JOBS.jsonl: one JSON object per line, one image per line, every line checked before any work.

A line names a ``prompt`` and, optionally: ``id`` (the image's file name, letters, digits, ``.``, ``_`` and
``-``; default: the line number, ``000001``...), ``seed`` (default: the row's position in the file, 0 for the
first row), ``negative``, ``steps`` (25), ``size`` (``"WxH"`` or ``[W, H]``, multiples of 8; default: the
model's native size), ``guidance`` (7.5), ``guidance_rescale`` (default: the model's), ``scheduler``
(``NAME[:k=v,...]``) and ``plugins`` (a list of accel and guard specs, ``NAME[:k=v,...]``, the names of
``stablekit generate --accel/--guard``). Any mistake is one :class:`StablekitError` naming the file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from ..errors import StablekitError
from ..output import parse_size
from ..registry import CATALOGUE, build, parse

PLUGIN_KINDS = ("accel", "guard")
FIELDS = ("id", "prompt", "seed", "negative", "steps", "size", "guidance", "guidance_rescale", "scheduler", "plugins")
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclasses.dataclass(frozen=True)
class Row:
    """One image of a job, its parameters checked; `size` None is the model's native size, `guidance_rescale`
    None the model's default."""

    id: str
    prompt: str
    seed: int
    negative: str | None = None
    steps: int = 25
    size: tuple[int, int] | None = None
    guidance: float = 7.5
    guidance_rescale: float | None = None
    scheduler: str | None = None
    plugins: tuple[str, ...] = ()
    line: int = dataclasses.field(default=0, compare=False)  # in the job file, for error messages

    def params(self) -> dict:
        """The row's parameters as JSON values (all but its id and line)."""
        out = dataclasses.asdict(self)
        del out["id"], out["line"]
        out["size"] = None if self.size is None else list(self.size)
        out["plugins"] = list(self.plugins)
        return out

    def digest(self, model: str | None) -> str:
        """A hash of the parameters and the model: a row with the same id and digest is the same image."""
        text = json.dumps(self.params() | {"model": model}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "line": self.line} | self.params())

    @classmethod
    def from_json(cls, text: str) -> Row:
        data = json.loads(text)
        data["size"] = None if data["size"] is None else tuple(data["size"])
        data["plugins"] = tuple(data["plugins"])
        return cls(**data)


def plugin_kind(spec: str) -> str:
    """The catalogue kind (accel or guard) of a plugin spec's name, or one StablekitError listing the names."""
    name = spec.partition(":")[0].strip()
    for kind in PLUGIN_KINDS:
        if name in CATALOGUE[kind]:
            return kind
    known = ", ".join(n for kind in PLUGIN_KINDS for n in CATALOGUE[kind])
    raise StablekitError(f"unknown plugin '{name}'; choose one of: {known}")


def _size(value) -> tuple[int, int]:
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
        value = f"{value[0]}x{value[1]}"
    if not isinstance(value, str):
        raise StablekitError(f'size {value!r} is not "WxH" or [W, H]; write it like "size": "512x512"')
    return parse_size(value, "size")


def _typed(data: dict, key: str, kinds: tuple, what: str):
    value = data.get(key)
    if value is not None and (type(value) not in kinds):
        raise StablekitError(f"{key} {json.dumps(value)} is not {what}")
    return value


def _numbers(data: dict) -> dict:
    """steps, seed, guidance and guidance_rescale of a line, checked (absent ones are left out)."""
    out = {}
    for key, kinds, what in (
        ("steps", (int,), "a whole number"),
        ("seed", (int,), "a whole number"),
        ("guidance", (int, float), "a number"),
        ("guidance_rescale", (int, float), "a number"),
    ):
        value = _typed(data, key, kinds, what)
        if value is not None:
            out[key] = float(value) if float in kinds else value
    if out.get("steps", 1) < 1:
        raise StablekitError(f"steps {out['steps']}: the number of denoising steps must be at least 1")
    if not 0 <= out.get("seed", 0) < 2**63:
        raise StablekitError(f"seed {out['seed']} must lie in [0, 2**63)")
    if out.get("guidance", 0) < 0:
        raise StablekitError(f"guidance {out['guidance']:g} must be >= 0 (1 turns it off; 7.5 is usual)")
    if not 0 <= out.get("guidance_rescale", 0) <= 1:
        raise StablekitError(f"guidance_rescale {out['guidance_rescale']:g} must lie in [0, 1]")
    return out


def _plugins(data: dict) -> tuple[str, ...]:
    specs = data.get("plugins") or []
    if not (isinstance(specs, list) and all(isinstance(s, str) for s in specs)):
        raise StablekitError('plugins must be a list of "NAME[:k=v,...]" texts, e.g. ["deepcache:interval=3"]')
    for spec in specs:
        kind = plugin_kind(spec)
        build(spec, CATALOGUE[kind], kind)  # checks its parameters; the workers build their own
    return tuple(s.strip() for s in specs)


def parse_line(text: str, position: int, default_id: str) -> Row:
    """The row of one line (`position`: its index among the rows, the default seed), or a StablekitError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StablekitError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise StablekitError('not a JSON object; write it like {"prompt": "a red star"}')
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise StablekitError(f"unknown field '{unknown[0]}'; the fields are: {', '.join(FIELDS)}")
    prompt = _typed(data, "prompt", (str,), "text")
    if not prompt or not prompt.strip():
        raise StablekitError('no prompt; every line needs one, e.g. {"prompt": "a red star"}')
    row_id = str(_typed(data, "id", (str, int), "text") or default_id)
    if not ID.fullmatch(row_id):
        raise StablekitError(
            f"id {row_id!r} must be 1-128 letters, digits, '.', '_' or '-', starting with one of the first two"
        )
    numbers = _numbers(data)
    negative = _typed(data, "negative", (str,), "text")
    scheduler = _typed(data, "scheduler", (str,), "a NAME[:k=v,...] text")
    if scheduler is not None:
        parse(scheduler, CATALOGUE["scheduler"], "scheduler")
    if numbers.get("guidance", 7.5) <= 1 and (negative or "guidance_rescale" in numbers):
        raise StablekitError("negative and guidance_rescale do not apply at guidance <= 1 (guidance is off)")
    size = None if data.get("size") is None else _size(data["size"])
    row = Row(row_id, prompt, numbers.pop("seed", position), negative, size=size, scheduler=scheduler, **numbers)
    return dataclasses.replace(row, plugins=_plugins(data))


def read_jobs(path: Path) -> list[Row]:
    """Every row of the job file at `path` (blank lines skipped), or one StablekitError ``FILE:LINE: ...``."""
    path = Path(path)
    if not path.is_file():
        raise StablekitError(f"job file '{path}' does not exist")
    rows, seen = [], {}
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = dataclasses.replace(parse_line(text, len(rows), f"{number:06d}"), line=number)
        except StablekitError as e:
            raise StablekitError(f"{path}:{number}: {e}") from None
        if row.id in seen:
            raise StablekitError(f"{path}:{number}: id '{row.id}' is already line {seen[row.id]}'s; ids are unique")
        seen[row.id] = number
        rows.append(row)
    if not rows:
        raise StablekitError(f"job file '{path}' has no rows; write one JSON object per line")
    return rows
