"""A file lock manager for SERIALIZABLE task caching that survives crashes and races.

Prefect's ``FileSystemLockManager`` creates the lock file empty and writes the holder afterwards,
so a concurrent caller can read an empty file and fail with a JSON error; and a lock of a process
that was SIGKILLed stays forever (Prefect sets no hold timeout), so the rerun would wait for
ever. Here a lock file appears with its content in one step (written to a temp file, then
hard-linked into place, which fails if the lock exists), and it records the owner's host and
pid: a lock whose owner process is gone from this host is stale and is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import anyio

from prefect.locking.filesystem import FileSystemLockManager

POLL_SECONDS = 0.1


def _deadline(timeout: float | None) -> float | None:
    return time.monotonic() + timeout if timeout is not None else None


def _passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class CrashSafeLockManager(FileSystemLockManager):
    """Atomic lock creation + stale-lock takeover; same lock folder layout as Prefect's."""

    def __init__(self, lock_files_directory: Path) -> None:
        super().__init__(lock_files_directory)
        self._host = socket.gethostname()

    # -- reading ------------------------------------------------------------------------------

    def _read(self, key: str) -> dict | None:
        """The lock's record, or None when there is no lock or it was left by a dead process."""
        path = self._lock_path_for_key(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
        except ValueError:
            # Written by a writer that is not atomic (e.g. plain Prefect): treat as held by someone else.
            return {"holder": "", "host": "", "pid": -1, "expiration": None}
        if info.get("host") == self._host and isinstance(info.get("pid"), int) and not _process_alive(info["pid"]):
            self._remove_stale(path, raw)
            return None
        expiration = info.get("expiration")
        if expiration is not None and expiration < time.time():
            self._remove_stale(path, raw)
            return None
        return info

    @staticmethod
    def _remove_stale(path: Path, raw: bytes) -> None:
        """Remove ``path`` only if it still holds ``raw`` (another waiter may have replaced it)."""
        try:
            if path.read_bytes() == raw:
                path.unlink()
        except FileNotFoundError:
            pass

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        return self._read(key) is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        info = self._read(key)
        return info is not None and info.get("holder") == holder

    # -- acquiring ----------------------------------------------------------------------------

    def _try_acquire(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        """One attempt: True if ``holder`` holds the lock now (it already did, or created it)."""
        info = self._read(key)
        if info is not None:
            return info.get("holder") == holder
        record = {
            "holder": holder,
            "host": self._host,
            "pid": os.getpid(),
            "expiration": time.time() + hold_timeout if hold_timeout is not None else None,
        }
        return self._create(self._lock_path_for_key(key), record)

    @staticmethod
    def _create(path: Path, record: dict) -> bool:
        """Create ``path`` holding ``record`` in one step; False if it already exists."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        self._ensure_lock_files_directory_exists()
        deadline = _deadline(acquire_timeout)
        while not self._try_acquire(key, holder, hold_timeout):
            if _passed(deadline):
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        self._ensure_lock_files_directory_exists()
        deadline = _deadline(acquire_timeout)
        while not self._try_acquire(key, holder, hold_timeout):
            if _passed(deadline):
                return False
            await anyio.sleep(POLL_SECONDS)
        return True

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        self._lock_path_for_key(key).unlink(missing_ok=True)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = _deadline(timeout)
        while self.is_locked(key):
            if _passed(deadline):
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = _deadline(timeout)
        while self.is_locked(key):
            if _passed(deadline):
                return False
            await anyio.sleep(POLL_SECONDS)
        return True
