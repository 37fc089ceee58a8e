"""Locks for stage caching: two runs with the same stage key wait for each other.

The key itself is the stage's store key (:mod:`fishtune.tasks.stage`).
"""

from __future__ import annotations

from pathlib import Path

from prefect.cache_policies import CachePolicy

from fishtune.tasks.locking import CrashSafeLockManager


def locked(policy: CachePolicy, lock_dir: Path) -> CachePolicy:
    """Two runs with the same key wait for each other instead of computing twice (one host).

    A lock left by a killed process is taken over (see ``tasks.locking``), so a rerun never hangs.

    Several hosts need a shared lock manager instead (e.g. prefect-redis's RedisLockManager).
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    return policy.configure(
        isolation_level="SERIALIZABLE", lock_manager=CrashSafeLockManager(Path(lock_dir))
    )
