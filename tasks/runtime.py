"""Per-run task options: result storage on the run's store and the locks of its stages."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from prefect import Task

from fish_speech_core.storage import Store, local_path, s3_options
from fishtune.tasks.caching import lock_manager, locked

RESULTS = "prefect-results"  # cache records (one small file per task result) under the store root


def result_storage(store: Store) -> Path | str:
    """Where cache records go: a local Path, or a saved RemoteFileSystem block for s3.

    Prefect needs remote storage as a saved block; it holds only the base URL and the retry
    settings, so credentials and endpoint still come from the AWS environment of every host.
    """
    if store.local:
        return local_path(store.url(RESULTS))
    from prefect.filesystems import RemoteFileSystem

    url = store.url(RESULTS)
    name = "fishtune-results-" + hashlib.sha256(url.encode()).hexdigest()[:16]
    RemoteFileSystem(basepath=url, settings=s3_options()).save(name, overwrite=True)
    return f"remote-file-system/{name}"


WORK_DIR_ENV = "FISHTUNE_WORK_DIR"  # a worker host's scratch folder, when the default does not suit it


def default_work_dir(store: Store) -> Path:
    """Scratch space for incremental work on *this* host: ``$FISHTUNE_WORK_DIR``, else inside a
    local store, else the user cache folder. A GPU child resolves its own, never the parent's."""
    if os.environ.get(WORK_DIR_ENV):
        return Path(os.environ[WORK_DIR_ENV]).expanduser().absolute()
    if store.local:
        return local_path(store.url("work"))
    return Path.home() / ".cache" / "fishtune" / "work"


def work_folder(store_root: str, work_dir: str | None) -> Path:
    """``work_dir`` when given, else this host's default for the store."""
    return Path(work_dir) if work_dir else default_work_dir(Store(store_root))


def bind(task: Task, store: Store, work_dir: Path) -> Task:
    """``task`` with result storage on ``store`` and a SERIALIZABLE lock: in Redis for a remote
    store when ``FISHTUNE_REDIS_URL`` is set, else a file in ``work_dir/locks`` (``tasks.caching``)."""
    return task.with_options(
        result_storage=result_storage(store),
        cache_policy=locked(task.cache_policy, lock_manager(store, Path(work_dir) / "locks")),
    )
