"""Cache policies for fishtune tasks: a key from input *content*, not from paths or run ids.

Prefect's default policy includes the run id (no cross-run cache) and hashes a path by its
string (a changed file at the same path would be a stale hit). Ours hashes the bytes behind
every URL argument (streamed through fsspec), the other arguments, the task source and the
fishtune version. Results persist on the run's storage root, so the cache survives the process
and, on s3, the host.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy, Inputs

from fish_speech_core import storage
from fishtune.tasks.locking import CrashSafeLockManager


@dataclass
class ContentHash(CachePolicy):
    """sha256 of the content behind the named URL arguments (a file or a whole folder)."""

    url_args: list[str] = field(default_factory=list)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        parts = {name: storage.hash_any(str(inputs[name])) for name in self.url_args if inputs.get(name)}
        return storage.digest_listing(parts) if parts else None


@dataclass
class CodeVersion(CachePolicy):
    """The installed fishtune version: a release invalidates every cached result."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        return hashlib.sha256(storage.code_version().encode()).hexdigest()


def content_policy(url_args: list[str], ignore: list[str] = ()) -> CachePolicy:
    """Content of ``url_args`` + every other input except ``ignore`` + task source + code version."""
    return ContentHash(url_args=list(url_args)) + Inputs(exclude=[*url_args, *ignore]) + TASK_SOURCE + CodeVersion()


def locked(policy: CachePolicy, lock_dir: Path) -> CachePolicy:
    """Two runs with the same key wait for each other instead of computing twice (one host).

    A lock left by a killed process is taken over (see ``tasks.locking``), so a rerun never hangs.

    Several hosts need a shared lock manager instead (e.g. prefect-redis's RedisLockManager).
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    return policy.configure(
        isolation_level="SERIALIZABLE", lock_manager=CrashSafeLockManager(Path(lock_dir))
    )
