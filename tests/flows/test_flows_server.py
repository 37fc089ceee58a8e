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
        prefect_server.spawn("worker", "start", "--pool", "cuda", "--limit", "1", log="worker-cuda.log")
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


def _chromium():
    """Headless Debian Chromium through Debian's chromedriver: the Service path set, so
    selenium-manager never looks for (or downloads) a driver or a browser."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def _wait_for(browser, css: str, text: str | None = None, timeout: float = 30.0):
    """The first element matching ``css`` (whose text contains ``text``), waiting for it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    def first(driver):
        return next((e for e in driver.find_elements(By.CSS_SELECTOR, css) if text is None or text in e.text), False)

    return WebDriverWait(browser, timeout, poll_frequency=0.3, ignored_exceptions=(StaleElementReferenceException,)).until(
        first, f"no {css!r}" + (f" with text {text!r}" if text else "") + f" after {timeout:.0f} s")


@pytest.mark.slow
def test_ui_form_starts_a_run_with_the_changed_parameters(deployed):
    # `make test` installs them (system-deps); missing browsers are a setup error, never a skip.
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "install Debian's chromium and chromium-driver (make system-deps)"
    from prefect.client.orchestration import get_client

    browser = _chromium()
    value = lambda element: element.get_property("value")
    try:
        browser.get(f"{deployed.server.url}/v2/deployments/deployment/{deployed.finetune.id}/run")
        _wait_for(browser, "body", text="Everything a finetune run needs")  # the model docstring rendered as help
        assert "Integrated loudness target in LUFS" in _wait_for(browser, "body").text
        project = _wait_for(browser, "textarea")  # the first field of the form: Project
        _wait_until(lambda: value(project) == "demo", "the form's defaults to load")
        project.clear()
        project.send_keys("ui-form")
        steps = _wait_for(browser, 'input[type="number"][max="1000000"]')  # Max Steps, bounded by le=1_000_000
        steps.clear()
        steps.send_keys("7")
        _wait_until(lambda: (value(project), value(steps)) == ("ui-form", "7"), "the typed values to stick")
        # Under load the SQLite-backed server may answer create_flow_run with 503 (database busy);
        # a person would press Submit again, so the test does, but only for that status.
        for attempt in range(3):
            _wait_for(browser, "button", text="Submit").click()
            try:
                _wait_until(lambda: "/run" not in browser.current_url, "the UI to leave the form after creating the run", 30)
                break
            except AssertionError:
                calls = browser.execute_script(
                    "return performance.getEntriesByType('resource').map(e => e.name + ' ' + e.responseStatus)"
                )
                created = [c for c in calls if "/create_flow_run" in c]
                if attempt < 2 and created and created[-1].endswith(" 503"):
                    continue
                (deployed.server.root / "ui-submit.png").write_bytes(browser.get_screenshot_as_png())
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
def test_parent_on_cpu_runs_extract_as_a_child_on_the_cuda_pool(deployed, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fishtune.tasks.remote import ChildRunFailed, run_child

    from fish_speech_core.lm.config import PRESETS
    from fish_speech_core.lm.init_base import init_base

    codec = tmp_path / "codec-tiny.pth"
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), codec)
    init_base(tmp_path / "base", PRESETS["tiny"], seed=0)
    config = {"data": str(deployed.data), "storage": str(deployed.store), "speaker": "carmen", "project": "gpu-child",
              "codec": str(codec), "gpu_pool": "cuda", "base": str(tmp_path / "base"), "preset": "tiny", "max_steps": 10}
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
