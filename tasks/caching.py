"""Locks for stage caching: two runs with the same stage key wait for each other.

The key itself is the stage's store key (:mod:`fishtune.tasks.stage`). Which lock:

- a local store: file locks in the host's work folder (:mod:`fishtune.tasks.locking`);
- a remote store and ``FISHTUNE_REDIS_URL`` set: Redis locks every host shares
  (:mod:`fishtune.tasks.shared_locks`);
- a remote store without it: file locks, so runs on *one* host still wait for each other, but
  two hosts may compute the same stage at once: the work is done twice (the second publish keeps
  the first one's artifact: ``Store.publish`` never rewrites a complete one, so no reader sees
  an object replaced mid-read). One warning per process says so; refusing
  would break every single-host S3 setup (one run at a time, or one host's workers) for no gain.

The URL comes from the environment of each host (its worker, its container) and never from a
flow parameter: a password in it must not reach Prefect's database or the logs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from prefect.cache_policies import CachePolicy
from prefect.locking.protocol import LockManager

from fish_speech_core.storage import Store, redact
from fishtune.tasks.locking import CrashSafeLockManager

REDIS_URL_ENV = "FISHTUNE_REDIS_URL"  # e.g. redis://redis.internal:6379/0 (rediss:// for TLS)


class LockServiceUnavailable(RuntimeError):
    """The Redis server for shared cache locks does not answer (the message is one line, redacted)."""


def redis_url() -> str | None:
    return os.environ.get(REDIS_URL_ENV) or None


def lock_manager(store: Store, lock_dir: Path) -> LockManager:
    """The lock manager for stages on ``store`` (see the module docstring for the rule).

    Raises:
        LockServiceUnavailable: the store is remote, ``FISHTUNE_REDIS_URL`` is set and that Redis does not answer.
    """
    url = redis_url()
    if not store.local and url:
        return shared_lock_manager(url)
    if not store.local:
        _warn_per_host(store.root)
    lock_dir.mkdir(parents=True, exist_ok=True)
    return CrashSafeLockManager(Path(lock_dir))


def check_locks(store: Store) -> None:
    """Before a run: raise LockServiceUnavailable (one line) if its shared locks would not work."""
    url = redis_url()
    if not store.local and url:
        shared_lock_manager(url)


@functools.lru_cache(maxsize=4)
def shared_lock_manager(url: str):
    """The Redis lock manager of ``url``, checked to answer; one client and renewal thread per process."""
    from fishtune.tasks.shared_locks import RenewingRedisLockManager

    manager = RenewingRedisLockManager(url)
    manager.check()
    return manager


@functools.lru_cache(maxsize=None)
def _warn_per_host(store_root: str) -> None:
    from fishtune.tasks.stage import run_logger

    run_logger("fishtune.locks").warning(
        "cache locks are per host: %s is remote but %s is not set, so a run on another host may compute "
        "the same stage at the same time (the work done twice); set %s to a Redis every host reaches",
        redact(store_root), REDIS_URL_ENV, REDIS_URL_ENV)


def locked(policy: CachePolicy, manager: LockManager) -> CachePolicy:
    """Two runs with the same key wait for each other instead of computing twice.

    A lock whose holder died is taken over (file locks: the owner's pid is gone; Redis: its TTL
    is no longer renewed), so a rerun never hangs.
    """
    return policy.configure(isolation_level="SERIALIZABLE", lock_manager=manager)
