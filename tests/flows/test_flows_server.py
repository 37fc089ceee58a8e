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
def tiny_models(tmp_path_factory) -> SimpleNamespace:
    """A tiny random base model and codec (seeded), the ones every trained run here uses."""
    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fish_speech_core.lm.config import PRESETS
    from fish_speech_core.lm.init_base import init_base

    root = tmp_path_factory.mktemp("tiny-models")
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), root / "codec-tiny.pth")
    init_base(root / "base", PRESETS["tiny"], seed=0)
    return SimpleNamespace(base=root / "base", codec=root / "codec-tiny.pth")


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
            project = client.read_deployment_by_name("finetune-project/finetune-project")
            watch = client.read_deployment_by_name("watch/watch")
            train = client.read_deployment_by_name("train/train")  # train_flow on the cuda pool, one at a time
            assert train.work_pool_name == "cuda"
            # no cron-started watch runs (and the events they emit) while these tests count runs
            client.pause_deployment(watch.id)
        prefect_server.spawn("worker", "start", "--pool", "cpu", log="worker-cpu.log")
        prefect_server.spawn("worker", "start", "--pool", "cuda", "--limit", "1", log="worker-cuda.log")
        yield SimpleNamespace(data=data, store=store, finetune=finetune, project=project, watch=watch, server=prefect_server)


def _wait_run(client, deployment_id, project: str, timeout: float = 120.0, count: int = 1):
    """The finished runs of ``deployment_id`` for ``project`` (waits for ``count`` of them): the
    finetune deployment's by its config, finetune-project's by its parameter."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        mine = [r for r in runs if (r.parameters.get("config") or r.parameters).get("project") == project]
        if len(mine) >= count and all(r.state and r.state.is_final() for r in mine) or time.monotonic() > deadline:
            return sorted(mine, key=lambda r: r.expected_start_time)
        time.sleep(1)


def _watch_tick(client, deployed, timeout: float = 60.0) -> None:
    """One run of the watch deployment with its deployed parameters (what a cron tick starts), finished."""
    run = client.create_flow_run_from_deployment(deployed.watch.id)
    deadline = time.monotonic() + timeout
    while not (run := client.read_flow_run(run.id)).state.is_final():
        assert time.monotonic() < deadline, f"watch run {run.name} did not finish in {timeout:.0f} s"
        time.sleep(0.5)
    assert run.state.is_completed(), (run.state, (deployed.server.root / "worker-cpu.log").read_text()[-3000:])


def _project_manifests(store: Path, project: str) -> list[dict]:
    manifests = [json.loads(p.read_text()) for p in (store / "runs").glob("*/manifest.json")]
    return sorted((m for m in manifests if m["parameters"]["project"] == project), key=lambda m: m["started"])


@pytest.mark.slow
def test_deploy_trigger_and_child_runs_on_a_real_server(deployed, tiny_models, tmp_path):
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from fishtune.cli import app
    from fishtune.cli.project import schedule_slug
    from fishtune.tasks.remote import ChildRunFailed, run_child

    data, store, runner = deployed.data, deployed.store, CliRunner()
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

        assert watch.parameters == {"storage": str(store)} and "data" not in watch.parameters  # projects carry their data
        assert [s.slug for s in watch.schedules] == ["every-project"]
        assert deployed.project.work_pool_name == "cpu" and deployed.project.parameters == {"storage": str(store)}

    # A project (its spec on the store) of two speakers; the first watch tick on this fresh
    # deployment starts ONE run for it (not one per speaker), which trains with the saved base and codec.
    pdata = tmp_path / "project-data"
    for speaker in ("alice", "carmen"):
        (pdata / speaker).mkdir(parents=True)
        for clip in sorted((DEMO / speaker).iterdir())[:6]:  # 3 clips each: audio + transcript
            shutil.copy(clip, pdata / speaker / clip.name)
    created = runner.invoke(app, ["project", "create", "triggered", "--data", str(pdata), "--base", str(tiny_models.base),
                                  "--codec", str(tiny_models.codec), "--storage", str(store), "--set", "preset=tiny",
                                  "--set", "max_steps=2"])
    assert created.exit_code == 0, created.output
    with get_client(sync_client=True) as client:
        _watch_tick(client, deployed)
        runs = _wait_run(client, deployed.project.id, "triggered", timeout=300)
        assert len(runs) == 1 and runs[0].state.is_completed(), (runs, (deployed.server.root / "worker-cpu.log").read_text()[-3000:])
        assert runs[0].parameters == {"project": "triggered", "storage": str(store)}  # the spec decides the rest
        [first] = _project_manifests(store, "triggered")
        s1 = {s["stage"]: s for s in first["stages"]}
        assert list(s1) == ["validate", "normalize", "extract", "pack", "train", "merge"]
        assert s1["validate"]["summary"]["accepted"] == 6 and s1["pack"]["summary"]["sentences"] == 6

        # A new clip lands: the next tick retrains the project on ALL of its data (old + new);
        # the unchanged clips are reused, and the merged model is a new version.
        for clip in sorted((DEMO / "carmen").iterdir())[6:8]:
            shutil.copy(clip, pdata / "carmen" / clip.name)
        _watch_tick(client, deployed)
        runs = _wait_run(client, deployed.project.id, "triggered", timeout=300, count=2)
        assert len(runs) == 2 and runs[1].state.is_completed(), runs
        first, second = _project_manifests(store, "triggered")
    s2 = {s["stage"]: s for s in second["stages"]}
    assert list(s2) == list(s1) and second["parameters"]["speaker"] is None
    assert s2["validate"]["summary"]["accepted"] == 7 and s2["pack"]["summary"]["sentences"] == 7
    assert (s2["normalize"]["summary"]["written"], s2["normalize"]["summary"]["skipped"]) == (1, 6)
    assert (s2["extract"]["summary"]["extracted"], s2["extract"]["summary"]["skipped"]) == (1, 6)
    assert s2["train"]["summary"]["final_step"] == 2
    assert s2["merge"]["summary"]["version"] != s1["merge"]["summary"]["version"]

    # Its own watch schedule: replaced, never duplicated, beside the file's every-project one.
    for args in (["--every", "5m"], ["--cron", "0 3 * * *"]):
        scheduled = runner.invoke(app, ["project", "schedule", "triggered", *args, "--storage", str(store)])
        assert scheduled.exit_code == 0, scheduled.output
    with get_client(sync_client=True) as client:
        schedules = {s.slug: s for s in client.read_deployment_schedules(deployed.watch.id)}
    assert set(schedules) == {"every-project", schedule_slug(str(store), "triggered")}
    mine = schedules[schedule_slug(str(store), "triggered")]
    assert mine.schedule.cron == "0 3 * * *" and mine.parameters == {"storage": str(store), "project": "triggered"}

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


@pytest.mark.slow
def test_parent_on_cpu_runs_extract_as_a_child_on_the_cuda_pool(deployed, tiny_models, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from fishtune.tasks.remote import ChildRunFailed, run_child

    codec = tiny_models.codec
    config = {"data": str(deployed.data), "storage": str(deployed.store), "speaker": "carmen", "project": "gpu-child",
              "codec": str(codec), "gpu_pool": "cuda", "base": str(tiny_models.base), "preset": "tiny", "max_steps": 10}
    result = run_child("finetune/finetune", {"config": config}, timeout=300, poll_interval=1)
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["validate", "normalize", "extract", "pack", "train", "merge"]
    assert stages["train"]["summary"]["final_step"] == 10 and result["merged_model"]
    assert stages["extract"]["summary"]["extracted"] == 8 and stages["pack"]["summary"]["sentences"] == 8
    with get_client(sync_client=True) as client:
        extract = client.read_deployment_by_name("extract/extract")
        assert extract.work_pool_name == "cuda" and extract.global_concurrency_limit.limit == 1
        children = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[extract.id])))
    assert [(c.state.name, c.work_pool_name) for c in children] == [("Completed", "cuda")]
    assert children[0].parameters["codec"] == str(codec)
    with get_client(sync_client=True) as client:  # training ran as a child run of train_flow on the cuda pool
        train = client.read_deployment_by_name("train/train")
        assert train.global_concurrency_limit.limit == 1
        children = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[train.id])))
    assert [(c.state.name, c.work_pool_name) for c in children] == [("Completed", "cuda")]

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
    assert re.search(r"child run '.+' of deployment extract/extract ended Failed", failed[0].state.message), failed[0].state.message


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
