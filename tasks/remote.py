"""Run a stage as a child deployment (e.g. on the ``cuda`` pool) and fail loudly if it fails.

Tasks cannot be sent to a work pool, only flow runs of deployments can; and ``run_deployment``
returns normally when the child fails. :func:`run_child` checks the child's final state and
raises with its name and state; :func:`on_pool` makes, from a stage task, the task that launches
its child flow under the *same* cache key, so a rerun with the same inputs launches nothing.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

from prefect import Task, task
from pydantic import BaseModel

from fishtune.tasks.stage import Stage

GPU_LIMIT = "gpu"  # global concurrency limit: one slot per GPU, taken by every GPU child run
# A child's return value, as JSON on the store: <store>/runs/children/<flow run id>.json. Prefect's
# default result storage is a folder of the child's own host (a container's), which a parent on
# another host cannot read; the store is shared by construction.
CHILD_RESULTS = "runs/children"
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str) -> int:
    """``16Gi`` -> 17179869184 (the params' MEMORY_PATTERN: bytes, or K/M/G/T and Ki/Mi/Gi/Ti)."""
    number = quantity.rstrip("KMGTi")
    return int(float(number) * _UNITS[quantity[len(number):]])


def gpu_count(params: BaseModel | None) -> int:
    """GPUs one child run of a stage uses: its parameters' devices per node (TrainParams), else 1."""
    per_node = getattr(params, "processes_per_node", None)  # TrainParams: devices per node (None: auto)
    return (per_node() if callable(per_node) else None) or 1


def job_variables_for(params: BaseModel | None) -> dict[str, Any]:
    """The job variables that size a GPU stage's child run, from the stage's parameter model.

    ``gpu_count`` and ``memory`` (bytes: a unit both Docker and Kubernetes read) are variables of
    our docker / kubernetes cuda templates (deployments/pools/); a process pool accepts and
    ignores them. No ``CUDA_VISIBLE_DEVICES``: a container sees only the cards it was given, and a
    process worker's jobs inherit the worker's own (one worker per card on a multi-GPU host:
    ``CUDA_VISIBLE_DEVICES=3 prefect worker start --pool cuda --limit 1``); a value set here
    would send every run of every such worker to the same card.
    """
    variables: dict[str, Any] = {"gpu_count": gpu_count(params)}
    memory = getattr(params, "memory", None)
    if memory:
        variables["memory"] = str(memory_bytes(memory))
    return variables


class ChildRunFailed(RuntimeError):
    """A child flow run ended in a state other than Completed."""


def check_pool(deployment: str, pool: str, flag: str = "gpu_pool") -> None:
    """Refuse a pool (the setting ``flag``) that is not the pool the child deployment runs on (one line, what to do)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ValueError(f"{flag} {pool!r}: deployment {deployment} does not exist on this server; run "
                             "fishtune deploy") from None
    if found.work_pool_name != pool:
        raise ValueError(f"{flag} {pool!r}: deployment {deployment} runs on work pool {found.work_pool_name!r}; "
                         f"set {flag} to {found.work_pool_name!r}, or move the deployment "
                         f"(work_pool in deployments/prefect.yaml, then fishtune deploy)")


def run_child(
    deployment: str,
    parameters: dict[str, Any],
    timeout: float = 24 * 3600,
    poll_interval: float = 2.0,
    job_variables: dict[str, Any] | None = None,
    flow_run_name: str | None = None,
    tags: list[str] | None = None,
) -> Any:
    """Start ``deployment`` ('flow-name/deployment-name'), wait for it, return its result.

    The child's return value is read from the store (:func:`publish_child_result`) when the
    parameters name one (``store_root``), else from Prefect's result storage. A child whose worker
    goes offline while it runs (see :func:`lost_worker`) is marked Crashed and fails here.

    Raises:
        ChildRunFailed: the child ended Failed / Crashed / Cancelled, lost its worker, or did not
            finish in ``timeout``.
    """
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=0, job_variables=job_variables,
                         flow_run_name=flow_run_name, tags=tags)
    run = _wait(run.id, timeout, poll_interval)
    state = run.state
    if state is not None and (state.is_crashed() or state.is_cancelled()):
        end_orphaned_task_runs(run.id, state)
    if state is None or not state.is_completed():
        name = state.name if state else "no state"
        detail = f": {state.message}" if state and state.message else ""
        raise ChildRunFailed(f"child run {run.name!r} of deployment {deployment} ended {name}{detail}")
    return read_child_result(parameters["store_root"], run.id) if "store_root" in parameters else state.result()


def publish_child_result(store_root: str, result: dict) -> dict:
    """Write a child flow's return value to the store, where its parent on any host reads it."""
    import json

    from prefect.runtime import flow_run

    from fish_speech_core.storage import Store

    if flow_run.id:  # not when a child flow's function is called outside a run
        Store(store_root).write_bytes(f"{CHILD_RESULTS}/{flow_run.id}.json", json.dumps(result).encode())
    return result


def read_child_result(store_root: str, flow_run_id) -> dict:
    import json

    from fish_speech_core.storage import Store, redact

    try:
        return json.loads(Store(store_root).read_bytes(f"{CHILD_RESULTS}/{flow_run_id}.json"))
    except FileNotFoundError:
        raise ChildRunFailed(f"child run {flow_run_id} completed but left no result at "
                             f"{redact(Store(store_root).url(CHILD_RESULTS))}/{flow_run_id}.json (is the worker on "
                             f"an older fishtune?)") from None


def _wait(run_id, timeout: float, poll_interval: float):
    """The flow run once final (or at ``timeout``); Crashed by us when its worker was lost."""
    from prefect import get_client
    from prefect.states import Crashed

    deadline = time.monotonic() + timeout
    worker: str | None = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            state = run.state
            if state is None or state.is_final() or time.monotonic() > deadline:
                return run
            if state.is_running() or state.is_pending():  # a worker took it
                worker = worker or worker_of(client, run.id)
                gone = worker and lost_worker(client, run.work_pool_name, worker)
                if gone:
                    client.set_flow_run_state(run.id, Crashed(message=gone), force=True)
                    return client.read_flow_run(run_id)
            time.sleep(poll_interval)


def worker_of(client, flow_run_id) -> str | None:
    """The name of the worker that took a flow run: Prefect records it only as the worker's
    ``prefect.worker.submitted-flow-run`` event (related to the run); None before that event."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["prefect.worker.submitted-flow-run"]),
                                                 related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"])),
                              limit=1)  # the client's default (100) is over the server's maximum (50)
    return page.events[0].resource.get("prefect.resource.name") if page.events else None


def lost_worker(client, pool: str | None, worker: str) -> str | None:
    """Why ``worker`` of ``pool`` counts as lost, or None while it is online.

    The server marks a worker OFFLINE when it missed its heartbeats (3 intervals by default:
    90 s for a worker's default 30 s). A process worker's jobs survive the worker itself, but
    a dead host takes both, and nobody would ever report its runs: they would stay Running.
    """
    from prefect.client.schemas.objects import WorkerStatus

    found = [w for w in client.read_workers_for_work_pool(pool) if w.name == worker] if pool else []
    if not found or found[0].status != WorkerStatus.OFFLINE:
        return None
    seen = found[0].last_heartbeat_time
    return (f"its worker {worker!r} went offline while it ran (last heartbeat {seen:%H:%M:%S} UTC): "
            "the worker or its host died" if seen else f"its worker {worker!r} went offline while it ran")


def gpu_slots() -> int:
    """Slots of the global ``gpu`` concurrency limit (``fishtune deploy --gpus``): how many GPU
    child runs may run at once; 1 when the limit does not exist."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return max(1, int(client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit))
        except ObjectNotFound:
            return 1


def end_orphaned_task_runs(flow_run_id, final) -> int:
    """Give the child's unfinished task runs its final state (Crashed / Cancelled).

    A SIGKILLed child cannot report its own task runs: without this they stay Running in the UI
    for ever. Returns how many were changed.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import Cancelled, Crashed

    make = Crashed if final.is_crashed() else Cancelled
    changed = 0
    with get_client(sync_client=True) as client:
        for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))):
            if task_run.state is not None and not task_run.state.is_final():
                client.set_task_run_state(task_run.id, make(message=f"its flow run ended {final.name}"), force=True)
                changed += 1
    return changed


Launch = tuple[dict[str, Any], dict[str, Any] | None]  # (parameter overrides, job variables) of one child run
Launches = Callable[[dict[str, Any]], list[Launch]]


def _merged(base: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """Job variables ``base`` updated by ``extra``; their ``env`` dicts are merged, not replaced."""
    merged = {**base, **(extra or {})}
    if "env" in base or "env" in (extra or {}):
        merged["env"] = {**base.get("env", {}), **(extra or {}).get("env", {})}
    return merged


def on_pool(stage_task: Task, stage: Stage, deployment: str, launches: Launches | None = None,
            sizing: Callable[[BaseModel | None], dict[str, Any]] = job_variables_for) -> Task:
    """A task with ``stage_task``'s signature, keyed by its stage's key, that runs ``deployment``
    (the stage's child flow, taking the same arguments) instead of the body.

    ``launches(parameters)`` -> one ``(parameter overrides, job variables)`` per child run to
    start together (e.g. one per training node); the first one's result is the stage's, and any
    one failing fails the launcher. Default: one child run, the pool's job variables.

    Extra keyword arguments of the launcher, not of the stage: ``run_name`` and ``run_tags`` for
    the child flow run (what the UI shows). The child's job variables come from the stage's
    ``params`` through ``sizing`` (default :func:`job_variables_for`: GPU count, memory)."""

    signature = inspect.signature(stage_task.fn)

    def launch(*args: Any, run_name: str | None = None, run_tags: list[str] | None = None, **kwargs: Any) -> dict:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        parameters = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in bound.arguments.items()}
        pool_variables = sizing(bound.arguments.get("params"))  # GPU count, memory
        runs = launches(parameters) if launches else [({}, None)]
        jobs = [({**parameters, **overrides}, _merged(pool_variables, variables)) for overrides, variables in runs]
        if len(jobs) == 1:
            return run_child(deployment, jobs[0][0], job_variables=jobs[0][1], flow_run_name=run_name, tags=run_tags)
        return run_children(deployment, jobs, run_name, run_tags)

    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("run_name", "run_tags")]
    launch.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    launch.__doc__ = f"Run {deployment} (the {stage_task.name} child flow) on its work pool; a cache hit launches nothing."
    launch.__name__ = launch.__qualname__ = f"{stage_task.name}_on_pool"
    return task(launch, name=f"{stage_task.name}-on-pool", cache_policy=stage.launch_policy, persist_result=True)


def run_children(deployment: str, runs: list[tuple[dict[str, Any], dict[str, Any] | None]],
                 run_name: str | None = None, tags: list[str] | None = None) -> Any:
    """Start every ``(parameters, job_variables)`` child run of ``deployment`` at once (they may
    wait for each other, as training nodes do), wait for all; the first one's result.

    Raises:
        ChildRunFailed: naming every child that did not complete.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(index: int, parameters: dict[str, Any], job_variables: dict[str, Any] | None) -> Any:
        name = f"{run_name} ({index + 1}/{len(runs)})" if run_name else None
        return run_child(deployment, parameters, job_variables=job_variables, flow_run_name=name, tags=tags)

    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = [pool.submit(one, i, p, j) for i, (p, j) in enumerate(runs)]
        errors = [f.exception() for f in futures]
    failed = [str(e) for e in errors if e is not None]
    if failed:
        raise ChildRunFailed("; ".join(failed))
    return futures[0].result()
