"""The ``finetune-project`` flow: a run of a saved project (``fishtune project create``).

It reads the project's spec from ``<storage>/projects/<project>.json``, applies this run's
``overrides`` (never saved; only the fields given: the UI form's untouched fields change nothing),
validates, and runs the finetune flow as a subflow on the project's whole data: the data-changed
trigger passes only ``project`` and ``storage``, so a re-finetune trains with the saved base, codec
and settings.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from fishtune import projects
from fishtune.flows.finetune import finetune, tag_this_run


@flow(name="finetune-project", log_prints=True, persist_result=True, flow_run_name="finetune-project/{project}")
def finetune_project(project: str, storage: str, overrides: projects.Overrides = projects.Overrides()) -> dict[str, Any]:
    """Finetune a saved project from its spec on the store; the fields given in overrides apply to this run only."""
    tag_this_run(project)
    config = projects.load(storage, project)
    changed = projects.given(overrides)  # field path -> value, e.g. {"normalize.loudness": -20.0}
    if changed:
        config = projects.with_settings(config, changed)
        changed = projects.resolved(config, changed)  # recorded as the spec's validated values
        get_run_logger().info("project %s with this run's overrides %s", project, changed)
    return finetune(config, overrides=changed or None)
