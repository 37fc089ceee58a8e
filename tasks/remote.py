"""Run a stage as a child deployment (e.g. on the ``cuda`` pool) and fail loudly if it fails.

Tasks cannot be sent to a work pool, only flow runs of deployments can; and ``run_deployment``
returns normally when the child fails. :func:`run_child` checks the child's final state and
raises with its name and state; :func:`on_pool` makes, from a stage task, the task that launches
its child flow under the *same* cache key, so a rerun with the same inputs launches nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from prefect import Task, task
from pydantic import BaseModel

from fishtune.tasks.stage import Stage

GPU_LIMIT = "gpu"  # global concurrency limit: one slot per GPU, taken by every GPU child run


class ChildRunFailed(RuntimeError):
    """A child flow run ended in a state other than Completed."""


def check_pool(deployment: str, pool: str) -> None:
    """Refuse a ``gpu_pool`` that is not the pool the child deployment runs on (one line, what to do)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
    if found.work_pool_name != pool:
        raise ValueError(f"gpu_pool {pool!r}: deployment {deployment} runs on work pool {found.work_pool_name!r}; "
                         f"set gpu_pool to {found.work_pool_name!r}, or move the deployment "
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

    The child's return value is read from result storage, so the child flow must persist its
    result where this process can read it (shared storage across hosts).

    Raises:
        ChildRunFailed: the child ended Failed / Crashed / Cancelled, or did not finish in ``timeout``.
    """
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=timeout, poll_interval=poll_interval,
                         job_variables=job_variables, flow_run_name=flow_run_name, tags=tags)
    state = run.state
    if state is not None and (state.is_crashed() or state.is_cancelled()):
        end_orphaned_task_runs(run.id, state)
    if state is None or not state.is_completed():
        name = state.name if state else "no state"
        detail = f": {state.message}" if state and state.message else ""
        raise ChildRunFailed(f"child run {run.name!r} of deployment {deployment} ended {name}{detail}")
    return state.result()


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


def on_pool(stage_task: Task, stage: Stage, deployment: str, launches: Launches | None = None) -> Task:
    """A task with ``stage_task``'s signature, keyed by its stage's key, that runs ``deployment``
    (the stage's child flow, taking the same arguments) instead of the body.

    ``launches(parameters)`` -> one ``(parameter overrides, job variables)`` per child run to
    start together (e.g. one per training node); the first one's result is the stage's, and any
    one failing fails the launcher. Default: one child run, the pool's job variables.

    Extra keyword arguments of the launcher, not of the stage: ``run_name`` and ``run_tags`` for
    the child flow run (what the UI shows)."""

    signature = inspect.signature(stage_task.fn)

    def launch(*args: Any, run_name: str | None = None, run_tags: list[str] | None = None, **kwargs: Any) -> dict:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        parameters = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in bound.arguments.items()}
        runs = launches(parameters) if launches else [({}, None)]
        if len(runs) == 1:
            overrides, job_variables = runs[0]
            return run_child(deployment, {**parameters, **overrides}, job_variables=job_variables,
                             flow_run_name=run_name, tags=run_tags)
        return run_children(deployment, [({**parameters, **o}, j) for o, j in runs], run_name, run_tags)

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
