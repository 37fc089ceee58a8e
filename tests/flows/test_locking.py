"""The crash-safe lock behind SERIALIZABLE caching: exclusive, never half-written, and a dead owner's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fishtune.tasks.locking import CrashSafeLockManager


def test_threads_hold_the_lock_one_at_a_time(tmp_path: Path):
    manager = CrashSafeLockManager(tmp_path)
    inside, overlaps, errors = [], [], []

    def worker(name: str) -> None:
        try:
            for _ in range(20):
                assert manager.acquire_lock("k", holder=name)
                inside.append(name)
                if len(inside) > 1:
                    overlaps.append(list(inside))
                time.sleep(0.001)
                inside.remove(name)
                manager.release_lock("k", holder=name)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(f"h{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and overlaps == []
    assert not manager.is_locked("k")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock and no temp file left


def test_lock_file_names_its_owner_and_never_appears_empty(tmp_path: Path):
    manager = CrashSafeLockManager(tmp_path)
    assert manager.acquire_lock("key", holder="me")
    record = json.loads((tmp_path / "key.lock").read_text())
    assert record["holder"] == "me" and record["pid"] == os.getpid()
    assert manager.is_lock_holder("key", "me") and not manager.is_lock_holder("key", "you")
    assert manager.acquire_lock("key", holder="you", acquire_timeout=0.3) is False
    manager.release_lock("key", holder="me")
    assert manager.acquire_lock("key", holder="you", acquire_timeout=0.3) is True


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path):
    """What a SIGKILLed flow leaves behind must not make the rerun wait for ever."""
    code = (
        "import sys, time; from pathlib import Path; from fishtune.tasks.locking import CrashSafeLockManager;"
        f"CrashSafeLockManager(Path({str(tmp_path)!r})).acquire_lock('k', holder='victim');"
        "print('locked', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert child.stdout.readline().strip() == "locked"
        manager = CrashSafeLockManager(tmp_path)
        assert manager.is_locked("k")
        assert manager.acquire_lock("k", holder="rerun", acquire_timeout=0.3) is False  # owner alive: wait
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / "k.lock").exists()  # the killed owner left its lock behind
    assert manager.acquire_lock("k", holder="rerun", acquire_timeout=5)
    assert json.loads((tmp_path / "k.lock").read_text())["holder"] == "rerun"


def test_unparseable_lock_counts_as_held(tmp_path: Path):
    """A lock written by plain Prefect may be seen empty for an instant: wait, don't crash."""
    (tmp_path / "k.lock").write_bytes(b"")
    manager = CrashSafeLockManager(tmp_path)
    assert manager.is_locked("k")
    assert manager.acquire_lock("k", holder="x", acquire_timeout=0.2) is False
