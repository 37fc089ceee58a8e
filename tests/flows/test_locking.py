"""The crash-safe lock behind SERIALIZABLE caching: exclusive, never half-written, and a dead owner's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

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


# -- Redis: the locks hosts share when the store is remote ------------------------------------


def test_redis_lock_is_renewed_while_its_holder_lives_and_expires_when_it_is_killed(redis_server, tmp_path: Path):
    """A 1 s TTL outlives 1 s while the holder runs (renewed), and frees the stage ~1 s after a SIGKILL."""
    from fishtune.tasks.shared_locks import RenewingRedisLockManager

    code = (
        "import time; from fishtune.tasks.shared_locks import RenewingRedisLockManager;"
        f"m = RenewingRedisLockManager({redis_server!r}, hold_seconds=1.0);"
        "assert m.acquire_lock('redis-k', holder='victim');"
        "print('locked', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    manager = RenewingRedisLockManager(redis_server, hold_seconds=1.0)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert manager.is_locked("redis-k")
        assert manager.acquire_lock("redis-k", holder="rerun", acquire_timeout=2.0) is False  # 2 TTLs: renewed
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    killed = time.monotonic()
    assert manager.acquire_lock("redis-k", holder="rerun", acquire_timeout=10)
    assert time.monotonic() - killed < 3.0  # the TTL, not for ever
    assert manager.is_lock_holder("redis-k", "rerun")
    manager.release_lock("redis-k", holder="rerun")
    assert not manager.is_locked("redis-k") and manager.wait_for_lock("redis-k", timeout=0.1)


def test_unreachable_redis_is_one_line_naming_the_setting_without_the_password(monkeypatch, tmp_path: Path):
    from tests.flows.conftest import free_port

    from fish_speech_core.storage import Store
    from fishtune.tasks.caching import LockServiceUnavailable, lock_manager

    monkeypatch.setenv("FISHTUNE_REDIS_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(LockServiceUnavailable) as info:
        lock_manager(Store("s3://bucket/store"), tmp_path / "locks")
    message = str(info.value)
    assert "\n" not in message and "hunter2" not in message, message
    assert message.startswith("cache locks: Redis at redis://***@127.0.0.1:") and "FISHTUNE_REDIS_URL" in message

    # `fishtune finetune` says so before any run starts: that line, exit 1
    from typer.testing import CliRunner

    from fishtune.cli import app

    (tmp_path / "data").mkdir()
    done = CliRunner().invoke(app, ["finetune", "--data", str(tmp_path / "data"), "--storage", "s3://bucket/store"],
                              env={"COLUMNS": "400"})
    assert done.exit_code == 1 and done.output.strip() == f"finetune failed: {message}", done.output


def test_file_locks_stay_the_default_and_a_remote_store_without_redis_warns_once(monkeypatch, tmp_path: Path, caplog):
    from fish_speech_core.storage import Store
    from fishtune.tasks.caching import lock_manager

    monkeypatch.setenv("FISHTUNE_REDIS_URL", "redis://127.0.0.1:1/0")  # not used for a local store
    assert isinstance(lock_manager(Store(str(tmp_path / "store")), tmp_path / "locks"), CrashSafeLockManager)
    monkeypatch.delenv("FISHTUNE_REDIS_URL")
    root = f"s3://bucket/{tmp_path.name}"
    # caplog's handler directly on the logger (and only there): importing Prefect for the first time
    # in this test (when it runs alone) reconfigures the root logger and drops caplog's handler
    logger = logging.getLogger("fishtune.locks")
    logger.addHandler(caplog.handler)
    monkeypatch.setattr(logger, "propagate", False)
    try:
        with caplog.at_level("WARNING", logger="fishtune.locks"):
            for _ in range(3):
                assert isinstance(lock_manager(Store(root), tmp_path / "locks"), CrashSafeLockManager)
    finally:
        logger.removeHandler(caplog.handler)
    warned = [r.getMessage() for r in caplog.records if r.name == "fishtune.locks"]
    assert len(warned) == 1 and "cache locks are per host" in warned[0] and "FISHTUNE_REDIS_URL" in warned[0]
