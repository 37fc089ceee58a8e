"""The work pools ``fishtune deploy`` makes: ``cpu`` (always a process pool) and ``cuda`` of a chosen type.

A ``cuda`` pool of type docker or kubernetes gets our base job template
(``deployments/pools/<type>-cuda.json``): Prefect's default for that worker plus the fishtune
CUDA image, ``gpu_count`` GPUs, ``memory``, a larger ``/dev/shm`` and, on Kubernetes, a node
selector, tolerations and credentials from a Secret. The GPU child runs set ``gpu_count`` and
``memory`` per run (:func:`fishtune.tasks.remote.job_variables_for`). A process pool keeps
Prefect's default template.
"""

from __future__ import annotations

import json
from enum import Enum
from importlib.resources import files
from typing import Any

CPU_POOL, CUDA_POOL = "cpu", "cuda"  # the pool names deployments/prefect.yaml uses


class PoolType(str, Enum):
    process = "process"
    docker = "docker"
    kubernetes = "kubernetes"


class PoolTypeMismatch(ValueError):
    """A pool of that name exists with another worker type."""


def cuda_template(pool_type: PoolType) -> dict[str, Any]:
    """The base job template of a ``cuda`` pool of ``pool_type`` (package data, so any install has it)."""
    if pool_type is PoolType.process:
        return process_template()
    return json.loads((files("fishtune.deployments") / "pools" / f"{pool_type.value}-cuda.json").read_text())


def process_template() -> dict[str, Any]:
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def check_pool(client, name: str, pool_type: PoolType):
    """The existing pool ``name`` (None if there is none); PoolTypeMismatch if it is of another type."""
    from prefect.exceptions import ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        return None
    if pool.type != pool_type.value:
        raise PoolTypeMismatch(
            f"work pool {name!r} is a {pool.type} pool, not {pool_type.value}: deploy with --pool-type {pool.type}, "
            f"or delete it first (prefect work-pool delete {name}) and deploy again"
        )
    return pool


def ensure_pool(client, name: str, pool_type: PoolType, template: dict[str, Any], update: bool = True) -> str:
    """Create pool ``name`` of ``pool_type`` with ``template``, or set the template of the existing one.

    Returns what happened: 'created', 'updated' or 'unchanged'. Raises PoolTypeMismatch.
    ``update=False`` leaves an existing pool's template as it is (a process pool the user tuned).
    """
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate

    pool = check_pool(client, name, pool_type)
    if pool is None:
        client.create_work_pool(WorkPoolCreate(name=name, type=pool_type.value, base_job_template=template))
        return "created"
    if not update or pool.base_job_template == template:
        return "unchanged"
    client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
    return "updated"


def ensure_pools(client, pool_type: PoolType) -> dict[str, str]:
    """``cpu`` (process) and ``cuda`` (``pool_type``, our template); both checked before either is changed."""
    check_pool(client, CPU_POOL, PoolType.process)
    check_pool(client, CUDA_POOL, pool_type)
    return {
        CPU_POOL: ensure_pool(client, CPU_POOL, PoolType.process, process_template(), update=False),
        # a process cuda pool keeps its template too; a container one always gets ours
        CUDA_POOL: ensure_pool(client, CUDA_POOL, pool_type, cuda_template(pool_type),
                               update=pool_type is not PoolType.process),
    }
