"""Run a stage as a child deployment (e.g. on the ``cuda`` pool) and fail loudly if it fails.

Tasks cannot be sent to a work pool, only flow runs of deployments can; and ``run_deployment``
returns normally when the child fails. This wrapper checks the child's final state and raises
with its name and state, so the parent flow fails with a message that says which child broke.
"""

from __future__ import annotations

from typing import Any


class ChildRunFailed(RuntimeError):
    """A child flow run ended in a state other than Completed."""


def run_child(
    deployment: str,
    parameters: dict[str, Any],
    timeout: float = 24 * 3600,
    poll_interval: float = 2.0,
    job_variables: dict[str, Any] | None = None,
) -> Any:
    """Start ``deployment`` ('flow-name/deployment-name'), wait for it, return its result.

    The child's return value is read from result storage, so the child flow must persist its
    result where this process can read it (shared storage across hosts).

    Raises:
        ChildRunFailed: the child ended Failed / Crashed / Cancelled, or did not finish in ``timeout``.
    """
    from prefect.deployments import run_deployment

    run = run_deployment(
        deployment, parameters=parameters, timeout=timeout, poll_interval=poll_interval, job_variables=job_variables
    )
    state = run.state
    if state is None or not state.is_completed():
        name = state.name if state else "no state"
        detail = f": {state.message}" if state and state.message else ""
        raise ChildRunFailed(f"child run {run.name!r} of deployment {deployment} ended {name}{detail}")
    return state.result()
