"""Memoized content hashes: an unchanged file is read once, not once per caller or per process.

A hash is remembered under the file's key (its absolute path, or endpoint + URL for a remote
object) together with a *stamp*, a description of the file that changes whenever its bytes do:

* local file: size, ``st_mtime_ns``, ``st_ctime_ns`` and inode (what git's index compares);
* remote object: size and ETag (S3 gives every write a new ETag; for plain uploads it is the
  MD5 of the bytes);
* folder: the sorted listing of its files' stamps (see ``storage.hash_tree``).

A lookup whose stamp differs is a miss, so a changed file is read again. The memo lives in the
process and in a small SQLite file (``$FISHTUNE_HASH_CACHE``, default
``$XDG_CACHE_HOME/fishtune/hashes.sqlite``; ``off`` keeps it in memory only), so the next
process does not re-read an unchanged tree either.

Why trusting a stamp is safe enough, and when it is not: a write changes the mtime and ctime,
and a replaced file gets a new inode, so a rewrite is caught even when it keeps the size and
resets the mtime (``touch -d`` cannot set the ctime). What a stamp cannot see is a second
same-size write within one timestamp tick of the first (coarse clocks, FAT's 2 s, network file
systems): git's "racy" case. Like git, a file modified less than :data:`RACY_SECONDS` before it
was read is never memoized, so the next call reads it again. Not covered: a clock set back, a
file system that does not update mtimes, or someone forging ctime (changing the system clock);
bytes that rot on disk without a write are not seen either. Every row carries a seal
(sha256 of key, stamp and hash), so a damaged cache file is a miss, never a wrong hash; a file
SQLite cannot open is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "FISHTUNE_HASH_CACHE"
RACY_SECONDS = 2.0
MAX_ROWS = 200_000  # pruned to the most recently written MAX_ROWS when a process opens the file
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SCHEMA = 1


def default_path() -> Path | None:
    """The SQLite file of this process's memo, or None when ``$FISHTUNE_HASH_CACHE`` is ``off``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    if configured.lower() == "off":
        return None
    if configured:
        return Path(configured).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "fishtune" / "hashes.sqlite"


def local_stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def is_racy(st: os.stat_result) -> bool:
    """Modified so recently that a same-size rewrite could keep the same stamp."""
    return st.st_mtime_ns > time.time_ns() - int(RACY_SECONDS * 1e9)


def _seal(key: str, stamp: str, sha: str) -> str:
    return hashlib.sha256(f"{key}\0{stamp}\0{sha}".encode()).hexdigest()[:32]


class HashMemo:
    """key -> (stamp, sha256) in memory, backed by a SQLite file (None: memory only).

    Disk problems never fail a hash: a file that cannot be opened or written is given up on for
    this process (after one rebuild attempt) and the memo carries on in memory.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = -1
        self._disabled = path is None

    def get(self, key: str, stamp: str) -> str | None:
        with self._lock:
            hit = self._memory.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
            row = self._run("SELECT stamp, sha256, seal FROM hashes WHERE key = ?", (key,))
        if row is None:
            return None
        stored_stamp, sha, seal = row
        if stored_stamp != stamp or not _SHA256.match(str(sha)) or seal != _seal(key, stamp, sha):
            return None  # another version of the file, or a damaged row: read the file again
        with self._lock:
            self._memory[key] = (stamp, sha)
        return sha

    def put(self, key: str, stamp: str, sha: str) -> None:
        with self._lock:
            self._memory[key] = (stamp, sha)
            self._run(
                "INSERT OR REPLACE INTO hashes (key, stamp, sha256, seal, written) VALUES (?, ?, ?, ?, ?)",
                (key, stamp, sha, _seal(key, stamp, sha), time.time_ns()),
            )

    # -- the SQLite file (callers hold self._lock)

    def _connection(self) -> sqlite3.Connection | None:
        if self._disabled:
            return None
        if self._db is not None and self._pid == os.getpid():
            return self._db
        # A connection inherited through fork() must not be used (or closed) by the child.
        self._db = None
        for attempt in range(2):
            try:
                self._db = self._open()
                self._pid = os.getpid()
                return self._db
            except sqlite3.OperationalError:
                break  # locked for over a second, or a read-only folder: memory only
            except sqlite3.DatabaseError:
                if attempt == 0:
                    self._remove_file()  # not a database, or damaged: rebuild it once
            except OSError:
                break
        self._disabled = True
        return None

    def _remove_file(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        assert self.path is not None
        for suffix in ("", "-journal"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _open(self) -> sqlite3.Connection:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
        try:
            # A cache: no fsync per row (a crash may lose rows; the seals catch damaged ones).
            db.execute("PRAGMA synchronous=OFF")
            if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA:
                db.execute("DROP TABLE IF EXISTS hashes")
                db.execute("CREATE TABLE hashes (key TEXT PRIMARY KEY, stamp TEXT NOT NULL, "
                           "sha256 TEXT NOT NULL, seal TEXT NOT NULL, written INTEGER NOT NULL)")
                db.execute(f"PRAGMA user_version={_SCHEMA}")
            if db.execute("SELECT count(*) FROM hashes").fetchone()[0] > MAX_ROWS:
                db.execute("DELETE FROM hashes WHERE key NOT IN "
                           "(SELECT key FROM hashes ORDER BY written DESC LIMIT ?)", (MAX_ROWS,))
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _run(self, sql: str, args: tuple) -> tuple | None:
        """One statement; any failure is a miss (locked: skipped; damaged: the file is rebuilt)."""
        for _ in range(2):
            db = self._connection()
            if db is None:
                return None
            try:
                return db.execute(sql, args).fetchone()
            except sqlite3.OperationalError:
                return None  # locked by another process for over a second
            except sqlite3.DatabaseError:
                self._remove_file()  # damaged pages: start over (next loop reopens it)
        return None


_MEMOS: dict[tuple[str | None, ...], HashMemo] = {}  # by the variables default_path reads
_MEMOS_LOCK = threading.Lock()


def memo() -> HashMemo:
    """This process's memo for the cache file ``$FISHTUNE_HASH_CACHE`` names (opened lazily)."""
    where = (os.environ.get(CACHE_ENV), os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME"))
    with _MEMOS_LOCK:
        if where not in _MEMOS:
            _MEMOS[where] = HashMemo(default_path())
        return _MEMOS[where]


def remembered(key: str, stamp: str | None, compute: Callable[[], str]) -> str:
    """The hash memoized under ``(key, stamp)``, else ``compute()`` (remembered unless stamp is None)."""
    if stamp is None:
        return compute()
    store = memo()
    hit = store.get(key, stamp)
    if hit is not None:
        return hit
    sha = compute()
    store.put(key, stamp, sha)
    return sha


def local_file_hash(path: str | os.PathLike, read: Callable[[Path], str]) -> str:
    """``read(path)`` (the sha256 of the file's bytes), memoized under the file's local stamp.

    Not memoized: racy files (see the module docstring), non-regular files, and a file whose
    stamp changed while it was read.

    Raises:
        OSError: from ``os.stat`` or ``read`` (FileNotFoundError for a missing file).
    """
    path = Path(path).absolute()
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode) or is_racy(st):
        return read(path)
    key, stamp = f"file:{path}", local_stamp(st)
    store = memo()
    hit = store.get(key, stamp)
    if hit is not None:
        return hit
    sha = read(path)
    if local_stamp(os.stat(path)) == stamp:
        store.put(key, stamp, sha)
    return sha


_DERIVED: dict[tuple[str, str], object] = {}


def remembered_json(kind: str, sha: str, compute: Callable[[], object]) -> object:
    """A JSON value derived from bytes whose sha256 is ``sha`` (e.g. the config embedded in a
    checkpoint), remembered in this process and in ``<memo folder>/derived/<kind>/<sha>.json``.

    Keyed by content, so it cannot go stale; a file that does not parse is computed again and
    rewritten. Memory only when the memo is off or its folder is not writable.
    """
    if not _SHA256.match(sha):
        raise ValueError(f"not a sha256: {sha!r}")
    if (kind, sha) in _DERIVED:
        return _DERIVED[(kind, sha)]
    where = default_path()
    file = where.parent / "derived" / kind / f"{sha}.json" if where is not None else None
    try:
        if file is None:
            raise FileNotFoundError("the memo is off")
        value = json.loads(file.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        text = json.dumps({"value": compute()})  # TypeError: not JSON, the caller's bug
        value = json.loads(text)["value"]  # what a later process reads back (tuples become lists)
        if file is not None:
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
                tmp.write_text(text)
                os.replace(tmp, file)  # atomic: a reader sees no file or the whole one
            except OSError:
                pass
    _DERIVED[(kind, sha)] = value
    return value
