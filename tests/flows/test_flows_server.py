"""Deployments, workers, a child run and the data-landed trigger against a real Prefect server."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"
REPO = Path(__file__).parents[2]


def _wait_runs(client, deployment_id, count: int, timeout: float = 120.0):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        final = [r for r in runs if r.state and r.state.is_final()]
        if len(final) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(1)


@pytest.mark.slow
def test_deploy_trigger_and_child_runs_on_a_real_server(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.remote import ChildRunFailed, run_child

    data, store = tmp_path / "data", tmp_path / "store"
    shutil.copytree(DEMO, data)
    result = subprocess.run(
        [sys.executable, "-m", "fishtune", "deploy", "--data", str(data), "--storage", str(store), "--source", str(REPO)],
        env=prefect_server.env, capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pools = prefect_server.prefect("work-pool", "ls").stdout
    assert "cpu" in pools and "cuda" in pools
    with temporary_settings({PREFECT_API_URL: prefect_server.api,
                             PREFECT_RESULTS_LOCAL_STORAGE_PATH: Path(prefect_server.env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])}):
        with get_client(sync_client=True) as client:
            finetune = client.read_deployment_by_name("finetune/finetune")
            watch = client.read_deployment_by_name("watch/watch")
            assert finetune.work_pool_name == "cpu" and watch.work_pool_name == "cpu"
            assert watch.schedules and watch.schedules[0].schedule.cron == "*/15 * * * *"
            schema = finetune.parameter_openapi_schema
            assert schema["required"] == ["config"]
            assert schema["definitions"]["AudioFormat"]["enum"] == ["keep", "flac", "wav"]
            assert finetune.parameters["config"]["data"] == str(data)  # FISHTUNE_DATA filled in at deploy time
            # no cron-started watch runs (and the events they emit) while this test counts runs
            client.pause_deployment(watch.id)
            prefect_server.spawn("worker", "start", "--pool", "cpu", log="worker-cpu.log")
            prefect_server.spawn("worker", "start", "--pool", "cuda", "--limit", "1", log="worker-cuda.log")

            # The data-landed event starts finetune for that speaker (the trigger renders the parameters).
            emit_event(
                event="fishtune.speaker.data.landed",
                resource={"prefect.resource.id": "fishtune.speaker.bruno", "fishtune.speaker": "bruno"},
                payload={"data": str(data), "speaker": "bruno", "project": "triggered"},
            )
            runs = _wait_runs(client, finetune.id, 1)
            assert len(runs) == 1, [r.state for r in runs]
            run = runs[0]
            assert run.state.is_completed(), (run.state, (prefect_server.root / "worker-cpu.log").read_text()[-3000:])
            assert run.parameters["config"]["speaker"] == "bruno" and run.parameters["config"]["project"] == "triggered"
            manifest = json.loads(next((store / "runs").glob(f"{run.id}/manifest.json")).read_text())
            assert manifest["parameters"]["speaker"] == "bruno" and manifest["status"] == "completed"
            assert list(manifest["stages"][0]["summary"]["speakers"]) == ["bruno"]

        # A child run through run_deployment: its result comes back; a failed child raises with its name.
        ok = run_child("finetune/finetune", {"config": {"data": str(data), "storage": str(store), "speaker": "alice",
                                                        "project": "child"}}, timeout=180, poll_interval=1)
        assert ok["status"] == "completed" and [s["stage"] for s in ok["stages"]] == ["validate", "normalize"]
        with pytest.raises(ChildRunFailed, match=r"child run '.+' of deployment finetune/finetune ended Failed"):
            run_child("finetune/finetune", {"config": {"data": str(tmp_path / "missing"), "storage": str(store)}},
                      timeout=180, poll_interval=1)
