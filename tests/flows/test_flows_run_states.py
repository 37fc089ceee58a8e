"""What the UI and the manifest say about runs that did not simply finish: cancelled, crashed children."""

import json
from pathlib import Path

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"


def test_a_cancelled_run_is_recorded_cancelled_not_failed(prefect_env, tmp_path, monkeypatch):
    """A run cancelled from the UI or the API (its state turned Cancelling) stops at its next stage:
    its manifest says cancelled; a stage that just fails leaves failed."""
    from prefect import get_client
    from prefect.runtime import flow_run
    from prefect.states import Cancelling

    from fishtune.flows import finetune as finetune_flow
    from fishtune.flows.config import FinetuneConfig
    from fishtune.tasks import data as data_tasks

    fetch = data_tasks.fetch_data.fn

    def cancelled_while_fetching(*args, **kwargs):
        with get_client(sync_client=True) as client:  # what the UI's Cancel button does to the run
            client.set_flow_run_state(flow_run.get_id(), Cancelling(), force=True)
        raise RuntimeError("stopped by the cancellation")

    config = FinetuneConfig(data=str(DEMO), storage=str(tmp_path / "store"), project="cancel-me")
    monkeypatch.setattr(data_tasks.fetch_data, "fn", cancelled_while_fetching)
    finetune_flow.finetune(config, return_state=True)
    monkeypatch.setattr(data_tasks.fetch_data, "fn", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    finetune_flow.finetune(config.model_copy(update={"project": "fail-me"}), return_state=True)
    monkeypatch.setattr(data_tasks.fetch_data, "fn", fetch)

    manifests = [json.loads(p.read_text()) for p in (tmp_path / "store" / "runs").glob("*/manifest.json")]
    status = {m["parameters"]["project"]: m["status"] for m in manifests}
    assert status == {"cancel-me": "cancelled", "fail-me": "failed"}


def test_a_crashed_childs_task_runs_end_crashed(prefect_env):
    """A SIGKILLed child cannot end its task runs; the parent, seeing the child Crashed, ends them."""
    from prefect import flow, get_client, task
    from prefect.states import Crashed, Running

    from fishtune.tasks.remote import end_orphaned_task_runs

    @task
    def work() -> int:
        return 1

    @flow
    def child() -> int:
        return work()

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run_id = child(return_state=True).state_details.flow_run_id  # real ids; then make it look killed
    with get_client(sync_client=True) as client:
        [task_run] = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        client.set_task_run_state(task_run.id, Running(), force=True)  # left Running by the kill
        client.set_flow_run_state(run_id, Crashed(message="the worker's process exited -9"), force=True)
        final = client.read_flow_run(run_id).state
        assert end_orphaned_task_runs(run_id, final) == 1
        assert client.read_task_run(task_run.id).state.name == "Crashed"
        assert end_orphaned_task_runs(run_id, final) == 0  # already final: untouched
