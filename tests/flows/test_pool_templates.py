"""The cuda pool templates (deployments/pools/) and the per-run job variables, without a server.

The templates are rendered on a real server by the workers' own code in test_flows_server.py.
"""

from __future__ import annotations

import pytest

from fishtune.cli.pools import PoolType, cuda_template
from fishtune.tasks.params import ExtractParams, TrainParams
from fishtune.tasks.remote import job_variables_for, memory_bytes

# What our templates replace in Prefect's defaults: one `memory` instead of the worker's own knobs,
# and (docker) the free-form container kwargs that now carry the GPU device request and /dev/shm.
REPLACED = {PoolType.docker: {"mem_limit", "container_create_kwargs"},
            PoolType.kubernetes: {"memory_request", "memory_limit"}}
ADDED = {PoolType.docker: {"gpu_count", "memory", "shm_size"},
         PoolType.kubernetes: {"gpu_count", "memory", "shm_size", "node_selector", "tolerations", "env_secret"}}


def _default_template(kind: PoolType) -> dict:
    if kind is PoolType.docker:
        from prefect_docker.worker import DockerWorker as worker
    else:
        from prefect_kubernetes.worker import KubernetesWorker as worker
    return worker.get_default_base_job_template()


def _placeholders(value) -> set[str]:
    from prefect.utilities.templating import find_placeholders

    if isinstance(value, dict):
        return set().union(*(_placeholders(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value)) if value else set()
    return {p.name for p in find_placeholders(value)} if isinstance(value, str) else set()


@pytest.mark.parametrize("kind", [PoolType.docker, PoolType.kubernetes])
def test_templates_are_the_installed_workers_defaults_plus_our_variables(kind):
    ours, default = cuda_template(kind), _default_template(kind)
    variables = set(ours["variables"]["properties"])
    assert variables == set(default["variables"]["properties"]) - REPLACED[kind] | ADDED[kind]
    # every variable is used, and a placeholder without its variable (a typo) would silently drop its key
    assert _placeholders(ours["job_configuration"]) == variables
    assert ours["variables"]["properties"]["image"]["default"] == "fishtune-cuda:latest"
    assert ours["variables"]["properties"]["gpu_count"]["default"] == 1


def test_job_variables_size_the_child_from_the_stage_parameters():
    assert job_variables_for(TrainParams(memory="24Gi")) == {
        "gpu_count": 1, "memory": str(24 * 2**30)}
    assert job_variables_for(ExtractParams()) == {"gpu_count": 1}
    assert job_variables_for(TrainParams(devices="2", memory="64G")) == {
        "gpu_count": 2, "memory": str(64 * 10**9)}
    assert job_variables_for(None)["gpu_count"] == 1
    assert [memory_bytes(q) for q in ("1000", "1.5Gi", "512Mi", "2T")] == [1000, 3 * 2**29, 2**29, 2 * 10**12]
    # sizing is how the work runs, not what it makes: the stage key ignores it
    assert TrainParams(memory="8Gi").key_fields() == TrainParams().key_fields()


def test_memory_settings_are_validated_and_deploy_help_names_the_pool_types():
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from fishtune.cli import app
    from fishtune.flows.config import FinetuneConfig

    with pytest.raises(ValidationError, match="train_memory"):
        FinetuneConfig(data="/tmp/data", train_memory="lots")
    assert FinetuneConfig(data="/tmp/data", extract_memory="16Gi").extract_params().memory == "16Gi"
    shown = CliRunner().invoke(app, ["deploy", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "--pool-type" in shown.output
    assert all(kind in shown.output for kind in ("process", "docker", "kubernetes"))
