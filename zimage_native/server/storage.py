"""Persistent history: image files on disk plus a SQLite index in WAL mode.

Layout under the data folder::

    history.sqlite3 (+ -wal, -shm)   tables jobs and images
    images/YYYY-MM-DD/<image id>.png  the images, with their generation metadata (PNG text chunks)
    thumbs/YYYY-MM-DD/<image id>.jpg  small JPEG thumbnails for the web page
    embeddings/<id>.safetensors       files written by /api/save-embeddings

Every file name is made by the server (job ids are random hex, image ids are ``<job id>-<index>``);
nothing a client sends becomes part of a path.

Crash consistency (a SIGKILL at any instant leaves a state that start-up repairs):

- write: the image goes to a temporary file in its destination folder, is flushed and fsynced,
  then renamed over the final name (atomic on POSIX); the thumbnail likewise; only then is the row
  inserted. A crash leaves at worst a file without a row, never a row without a file; a write that
  fails (a full disk for the thumbnail, a database error for the row) removes the files it wrote.
- delete: the row is deleted (committed) first, then the files.
- start-up (:meth:`Storage.reconcile`): jobs left ``queued`` become ``cancelled`` and jobs left
  ``running`` become ``failed``, or ``completed`` when all their images are stored; temporary
  files are removed; an image file without a row is adopted when its job was running (its metadata
  is read back from the PNG), else deleted (a delete cut short must not bring an image back); rows
  whose file is gone are dropped; thumbnails without an image are removed.

SQLite runs in WAL mode: committed transactions survive an application crash whatever the
``synchronous`` setting; ``synchronous=FULL`` (``full_sync=True``) also survives a power loss.

One server per data folder: the start-up repair would take another live server's jobs and files
for a crash's leftovers. A server holds :class:`DataDirLock` (an OS lock on ``server.lock``) for
its life; the system drops it when the process ends, however it ends.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ..metadata import save_png

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"^j[0-9a-f]{20}$")
IMAGE_ID = re.compile(r"^(j[0-9a-f]{20})-(\d{1,3})$")
EMBEDDING_ID = re.compile(r"^e[0-9a-f]{20}$")
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
ORDER = "created DESC, idx ASC"  # the history's order: newest job first, its images in order

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    params TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    created REAL NOT NULL,
    file TEXT NOT NULL,
    thumb TEXT,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    seed INTEGER,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_created ON images (created);
CREATE INDEX IF NOT EXISTS images_job ON images (job_id);
"""


def new_job_id() -> str:
    return "j" + uuid.uuid4().hex[:20]


def new_embedding_id() -> str:
    return "e" + uuid.uuid4().hex[:20]


def image_id(job_id: str, index: int) -> str:
    return f"{job_id}-{index}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary file next to ``path``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def check_history(root: str | os.PathLike) -> None:
    """Refuse, in one line, a data folder whose ``history.sqlite3`` SQLite cannot read (damaged, or
    another kind of file): the server checks it before its model loads. A missing file is fine (a
    new history). Read-only: nothing is created or changed."""
    path = Path(root) / "history.sqlite3"
    if not path.is_file():
        return
    try:
        db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)  # as_uri: '#', '?', '%' escaped
        try:
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        problem = str(e)
    if problem != "ok":
        raise ValueError(f"{path} is not a readable history database ({problem}); move it away (the server then "
                         f"starts a new history; the images stay in {Path(root) / 'images'}) or pick another "
                         f"--data-dir")


LOCK_FILE = "server.lock"


class BrokenImage(ValueError):
    """PNG bytes handed to :meth:`Storage.save_image` (a Ray replica's) that do not decode: the
    image's fault, not the disk's."""


PNG_START = b"\x89PNG\r\n\x1a\n"  # the signature
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk, which ends every whole PNG


def decoded_png(png: bytes):
    """The image that PNG bytes hold, decoded; :class:`BrokenImage` when they are not one whole PNG
    (PIL decodes bytes cut after the pixel data, and the file would lack its end)."""
    from PIL import Image

    if not png.startswith(PNG_START):
        problem = f"no PNG signature at the start of its {len(png)} bytes"
    elif not png.endswith(PNG_END):
        problem = f"no IEND chunk at the end of its {len(png)} bytes: cut short"
    else:
        try:
            image = Image.open(io.BytesIO(png))
            image.load()
            return image
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, zlib.error, ...
            problem = f"{type(e).__name__}: {e}"
    raise BrokenImage(f"its PNG cannot be decoded ({problem}); nothing was stored")


class DataDirInUse(ValueError):
    """Another live server holds the data folder."""


class DataDirLock:
    """An exclusive OS lock on ``<root>/server.lock``, held until :meth:`release` or the end of the
    process (a crash and SIGKILL included: the system drops the lock with the file handle). The file
    says who holds it (process id, machine, start time, then the address once listening). A file
    system without locks (some network drives) only gets a warning."""

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            _lock(self._file)
        except OSError as e:
            if not isinstance(e, BlockingIOError) and e.errno not in (errno.EACCES, errno.EAGAIN, errno.EDEADLK):
                logger.warning("cannot lock %s (%s): nothing stops a second server from using this data folder",
                               self.path, e.strerror or e)
            else:
                holder = self._holder()
                self._file.close()
                raise DataDirInUse(
                    f"the data folder {self.path.parent} is in use by another zimage server ({holder}); give each "
                    f"server its own --data-dir, or serve several GPUs from one server with --ray") from None
        self._owner = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        self._write(self._owner)

    def _holder(self) -> str:
        try:
            self._file.seek(0)
            return self._file.read().strip() or "no details"
        except OSError:  # Windows: the holder's locked byte cannot be read
            return "no details"

    def _write(self, text: str) -> None:
        try:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(text)
            self._file.flush()
        except OSError as e:
            logger.warning("cannot write %s: %s", self.path, e)

    def note(self, address: str) -> None:
        """Add where the server listens, for the message a second server prints."""
        if not self._file.closed:
            self._write(f"{self._owner}, {address}")

    def release(self) -> None:
        if not self._file.closed:
            self._write("")
            self._file.close()  # closing the handle drops the lock


def _lock(file) -> None:
    """Lock ``file`` exclusively without waiting; BlockingIOError (or EACCES) when another handle has it."""
    if os.name == "nt":
        import msvcrt

        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # per open file: two opens in one process conflict


class Storage:
    """The history store. Thread-safe: one SQLite connection behind a lock (calls are short)."""

    def __init__(self, root: str | os.PathLike, *, full_sync: bool = False, thumbnail_size: int = 256):
        check_history(root)
        self.root = Path(root).resolve()
        self.images_dir = self.root / "images"
        self.thumbs_dir = self.root / "thumbs"
        self.embeddings_dir = self.root / "embeddings"
        for folder in (self.root, self.images_dir, self.thumbs_dir, self.embeddings_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.thumbnail_size = thumbnail_size
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "history.sqlite3", check_same_thread=False, isolation_level=None,
                                   timeout=10.0)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("SQLite did not switch to WAL mode (got %s); is the data folder on a network drive?", mode)
        self._db.execute(f"PRAGMA synchronous={'FULL' if full_sync else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ helpers
    def _path(self, relative: str | None) -> Path | None:
        """A stored relative path, resolved and checked to lie inside the data folder."""
        if not relative:
            return None
        path = (self.root / relative).resolve()
        if self.root not in path.parents:
            raise ValueError(f"stored path {relative!r} leaves the data folder")
        return path

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """All result rows, fetched under the lock (the connection is shared between threads)."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _row(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    # ------------------------------------------------------------------ jobs
    def insert_job(self, job_id: str, kind: str, params: dict, created: float, status: str = "queued") -> None:
        self._execute("INSERT INTO jobs (id, kind, status, created, params) VALUES (?, ?, ?, ?, ?)",
                      (job_id, kind, status, created, json.dumps(params, ensure_ascii=False)))

    def update_job(self, job_id: str, status: str, *, error: str | None = None, started: float | None = None,
                   finished: float | None = None) -> None:
        assert status in STATUSES, status
        self._execute(
            "UPDATE jobs SET status = ?, error = COALESCE(?, error), started = COALESCE(?, started), "
            "finished = COALESCE(?, finished) WHERE id = ?", (status, error, started, finished, job_id))

    def get_job(self, job_id: str) -> dict | None:
        row = self._row("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._job_dict(row) if row else None

    def list_jobs(self, limit: int = 50, status: str | None = None) -> list[dict]:
        if status:
            rows = self._rows("SELECT * FROM jobs WHERE status = ? ORDER BY created DESC LIMIT ?", (status, limit))
        else:
            rows = self._rows("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
        return [self._job_dict(r) for r in rows]

    @staticmethod
    def _job_dict(row: sqlite3.Row) -> dict:
        out = dict(row)
        out["params"] = json.loads(out["params"])
        return out

    # ------------------------------------------------------------------ images
    def save_image(self, job_id: str, index: int, image, record: dict, pnginfo=None,
                   created: float | None = None, png: bytes | None = None) -> dict:
        """Write the PNG (and its thumbnail) atomically, then insert the row; returns the row.
        ``png``: the image already encoded with its metadata (``save_png(image, f, png_info(record))``,
        as a Ray replica sends it): written as it is instead of encoding ``image`` again, and decoded
        from these bytes (``image`` is not used; :class:`BrokenImage` when they are not one whole PNG)."""
        created = time.time() if created is None else created
        iid = image_id(job_id, index)
        day = time.strftime("%Y-%m-%d", time.localtime(created))
        file = f"images/{day}/{iid}.png"
        thumb = f"thumbs/{day}/{iid}.jpg"
        if png is not None:  # decoded before anything is written (the thumbnail needs it): a broken PNG leaves no file
            image = decoded_png(png)
            write_atomic(self.root / file, lambda f: f.write(png))
        else:
            write_atomic(self.root / file, lambda f: save_png(image, f, pnginfo))
        row = dict(id=iid, job_id=job_id, idx=index, created=created, file=file, thumb=thumb, width=image.width,
                   height=image.height, seed=record.get("seed"), record=record)
        try:
            self._write_thumbnail(image, self.root / thumb)
            self._insert_image(row)
        except BaseException:  # no row: take the files back, or start-up would adopt them into the history
            self._unlink(file, thumb)
            raise
        return row

    def _write_thumbnail(self, image, path: Path) -> None:
        thumb = image.convert("RGB")
        thumb.thumbnail((self.thumbnail_size, self.thumbnail_size))
        write_atomic(path, lambda f: thumb.save(f, format="JPEG", quality=85))

    def _insert_image(self, row: dict) -> None:
        self._execute(
            "INSERT OR REPLACE INTO images (id, job_id, idx, created, file, thumb, width, height, seed, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row["id"], row["job_id"], row["idx"], row["created"], row["file"], row["thumb"], row["width"],
             row["height"], row["seed"], json.dumps(row["record"], ensure_ascii=False)))

    @staticmethod
    def _image_dict(row: sqlite3.Row) -> dict:
        out = dict(row)
        out["record"] = json.loads(out["record"])
        return out

    def get_image(self, iid: str) -> dict | None:
        row = self._row("SELECT * FROM images WHERE id = ?", (iid,))
        return self._image_dict(row) if row else None

    def job_images(self, job_id: str) -> list[dict]:
        rows = self._rows("SELECT * FROM images WHERE job_id = ? ORDER BY idx", (job_id,))
        return [self._image_dict(r) for r in rows]

    def list_images(self, limit: int = 100, offset: int = 0) -> list[dict]:
        rows = self._rows(f"SELECT * FROM images ORDER BY {ORDER} LIMIT ? OFFSET ?", (limit, offset))
        return [self._image_dict(r) for r in rows]

    def count_images(self) -> int:
        return int(self._row("SELECT COUNT(*) FROM images")[0])

    def image_file(self, row: dict) -> Path | None:
        return self._path(row.get("file"))

    def thumb_file(self, row: dict) -> Path | None:
        return self._path(row.get("thumb"))

    def _unlink(self, *relatives: str | None) -> None:
        for rel in relatives:
            try:
                path = self._path(rel)
            except ValueError:
                continue
            if path is not None:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    def delete_image(self, iid: str) -> bool:
        """Row first (committed), then the files."""
        with self._lock:
            row = self._db.execute("SELECT file, thumb FROM images WHERE id = ?", (iid,)).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM images WHERE id = ?", (iid,))
        self._unlink(row["file"], row["thumb"])
        return True

    def clear_images(self) -> int:
        with self._lock:
            rows = self._db.execute("SELECT file, thumb FROM images").fetchall()
            self._db.execute("DELETE FROM images")
        for row in rows:
            self._unlink(row["file"], row["thumb"])
        return len(rows)

    def prune(self, keep: int, spare_job: str | None = None) -> int:
        """Keep the newest ``keep`` images; delete the rest (rows first), but never an image of job
        ``spare_job`` (the job that just ended: its images stay even when it made more than ``keep``)."""
        with self._lock:
            rows = self._db.execute(f"SELECT id, job_id, file, thumb FROM images ORDER BY {ORDER} LIMIT -1 OFFSET ?",
                                    (keep,)).fetchall()
            rows = [r for r in rows if r["job_id"] != spare_job]
            if rows:
                self._db.executemany("DELETE FROM images WHERE id = ?", [(r["id"],) for r in rows])
        for row in rows:
            self._unlink(row["file"], row["thumb"])
        return len(rows)

    # ------------------------------------------------------------------ embeddings
    def save_embeddings(self, data: bytes) -> str:
        eid = new_embedding_id()
        write_atomic(self.embeddings_dir / f"{eid}.safetensors", lambda f: f.write(data))
        return eid

    def embeddings_file(self, eid: str) -> Path | None:
        if not EMBEDDING_ID.match(eid):
            return None
        path = self.embeddings_dir / f"{eid}.safetensors"
        return path if path.is_file() else None

    # ------------------------------------------------------------------ start-up
    def reconcile(self) -> dict[str, int]:
        """Repair what a crash can leave behind (see the module docstring); returns counts."""
        now = time.time()
        report = dict(cancelled=0, failed=0, completed=0, tmp_removed=0, adopted=0, orphans_removed=0,
                      rows_dropped=0, thumbs_removed=0, thumbs_rebuilt=0)
        with self._lock:
            report["cancelled"] = self._db.execute(
                "UPDATE jobs SET status = 'cancelled', finished = ?, "
                "error = 'the server stopped before the job ran' WHERE status = 'queued'", (now,)).rowcount
            running = {r["id"]: json.loads(r["params"]).get("n")
                       for r in self._db.execute("SELECT id, params FROM jobs WHERE status = 'running'").fetchall()}
            rows = {r["id"]: dict(r) for r in self._db.execute("SELECT id, file, thumb FROM images").fetchall()}

        for folder in (self.images_dir, self.thumbs_dir, self.embeddings_dir):
            for tmp in folder.rglob("*.tmp"):
                tmp.unlink(missing_ok=True)
                report["tmp_removed"] += 1

        files = {}
        for path in self.images_dir.rglob("*.png"):
            files[path.stem] = path
        # Rows whose image file is gone: drop them (the history lists only images that exist).
        for iid, row in rows.items():
            path = self._path(row["file"])
            if path is None or not path.is_file():
                with self._lock:
                    self._db.execute("DELETE FROM images WHERE id = ?", (iid,))
                self._unlink(row["thumb"])
                report["rows_dropped"] += 1
        # Image files without a row: adopt those of a job that was running (renamed into place just
        # before the crash), delete the rest: a file of a finished job lost its row to a delete, a
        # prune or "Clear all" that the crash cut short, and must not come back.
        for stem, path in files.items():
            if stem in rows:
                continue
            match = IMAGE_ID.match(stem)
            if match and match.group(1) in running and self._adopt(path, stem, int(match.group(2))):
                report["adopted"] += 1
            else:
                path.unlink(missing_ok=True)
                report["orphans_removed"] += 1
        # Jobs left running failed, but one whose images are all stored completed: the crash came after
        # its last image (while the history was pruned, or before its row was updated).
        with self._lock:
            for job_id, n in running.items():
                stored = self._db.execute("SELECT COUNT(*) FROM images WHERE job_id = ?", (job_id,)).fetchone()[0]
                done = isinstance(n, int) and n > 0 and stored == n
                self._db.execute(
                    "UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                    ("completed", now, None, job_id) if done else
                    ("failed", now, "interrupted: the server stopped while the job ran", job_id))
                report["completed" if done else "failed"] += 1
        # Thumbnails: remove those without an image; rebuild missing ones.
        with self._lock:
            current = {r["id"]: dict(r) for r in self._db.execute("SELECT id, file, thumb FROM images").fetchall()}
        for path in self.thumbs_dir.rglob("*.jpg"):
            if path.stem not in current:
                path.unlink(missing_ok=True)
                report["thumbs_removed"] += 1
        for iid, row in current.items():
            thumb = self._path(row["thumb"])
            if thumb is not None and not thumb.is_file():
                try:
                    from PIL import Image

                    with Image.open(self._path(row["file"])) as im:
                        self._write_thumbnail(im, thumb)
                    report["thumbs_rebuilt"] += 1
                except Exception as e:  # noqa: BLE001 - a broken file must not stop the server
                    logger.warning("could not rebuild the thumbnail of %s: %s", iid, e)
        for folder in (self.images_dir, self.thumbs_dir):  # empty day folders
            for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
        if any(report.values()):
            logger.info("history repaired at start-up: %s", report)
        return report

    def _adopt(self, path: Path, iid: str, index: int) -> bool:
        """Insert the row of an image file written just before a crash (metadata from the PNG)."""
        from PIL import Image

        from ..metadata import JSON_KEY

        try:
            with Image.open(path) as im:
                im.load()
                width, height = im.size
                record = json.loads(im.info.get(JSON_KEY) or "{}")
                thumb_rel = "thumbs/" + path.parent.name + f"/{iid}.jpg"
                self._write_thumbnail(im, self.root / thumb_rel)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file is removed instead
            logger.warning("cannot adopt %s: %s", path, e)
            return False
        job_id = iid.rsplit("-", 1)[0]
        self._insert_image(dict(id=iid, job_id=job_id, idx=index, created=path.stat().st_mtime,
                                file=str(path.relative_to(self.root)), thumb=thumb_rel, width=width, height=height,
                                seed=record.get("seed"), record=record))
        return True
