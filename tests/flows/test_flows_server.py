"""Deployments, workers, the data-landed trigger, child runs and the UI against a real Prefect server."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.flows.conftest import free_port

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """``fishtune deploy`` on the server, the watch schedule paused, cpu and cuda workers running."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    root = tmp_path_factory.mktemp("deployed")
    data, store = root / "data", root / "store"
    shutil.copytree(DEMO, data)
    result = subprocess.run(
        [sys.executable, "-m", "fishtune", "deploy", "--data", str(data), "--storage", str(store)],
        env=prefect_server.env, capture_output=True, text=True, cwd=root,  # not the checkout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with temporary_settings({PREFECT_API_URL: prefect_server.api,
                             PREFECT_RESULTS_LOCAL_STORAGE_PATH: Path(prefect_server.env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])}):
        with get_client(sync_client=True) as client:
            finetune = client.read_deployment_by_name("finetune/finetune")
            watch = client.read_deployment_by_name("watch/watch")
            train = client.read_deployment_by_name("train/train")  # train_flow on the cuda pool, one at a time
            assert train.work_pool_name == "cuda"
            # no cron-started watch runs (and the events they emit) while these tests count runs
            client.pause_deployment(watch.id)
        prefect_server.spawn("worker", "start", "--pool", "cpu", log="worker-cpu.log")
        # the GPU worker in a folder and HOME of its own (another host, as far as paths go); two jobs
        # at once: the global `gpu` limit, not the worker, keeps GPU steps apart
        elsewhere = root / "cuda-worker"
        elsewhere.mkdir()
        prefect_server.spawn("worker", "start", "--pool", "cuda", "--limit", "2", log="worker-cuda.log",
                             cwd=elsewhere, env={"HOME": str(elsewhere)})
        yield SimpleNamespace(data=data, store=store, finetune=finetune, watch=watch, server=prefect_server)


def _wait_run(client, deployment_id, project: str, timeout: float = 120.0):
    """The finished run of ``deployment_id`` whose config has ``project`` (waits for it)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        mine = [r for r in runs if r.parameters.get("config", {}).get("project") == project]
        if mine and all(r.state and r.state.is_final() for r in mine) or time.monotonic() > deadline:
            return mine
        time.sleep(1)


@pytest.mark.slow
def test_deploy_trigger_and_child_runs_on_a_real_server(deployed, tmp_path):
    from prefect.client.orchestration import get_client

    from fishtune.tasks.remote import ChildRunFailed, run_child

    data, store = deployed.data, deployed.store
    pools = deployed.server.prefect("work-pool", "ls").stdout
    assert "cpu" in pools and "cuda" in pools
    with get_client(sync_client=True) as client:
        finetune, watch = deployed.finetune, deployed.watch
        assert finetune.work_pool_name == "cpu" and watch.work_pool_name == "cpu"
        assert watch.schedules and watch.schedules[0].schedule.cron == "*/15 * * * *"
        schema = finetune.parameter_openapi_schema
        assert schema["required"] == ["config"]
        assert schema["definitions"]["AudioFormat"]["enum"] == ["keep", "flac", "wav"]
        assert finetune.parameters["config"]["data"] == str(data)  # FISHTUNE_DATA filled in at deploy time

        # The data-landed event starts finetune for that speaker (the trigger renders the parameters).
        # Emitted from a separate process: this process's events worker may already be bound to
        # the session harness's server (it is created once per process).
        deployed.server.prefect(
            "event", "emit", "fishtune.speaker.data.landed",
            "--resource", json.dumps({"prefect.resource.id": "fishtune.speaker.bruno", "fishtune.speaker": "bruno"}),
            "--payload", json.dumps({"data": str(data), "speaker": "bruno", "project": "triggered"}),
        )
        runs = _wait_run(client, finetune.id, "triggered")
        assert len(runs) == 1, runs
        run = runs[0]
        log = (deployed.server.root / "worker-cpu.log").read_text()[-3000:]
        assert run.state.is_completed(), (run.state, log)
        assert run.parameters["config"]["speaker"] == "bruno"
        manifest = json.loads((store / "runs" / str(run.id) / "manifest.json").read_text())
        assert manifest["parameters"]["speaker"] == "bruno" and manifest["status"] == "completed"
        assert list(manifest["stages"][0]["summary"]["speakers"]) == ["bruno"]

    # A child run through run_deployment: its result comes back; a failed child raises with its name.
    ok = run_child("finetune/finetune", {"config": {"data": str(data), "storage": str(store), "speaker": "alice",
                                                    "project": "child"}}, timeout=180, poll_interval=1)
    assert ok["status"] == "completed" and [s["stage"] for s in ok["stages"]] == ["validate", "normalize"]
    with pytest.raises(ChildRunFailed, match=r"child run '.+' of deployment finetune/finetune ended Failed"):
        run_child("finetune/finetune", {"config": {"data": str(tmp_path / "missing"), "storage": str(store)}},
                  timeout=180, poll_interval=1)


def _wait_until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.3)


@pytest.mark.slow
def test_ui_form_starts_a_run_with_the_changed_parameters(deployed):
    # `make test` installs them (system-deps); missing browsers are a setup error, never a skip.
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "install Debian's chromium and chromium-driver (make system-deps)"
    from prefect.client.orchestration import get_client

    from tests.flows.webdriver import Chrome

    browser = Chrome(free_port(), str(CHROMIUM), str(CHROMEDRIVER))
    value = lambda element: browser.script("return arguments[0].value", element)
    try:
        browser.get(f"{deployed.server.url}/v2/deployments/deployment/{deployed.finetune.id}/run")
        browser.wait_for("body", text="Everything a finetune run needs")  # the model docstring rendered as help
        assert "Integrated loudness target in LUFS" in browser.text(browser.wait_for("body"))
        project = browser.wait_for("textarea")  # the first field of the form: Project
        _wait_until(lambda: value(project) == "demo", "the form's defaults to load")
        browser.clear(project)
        browser.type(project, "ui-form")
        steps = browser.wait_for('input[type="number"][max="1000000"]')  # Max Steps, bounded by le=1_000_000
        browser.clear(steps)
        browser.type(steps, "7")
        _wait_until(lambda: (value(project), value(steps)) == ("ui-form", "7"), "the typed values to stick")
        # Under load the SQLite-backed server may answer create_flow_run with 503 (database busy);
        # a person would press Submit again, so the test does, but only for that status.
        for attempt in range(3):
            browser.click(browser.wait_for("button", text="Submit"))
            try:
                _wait_until(lambda: "/run" not in browser.url(), "the UI to leave the form after creating the run", 30)
                break
            except AssertionError:
                calls = browser.script(
                    "return performance.getEntriesByType('resource').map(e => e.name + ' ' + e.responseStatus)"
                )
                created = [c for c in calls if "/create_flow_run" in c]
                if attempt < 2 and created and created[-1].endswith(" 503"):
                    continue
                (deployed.server.root / "ui-submit.png").write_bytes(browser.screenshot())
                raise AssertionError(f"form not submitted; API calls: {[c for c in calls if '/api/' in c][-8:]}") from None
    finally:
        browser.quit()
    with get_client(sync_client=True) as client:
        runs = _wait_run(client, deployed.finetune.id, "ui-form")
    assert runs and all(r.state.is_completed() for r in runs), [r.state for r in runs]
    config = runs[0].parameters["config"]
    assert (config["project"], config["max_steps"], config["data"]) == ("ui-form", 7, str(deployed.data))
    report = (deployed.store / "runs" / str(runs[0].id) / "report.md").read_text()
    assert "# fishtune finetune `ui-form`" in report


def _children(client, deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    found = client.read_deployment_by_name(deployment)
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))


@pytest.mark.slow
def test_gpu_stages_run_as_children_on_the_cuda_pool_one_card_at_a_time(deployed, tmp_path):
    """Two runs at once, one submitted by `fishtune finetune` with relative paths from another folder
    (the workers run elsewhere, with another HOME): every GPU stage is a child run on the cuda pool,
    named and tagged per project, and no two GPU steps overlap although the cuda worker takes 2 jobs."""
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId

    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fish_speech_core.lm.config import PRESETS
    from fish_speech_core.lm.init_base import init_base
    from fishtune.tasks.remote import ChildRunFailed, run_child

    models = tmp_path / "models"
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), models / "codec.pth")
    init_base(models / "base", PRESETS["tiny"], seed=0)
    submit = tmp_path / "submit"  # the CLI's folder: neither the workers' nor the checkout
    submit.mkdir()
    rel = lambda p: os.path.relpath(p, submit)
    cli = subprocess.Popen(
        [sys.executable, "-m", "fishtune", "finetune", "--data", rel(deployed.data), "--speaker", "carmen",
         "--storage", rel(deployed.store), "--project", "gpu-a", "--codec", rel(models / "codec.pth"),
         "--base", rel(models / "base"), "--preset", "tiny", "--max-steps", "10", "--gpu-pool", "cuda",
         "--evaluate", "--preview-sentences", "1", "--preview-max-tokens", "16"],
        cwd=submit, env={**deployed.server.env, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    config = {"data": str(deployed.data), "storage": str(deployed.store), "speaker": "bruno", "project": "gpu-b",
              "codec": str(models / "codec.pth"), "gpu_pool": "cuda", "base": str(models / "base"), "preset": "tiny",
              "max_steps": 10}
    b = run_child("finetune/finetune", {"config": config}, timeout=600, poll_interval=1)
    output, _ = cli.communicate(timeout=600)
    assert cli.returncode == 0, output[-3000:]
    stages = {s["stage"]: s for s in b["stages"]}
    assert list(stages) == ["validate", "normalize", "extract", "pack", "train", "merge"]
    assert stages["train"]["summary"]["final_step"] == 10 and b["merged_model"]
    run_a = json.loads(next(p for p in (deployed.store / "runs").glob("*/manifest.json")
                            if json.loads(p.read_text())["parameters"]["project"] == "gpu-a").read_text())
    assert run_a["status"] == "completed"
    assert [s["stage"] for s in run_a["stages"]] == ["validate", "normalize", "extract", "pack", "train", "evaluate", "merge"]
    for name in ("data", "base", "codec", "storage"):  # made absolute where the run was submitted
        assert Path(run_a["parameters"][name]).is_absolute() and Path(run_a["parameters"][name]).exists()

    gpu_task_runs = []
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("gpu")
        assert limit.limit == 1  # `fishtune deploy`: one slot per GPU (--gpus, default 1)
        expected = {"extract": {"extract/gpu-a", "extract/gpu-b"}, "train": {"train/gpu-a/10", "train/gpu-b/10"},
                    "evaluate": {"evaluate/gpu-a"}, "merge": {"merge/gpu-a", "merge/gpu-b"}}
        for stage, names in expected.items():
            children = [c for c in _children(client, f"{stage}/{stage}") if c.name in names]
            assert sorted(c.name for c in children) == sorted(names), stage
            for child in children:  # evaluate included: every GPU stage ran on the cuda pool, named and tagged
                project = child.name.split("/")[1]
                assert (child.state.name, child.work_pool_name) == ("Completed", "cuda"), child.name
                assert {"fishtune", f"project:{project}", f"stage:{stage}"} <= set(child.tags), child.tags
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id])))
                gpu_task_runs += [(r.start_time, r.end_time, child.name) for r in runs if r.name.startswith(stage)]
        parents = [r for r in client.read_flow_runs() if r.name.startswith("finetune/gpu-")]
        assert {r.name.split("/")[1] for r in parents} == {"gpu-a", "gpu-b"}
        assert all(re.fullmatch(r"finetune/gpu-[ab]/\d{8}-\d{4}", r.name) for r in parents), [r.name for r in parents]
        assert all({"fishtune", f"project:{r.name.split('/')[1]}"} <= set(r.tags) for r in parents)
    # the cuda worker takes two jobs at once (--limit 2), the `gpu` limit one: the GPU steps never overlap
    gpu_task_runs.sort()
    assert len(gpu_task_runs) == 7
    for (_, end, first), (start, _, second) in zip(gpu_task_runs, gpu_task_runs[1:]):
        assert end <= start, f"{first} and {second} shared the GPU"

    # A failing child fails the parent, with the child's name and state in the message.
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ChildRunFailed) as info:
        run_child("finetune/finetune", {"config": {**config, "codec": str(broken), "project": "gpu-child-fails"}},
                  timeout=300, poll_interval=1)
    assert "ended Failed" in str(info.value)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployed.finetune.id])))
    failed = [r for r in runs if r.parameters["config"].get("project") == "gpu-child-fails"]
    assert len(failed) == 1 and failed[0].state.is_failed()
    assert re.search(r"child run 'extract/gpu-child-fails' of deployment extract/extract ended Failed",
                     failed[0].state.message), failed[0].state.message
    with pytest.raises(ChildRunFailed, match="gpu_pool 'other': deployment extract/extract runs on work pool 'cuda'"):
        run_child("finetune/finetune", {"config": {**config, "gpu_pool": "other", "project": "gpu-other"}},
                  timeout=300, poll_interval=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"project": "Bad Name"}, "project"),
        ({"max_steps": 0}, "max_steps"),
        ({"preset": "huge"}, "preset"),
        ({"normalize": {"loudness": 5.0}}, "loudness"),
        ({"num_workers": "many"}, "num_workers"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_api_rejects_invalid_parameters_naming_the_field(deployed, change, field):
    """The deployment enforces the config's schema: a bad value is refused at creation, no run is made."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    config = {"data": str(deployed.data), "storage": str(deployed.store), **change}
    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs())
        with pytest.raises(PrefectHTTPStatusError) as info:
            client.create_flow_run_from_deployment(deployed.finetune.id, parameters={"config": config})
        after = len(client.read_flow_runs())
    assert info.value.response.status_code == 409
    message = info.value.response.json()["detail"]
    assert "Validation failed" in message and field in message, message
    assert after == before
