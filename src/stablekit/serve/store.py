"""What survives the server: jobs, their parameters, uploads and results in SQLite (``jobs.sqlite3``), images
as PNG files (``images/<id>.png``), under the data folder.

Image files are written to a temp file and renamed (:func:`stablekit.output.write_atomically`) before the
row that names them is committed, so a listed image is always whole. SQLite runs in WAL mode with full
sync. :meth:`Store.recover` (on start) marks a job found running as failed ("server stopped while running")
and returns the queued ones, in order, to be run.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ..output import save_png

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    task TEXT NOT NULL,
    source TEXT NOT NULL,
    params TEXT NOT NULL,
    plugins TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    result TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    last_event INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS uploads (
    job_id TEXT NOT NULL,
    field TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, field)
);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
"""
STOPPED = "server stopped while running"
TERMINAL = ("succeeded", "failed", "cancelled")


def new_id() -> str:
    """A server-made id: 32 hex digits."""
    return uuid.uuid4().hex


class Store:
    """Jobs and images under `root`. Thread-safe: one connection behind a lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = self.root / "images"
        self.keys = self.root / "keys"
        for d in (self.root, self.images, self.keys):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def _write(self, sql: str, args=()) -> None:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def add(self, task: str, source: str, params: dict, plugins: list, uploads: dict[str, bytes]) -> dict:
        job_id, now = new_id(), time.time()
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(
                    "INSERT INTO jobs (id, task, source, params, plugins, status, created) VALUES (?,?,?,?,?,?,?)",
                    (job_id, task, source, json.dumps(params), json.dumps(plugins), "queued", now),
                )
                for name, data in uploads.items():
                    self.db.execute("INSERT INTO uploads VALUES (?,?,?)", (job_id, name, data))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def uploads(self, job_id: str) -> dict[str, bytes]:
        return {r["field"]: r["data"] for r in self._read("SELECT * FROM uploads WHERE job_id = ?", (job_id,))}

    def jobs(self, status: str | None = None, limit: int = 100, source: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        for column, value in (("status", status), ("source", source)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        return [_job(r) for r in self._read(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit))]

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    def start(self, job_id: str) -> None:
        self._write("UPDATE jobs SET status='running', started=? WHERE id=?", (time.time(), job_id))

    def finish(self, job_id: str, status: str, event: int, result: dict | None = None, error: str | None = None):
        self._write(
            "UPDATE jobs SET status=?, result=?, error=?, finished=?, last_event=? WHERE id=?",
            (status, None if result is None else json.dumps(result), error, time.time(), event, job_id),
        )

    def save_image(self, job_id: str, image, meta: dict) -> dict:
        """Write `image` with `meta` as PNG text chunks; its id and sha256 (of the file's bytes)."""
        image_id = new_id()
        path = self.images / f"{image_id}.png"
        save_png(image, path, meta)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self._write("INSERT INTO images VALUES (?,?,?)", (image_id, job_id, digest))
        return {"id": image_id, "sha256": digest}

    def image_path(self, image_id: str) -> Path | None:
        """The file of a listed image (ids are checked against the table: no request names a path)."""
        rows = self._read("SELECT id FROM images WHERE id = ?", (image_id,))
        return self.images / f"{rows[0]['id']}.png" if rows else None

    def recover(self) -> list[str]:
        """Mark running jobs failed (the server stopped under them); the queued jobs' ids, oldest first."""
        self._write(
            "UPDATE jobs SET status='failed', error=?, finished=? WHERE status='running'", (STOPPED, time.time())
        )
        return [r["id"] for r in self._read("SELECT id FROM jobs WHERE status='queued' ORDER BY seq")]

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _job(row: sqlite3.Row) -> dict:
    job = dict(row)
    job.pop("seq")
    for key in ("params", "plugins", "result"):
        job[key] = None if job[key] is None else json.loads(job[key])
    return job
