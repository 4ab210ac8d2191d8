"""The output folder of a batch: ``images/<id>.png``, ``manifest.jsonl`` (one row per image, appended as each
image is stored) and ``manifest.parquet`` (a copy for analysis, rewritten at the end of a run).

Only the driver writes here. A row's PNG is written atomically before its manifest line, and a line is one
``write`` of a whole line, so a run stopped at any point leaves at most an unfinished last line (dropped when the
folder is next opened) and images whose rows are done again, identically, by the next run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import StablekitError
from ..output import write_atomically
from .jobs import Row

MANIFEST = "manifest.jsonl"
PARQUET = "manifest.parquet"


def read_manifest(out: Path) -> list[dict]:
    """The complete rows of ``out/manifest.jsonl`` ([] if there is none); an unfinished last line is left out."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        if not line.endswith("\n"):
            break  # the last line of a run that was stopped while writing it
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise StablekitError(f"{path}:{number}: not a manifest row; is --out another program's folder?") from None
    return rows


def pending(rows: list[Row], out: Path, model: str | None) -> list[Row]:
    """The rows of a job not yet in `out`'s manifest; a row whose id is there with other parameters (or model) is
    one StablekitError, since its image would be replaced."""
    done = {r["id"]: r["hash"] for r in read_manifest(out)}
    todo = []
    for row in rows:
        if row.id not in done:
            todo.append(row)
        elif done[row.id] != row.digest(model):
            raise StablekitError(
                f"line {row.line}: id '{row.id}' is in {Path(out) / MANIFEST} with other parameters; "
                "give the row a new id, or write to another --out"
            )
    return todo


class Store:
    """Writes each result's PNG and manifest line, once per id."""

    def __init__(self, out: Path):
        self.out = Path(out)
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        self.path = self.out / MANIFEST
        self._drop_unfinished_line()
        self.done = {r["id"] for r in read_manifest(self.out)}

    def _drop_unfinished_line(self) -> None:
        if self.path.is_file():
            text = self.path.read_text()
            if text and not text.endswith("\n"):
                kept = text[: text.rfind("\n") + 1]
                write_atomically(self.path, lambda tmp: Path(tmp).write_text(kept))

    def add(self, result: dict) -> bool:
        """Store one result of the work function; False (nothing written) when its id is already stored."""
        if result["id"] in self.done:
            return False
        png = result["png"]
        write_atomically(self.out / result["record"]["image"], lambda tmp: Path(tmp).write_bytes(png))
        line = (json.dumps(result["record"]) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        self.done.add(result["id"])
        return True

    def write_parquet(self) -> Path:
        """``manifest.parquet``: the manifest's rows, parameters as columns ``params.*``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [_flat(r) for r in read_manifest(self.out)]
        table = pa.Table.from_pylist(rows)
        path = self.out / PARQUET
        write_atomically(path, lambda tmp: pq.write_table(table, tmp))
        return path


def _flat(record: dict) -> dict:
    params = {f"params.{k}": v for k, v in record["params"].items()}
    return {k: v for k, v in record.items() if k != "params"} | params
