"""A job file, JOBS.jsonl: one JSON object per line, one image per line, every line checked before any work.

A line names a ``prompt`` and, optionally: ``id`` (the image's file name, letters, digits, ``.``, ``_`` and
``-``; default: the line number, ``000001``...), ``seed`` (default: the row's position in the file, 0 for the
first row), ``negative``, ``steps`` (25), ``size`` (``"WxH"`` or ``[W, H]``, multiples of 8; default: the
model's native size), ``guidance`` (7.5), ``guidance_rescale`` (default: the model's), ``scheduler``
(``NAME[:k=v,...]``) and ``plugins`` (a list of accel and guard specs, ``NAME[:k=v,...]``, the names of
``stablekit generate --accel/--guard``), ``watermark`` (a key file from ``stablekit keygen``, or its JSON object
inline; the image size is the key's), ``adapters`` (files from ``stablekit erase``
or ``memorization mitigate``) and
``spm_multiplier`` (1). Files are read from the current folder, relative paths included. Any mistake is one
:class:`StablekitError` naming the file and line. :func:`check_rows` checks rows given as dicts the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path

from ..errors import StablekitError
from ..output import parse_size
from ..registry import CATALOGUE, build, parse

PLUGIN_KINDS = ("accel", "guard")
FIELDS = (
    "id",
    "prompt",
    "seed",
    "negative",
    "steps",
    "size",
    "guidance",
    "guidance_rescale",
    "scheduler",
    "plugins",
    "watermark",
    "adapters",
    "spm_multiplier",
)
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclasses.dataclass(frozen=True)
class Row:
    """One image of a job, its parameters checked; `size` None is the model's native size, `guidance_rescale`
    None the model's default. `watermark` is the key file's JSON text, secret included (rows travel whole to the
    workers, which need no shared files for it); the manifest shows its method and fingerprint only. `adapters`
    are absolute paths, read by the workers."""

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
    watermark: str | None = None
    adapters: tuple[str, ...] = ()
    spm_multiplier: float = 1.0
    line: int = dataclasses.field(default=0, compare=False)  # in the job file, for error messages

    def params(self) -> dict:
        """The row's parameters as JSON values (all but its id and line; the watermark key as its method and a
        fingerprint, never its secret)."""
        out = self.fields()
        del out["id"], out["line"]
        if self.watermark is not None:
            key = json.loads(self.watermark)
            out["watermark"] = {
                "method": key["method"],
                "key": hashlib.sha256(self.watermark.encode()).hexdigest()[:16],
            }
        return out

    def fields(self) -> dict:
        """Every field as JSON values."""
        out = dataclasses.asdict(self)
        out["size"] = None if self.size is None else list(self.size)
        out["plugins"] = list(self.plugins)
        out["adapters"] = list(self.adapters)
        return out

    def batch_key(self) -> str:
        """Rows with equal keys differ by prompt and seed only, so they can be generated as one batch."""
        return json.dumps({k: v for k, v in self.fields().items() if k not in ("id", "line", "prompt", "seed")})

    def digest(self, model: str | None) -> str:
        """A hash of the parameters and the model: a row with the same id and digest is the same image."""
        text = json.dumps(self.params() | {"model": model}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


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


@functools.lru_cache(maxsize=64)
def _key_plugin(text: str):
    """The watermark plugin of a key's JSON text (built once per key: every row of a set shares it)."""
    from ..provenance import Key, watermark

    return watermark(Key.from_data(json.loads(text), "the watermark object"))


def _watermark(data: dict, size: tuple[int, int] | None) -> tuple[str | None, tuple[int, int] | None]:
    """(the key's canonical JSON text, the image size: the key's, which a given size must equal)."""
    from ..provenance import Key

    value = data.get("watermark")
    if value is None:
        return None, size
    if isinstance(value, str):
        key = Key.load(Path(value))
    elif isinstance(value, dict):
        key = Key.from_data(value, "the watermark object")
    else:
        raise StablekitError("watermark must be a key file's path or its JSON object (from `stablekit keygen`)")
    text = json.dumps(key.to_data(), sort_keys=True)
    plugin = _key_plugin(text)
    key_size = plugin.image_size[::-1]
    if size is not None and size != key_size:
        raise StablekitError(
            f"size {size[0]}x{size[1]} but the watermark key is for {plugin.size_text()} images; "
            "leave size out or make a key for that size"
        )
    return text, key_size


@functools.lru_cache(maxsize=64)
def _adapter(path: str, mtime: int, multiplier: float):
    """A concept-erasure file, loaded (so checked) once per path, modification time and multiplier."""
    from ..registry import load_adapter

    return load_adapter(path, multiplier)


def _adapters(data: dict) -> tuple[tuple[str, ...], float]:
    """(absolute paths of the adapters, the SPM multiplier), every file loaded once to check it."""
    from ..safety import SPM

    paths = data.get("adapters") or []
    if not (isinstance(paths, list) and all(isinstance(x, str) for x in paths)):
        raise StablekitError('adapters must be a list of file paths from `stablekit erase`, e.g. ["star.safetensors"]')
    multiplier = _typed(data, "spm_multiplier", (int, float), "a number")
    multiplier = 1.0 if multiplier is None else float(multiplier)
    if multiplier < 0:
        raise StablekitError(f"spm_multiplier {multiplier:g} must be >= 0")
    resolved = [Path(x).resolve() for x in paths]
    missing = [x for x, r in zip(paths, resolved, strict=True) if not r.is_file()]
    if missing:
        raise StablekitError(f"adapter file '{missing[0]}' does not exist")
    loaded = [_adapter(str(r), r.stat().st_mtime_ns, multiplier) for r in resolved]
    if multiplier != 1 and not any(isinstance(x, SPM) for x in loaded):
        raise StablekitError("spm_multiplier scales SPM membranes: give one in adapters")
    return tuple(str(r) for r in resolved), multiplier


def parse_line(text: str, position: int, default_id: str) -> Row:
    """The row of one line (`position`: its index among the rows, the default seed), or a StablekitError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StablekitError(f"not JSON ({e.msg} at column {e.colno})") from None
    return parse_row(data, position, default_id)


def parse_row(data, position: int, default_id: str) -> Row:
    """The row of one JSON object (`position`: its index among the rows, the default seed), or a StablekitError."""
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
    key, size = _watermark(data, None if data.get("size") is None else _size(data["size"]))
    adapters, multiplier = _adapters(data)
    row = Row(row_id, prompt, numbers.pop("seed", position), negative, size=size, scheduler=scheduler, **numbers)
    return dataclasses.replace(
        row, plugins=_plugins(data), watermark=key, adapters=adapters, spm_multiplier=multiplier
    )


def _unique(rows: list[Row], prefix, name) -> None:
    """A StablekitError at the first row whose id is taken; ``prefix(line)`` starts the error and ``name(line)``
    names the row that has the id."""
    seen = {}
    for row in rows:
        if row.id in seen:
            first = name(seen[row.id].line)
            raise StablekitError(f"{prefix(row.line)}: id '{row.id}' is already {first}'s; ids are unique")
        seen[row.id] = row


def read_jobs(path: Path) -> list[Row]:
    """Every row of the job file at `path` (blank lines skipped), or one StablekitError ``FILE:LINE: ...``."""
    path = Path(path)
    if not path.is_file():
        raise StablekitError(f"job file '{path}' does not exist")
    rows = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            rows.append(dataclasses.replace(parse_line(text, len(rows), f"{number:06d}"), line=number))
        except StablekitError as e:
            raise StablekitError(f"{path}:{number}: {e}") from None
    _unique(rows, lambda line: f"{path}:{line}", lambda line: f"line {line}")
    if not rows:
        raise StablekitError(f"job file '{path}' has no rows; write one JSON object per line")
    return rows


def check_rows(items: list) -> list[Row]:
    """Rows given as dicts (the fields of a job file's lines) or :class:`Row` objects, each dict checked as a line
    is; an error names the row by its index (``row 3: ...``), before any work."""
    rows = []
    for i, item in enumerate(items):
        try:
            row = item if isinstance(item, Row) else parse_row(item, i, f"{i + 1:06d}")
        except StablekitError as e:
            raise StablekitError(f"row {i}: {e}") from None
        rows.append(dataclasses.replace(row, line=i))
    _unique(rows, lambda i: f"row {i}", lambda i: f"row {i}")
    if not rows:
        raise StablekitError("no rows to generate")
    return rows
