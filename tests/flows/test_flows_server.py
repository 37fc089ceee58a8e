"""Deployments, workers, the data-changed trigger on a saved project, child runs and the UI against a real Prefect server."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.flows.conftest import api_in_process

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """A folder with a tiny random (seeded) ``codec.pth`` and ``base``: the models every trained run here uses."""
    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fish_speech_core.lm.config import PRESETS
    from fish_speech_core.lm.init_base import init_base

    models = tmp_path_factory.mktemp("tiny-models")
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), models / "codec.pth")
    init_base(models / "base", PRESETS["tiny"], seed=0)
    return models


@pytest.fixture(scope="module")
def deployed(moto_s3, prefect_server, tmp_path_factory, request):
    """``fishtune deploy`` on the server, the watch schedule paused, cpu and cuda workers running.

    moto_s3 first: the server and its workers inherit the AWS environment that points at it."""
    from prefect.client.orchestration import get_client

    root = tmp_path_factory.mktemp("deployed")
    data, store = root / "data", root / "store"
    shutil.copytree(DEMO, data)
    deploy = subprocess.Popen(
        [sys.executable, "-m", "fishtune", "deploy", "--data", str(data), "--storage", str(store)],
        env=prefect_server.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=root,  # not the checkout
    )
    # the module's tiny models are made here, while the deploy (single-threaded imports, then two
    # Python processes one after the other) keeps only one of the two cores busy
    request.getfixturevalue("tiny_models")
    output, _ = deploy.communicate(timeout=300)
    assert deploy.returncode == 0, output
    with api_in_process(prefect_server.api, Path(prefect_server.env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])):
        with get_client(sync_client=True) as client:
            finetune = client.read_deployment_by_name("finetune/finetune")
            project = client.read_deployment_by_name("finetune-project/finetune-project")
            watch = client.read_deployment_by_name("watch/watch")
            train = client.read_deployment_by_name("train/train")  # train_flow on the cuda pool, one at a time
            assert train.work_pool_name == "cuda"
            # no cron-started watch runs (and the events they emit) while these tests count runs
            client.pause_deployment(watch.id)
        # each worker in a folder and HOME (so cache folder) of its own: other hosts, as far as paths
        # go; the cuda worker takes two jobs at once: the global `gpu` limit keeps GPU steps apart
        cpu_home, elsewhere = root / "cpu-worker", root / "cuda-worker"
        cpu_home.mkdir()
        elsewhere.mkdir()
        prefect_server.spawn("worker", "start", "--pool", "cpu", log="worker-cpu.log", cwd=cpu_home,
                             env={"HOME": str(cpu_home)})
        cuda = prefect_server.spawn("worker", "start", "--pool", "cuda", "--limit", "2", log="worker-cuda.log",
                                    cwd=elsewhere, env={"HOME": str(elsewhere),
                                                        # Prefect results of its own, as on another host:
                                                        # parents read children's results from the store
                                                        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(elsewhere / "results")})
        yield SimpleNamespace(data=data, store=store, finetune=finetune, project=project, watch=watch, server=prefect_server,
                              cuda_home=elsewhere, cuda_worker=cuda)


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
def test_deploy_and_the_watch_trigger_on_a_real_server(deployed, tiny_models, tmp_path):
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from fishtune.cli import app
    from fishtune.cli.project import schedule_slug

    data, store, runner = deployed.data, deployed.store, CliRunner()
    with get_client(sync_client=True) as client:
        # the pools `fishtune deploy` made, read from the server (a `prefect work-pool ls` process
        # costs ~5 s of imports to say the same)
        pools = {pool.name: pool.type for pool in client.read_work_pools()}
        assert (pools["cpu"], pools["cuda"]) == ("process", "process")
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
    created = runner.invoke(app, ["project", "create", "triggered", "--data", str(pdata), "--base", str(tiny_models / "base"),
                                  "--codec", str(tiny_models / "codec.pth"), "--storage", str(store), "--set", "preset=tiny",
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


def _submit(browser, screenshot: Path) -> None:
    """Press Submit until the UI leaves the form having created the run.

    Under load the SQLite-backed server may answer create_flow_run with 503 (database busy);
    a person would press Submit again, so the test does, but only for that status."""
    for attempt in range(3):
        _wait_for(browser, "button", text="Submit").click()
        try:
            _wait_until(lambda: "/run" not in browser.current_url, "the UI to leave the form after creating the run", 30)
            return
        except AssertionError:
            calls = browser.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name + ' ' + e.responseStatus)"
            )
            created = [c for c in calls if "/create_flow_run" in c]
            if attempt < 2 and created and created[-1].endswith(" 503"):
                continue
            screenshot.write_bytes(browser.get_screenshot_as_png())
            raise AssertionError(f"form not submitted; API calls: {[c for c in calls if '/api/' in c][-8:]}") from None


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
        _submit(browser, deployed.server.root / "ui-submit.png")
        saved = _ui_starts_a_saved_project(deployed, browser)  # while the first run runs
    finally:
        browser.quit()
    with get_client(sync_client=True) as client:
        runs = _wait_run(client, deployed.finetune.id, "ui-form")
    assert runs and all(r.state.is_completed() for r in runs), [r.state for r in runs]
    config = runs[0].parameters["config"]
    assert (config["project"], config["max_steps"], config["data"]) == ("ui-form", 7, str(deployed.data))
    report = (deployed.store / "runs" / str(runs[0].id) / "report.md").read_text()
    assert "# fishtune finetune `ui-form`" in report
    _saved_project_ran_with_the_override(deployed, saved)


def _ui_starts_a_saved_project(deployed, browser) -> bytes:
    """A saved project started from the finetune-project form with one override typed in it, a
    nested one (Normalize > Loudness). Returns the saved spec's bytes."""
    from selenium.webdriver.common.by import By

    from fishtune import projects

    projects.create(str(deployed.store), "ui-project", {"data": str(deployed.data), "speaker": "carmen",
                                                         "max_seconds": 20.0})
    saved = (deployed.store / "projects" / "ui-project.json").read_bytes()
    value = lambda element: element.get_property("value")
    try:
        browser.get(f"{deployed.server.url}/v2/deployments/deployment/{deployed.project.id}/run")
        label = _wait_for(browser, "label", text="Loudness")  # overrides: a form field per spec field
        loudness = browser.find_element(By.ID, label.get_attribute("for"))
        name = _wait_for(browser, "textarea")  # the first field: Project
        name.clear()
        name.send_keys("ui-project")
        loudness.send_keys("-30")
        _wait_until(lambda: (value(name), value(loudness)) == ("ui-project", "-30"), "the typed values to stick")
        _submit(browser, deployed.server.root / "ui-project.png")
    except Exception:
        (deployed.server.root / "ui-project.html").write_text(browser.page_source)
        raise
    return saved


def _saved_project_ran_with_the_override(deployed, saved: bytes) -> None:
    """The run's audio is normalized to the typed loudness, every other field comes from the spec
    (the form sends only the field typed), and the saved spec is unchanged."""
    import pyloudnorm
    import soundfile
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 180
        while True:
            runs = [r for r in _children(client, "finetune-project/finetune-project") if r.parameters.get("project") == "ui-project"]
            if runs and runs[0].state.is_final() or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert len(runs) == 1 and runs[0].state.is_completed(), runs
    assert runs[0].name == "finetune-project/ui-project" and "project:ui-project" in runs[0].tags
    assert runs[0].parameters["overrides"] == {"normalize": {"loudness": -30}}  # untouched fields are not sent (no nulls)
    manifest = next(json.loads(p.read_text()) for p in (deployed.store / "runs").glob("*/manifest.json")
                    if json.loads(p.read_text())["parameters"]["project"] == "ui-project")
    assert manifest["parameters"]["overrides"] == {"normalize.loudness": -30.0}
    assert (manifest["parameters"]["speaker"], manifest["parameters"]["max_seconds"]) == ("carmen", 20.0)  # the spec's
    assert manifest["parameters"]["normalize"] == {"loudness": -30.0, "peak": -1.0, "format": "keep"}
    normalized = {s["stage"]: s for s in manifest["stages"]}["normalize"]["outputs"]["url"]
    audio, rate = soundfile.read(f"{normalized}/carmen/carmen_000.wav")
    assert abs(pyloudnorm.Meter(rate).integrated_loudness(audio) - -30.0) < 0.5  # the spec's default: -23 LUFS
    assert (deployed.store / "projects" / "ui-project.json").read_bytes() == saved  # an override is never saved


def _children(client, deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    found = client.read_deployment_by_name(deployment)
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])))


@pytest.mark.slow
def test_gpu_stages_run_as_children_on_the_cuda_pool_one_card_at_a_time(deployed, tiny_models, s3_bucket, tmp_path):
    """Two runs at once, data and store on S3 (moto): A submitted by `fishtune finetune` with relative
    model paths from another folder (the workers run elsewhere, each with its own HOME and cache
    folder), B through the deployment with a broken codec.
    Every GPU stage of A (evaluate included) is a child run on the cuda pool, named and tagged per
    project; B's failing child fails B naming the child; and no two GPU steps overlap although the
    cuda worker takes 2 jobs at once."""
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

    from fishtune.tasks.remote import ChildRunFailed, check_pool, run_child

    import fsspec

    models = tiny_models
    fs = fsspec.filesystem("s3")
    for speaker in ("bruno", "carmen"):
        fs.put(str(deployed.data / speaker), f"{s3_bucket}/raw/{speaker}", recursive=True)
    data, store = f"{s3_bucket}/raw", f"{s3_bucket}/store"
    submit = tmp_path / "submit"  # the CLI's folder: neither the workers' nor the checkout
    submit.mkdir()
    rel = lambda p: os.path.relpath(p, submit)
    cli = subprocess.Popen(
        [sys.executable, "-m", "fishtune", "finetune", "--data", data, "--speaker", "carmen",
         "--storage", store, "--work-dir", rel(tmp_path / "parent-work"), "--project", "gpu-a", "--codec", rel(models / "codec.pth"),
         "--base", rel(models / "base"), "--preset", "tiny", "--max-steps", "10", "--gpu-pool", "cuda",
         "--evaluate", "--preview-sentences", "1", "--preview-max-tokens", "16"],
        cwd=submit, env={**deployed.server.env, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    config = {"data": data, "storage": store, "speaker": "bruno", "project": "gpu-b", "codec": str(broken),
              "gpu_pool": "cuda"}
    with pytest.raises(ChildRunFailed) as info:  # a failing child fails the parent, with the child's name and state
        run_child("finetune/finetune", {"config": config}, timeout=600, poll_interval=1)
    assert "ended Failed" in str(info.value)
    output, _ = cli.communicate(timeout=600)
    assert cli.returncode == 0, output[-3000:]
    fs.invalidate_cache()
    manifests = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{store}/runs/*/manifest.json")]
    run_a = next(m for m in manifests if m["parameters"]["project"] == "gpu-a")
    assert run_a["status"] == "completed"
    assert [s["stage"] for s in run_a["stages"]] == ["validate", "normalize", "extract", "pack", "train", "evaluate", "merge"]
    assert {s["stage"]: s for s in run_a["stages"]}["train"]["summary"]["final_step"] == 10
    for name in ("base", "codec", "work_dir"):  # made absolute where the run was submitted
        assert Path(run_a["parameters"][name]).is_absolute() and Path(run_a["parameters"][name]).exists()
    assert (run_a["parameters"]["data"], run_a["parameters"]["storage"]) == (data, store)
    # the GPU children used their own host's work folder (the cuda worker's HOME), never the parent's
    assert list((deployed.cuda_home / ".cache" / "fishtune" / "work" / "train").iterdir())
    assert not (tmp_path / "parent-work" / "train").exists() and (tmp_path / "parent-work" / "data").is_dir()
    # the cuda worker's Prefect results are its own (another host's): the parent read each child's
    # result from the store, where the child left it as JSON
    results = {json.loads(fs.cat_file(p))["stage"] for p in fs.glob(f"{store}/runs/children/*.json")}
    assert {"extract", "train", "evaluate", "merge"} <= results

    gpu_task_runs = []
    with get_client(sync_client=True) as client:
        failed = [r for r in _children(client, "finetune/finetune") if r.parameters["config"].get("project") == "gpu-b"]
        assert len(failed) == 1 and failed[0].state.is_failed()
        assert re.search(r"child run 'extract/gpu-b' of deployment extract/extract ended Failed",
                         failed[0].state.message), failed[0].state.message
        limit = client.read_global_concurrency_limit_by_name("gpu")
        assert limit.limit == 1  # `fishtune deploy`: one slot per GPU (--gpus, default 1)
        expected = {"extract": {"extract/gpu-a": "Completed", "extract/gpu-b": "Failed"},
                    "train": {"train/gpu-a/10": "Completed"}, "evaluate": {"evaluate/gpu-a": "Completed"},
                    "merge": {"merge/gpu-a": "Completed"}}
        for stage, names in expected.items():
            children = {c.name: c for c in _children(client, f"{stage}/{stage}") if c.name in names}
            assert {name: c.state.name for name, c in children.items()} == names, stage
            for child in children.values():  # evaluate included: every GPU stage ran on the cuda pool, named and tagged
                project = child.name.split("/")[1]
                assert child.work_pool_name == "cuda", child.name
                assert {"fishtune", f"project:{project}", f"stage:{stage}"} <= set(child.tags), child.tags
                runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id])))
                gpu_task_runs += [(r.start_time, r.end_time, child.name) for r in runs if r.name.startswith(stage)]
        parents = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="finetune/gpu-")))
                   if r.name.startswith("finetune/gpu-")]  # by name: the session's server holds other modules' runs
        assert {r.name.split("/")[1] for r in parents} == {"gpu-a", "gpu-b"}
        assert all(re.fullmatch(r"finetune/gpu-[ab]/\d{8}-\d{4}", r.name) for r in parents), [r.name for r in parents]
        assert all({"fishtune", f"project:{r.name.split('/')[1]}"} <= set(r.tags) for r in parents)
    # the cuda worker takes two jobs at once (--limit 2), the `gpu` limit one: the GPU steps never overlap
    gpu_task_runs.sort()
    assert len(gpu_task_runs) == 5
    for (_, end, first), (start, _, second) in zip(gpu_task_runs, gpu_task_runs[1:]):
        assert end <= start, f"{first} and {second} shared the GPU"
    # a gpu_pool the deployments are not on is refused before any child starts, saying what to do
    with pytest.raises(ValueError, match="gpu_pool 'other': deployment extract/extract runs on work pool 'cuda'"):
        check_pool("extract/extract", "other")


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
        # a saved project's run: its typed overrides are checked the same way
        ({"overrides": {"max_steps": 0}}, "max_steps"),
        ({"overrides": {"normalize": {"loudness": 5.0}}}, "loudness"),
        ({"overrides": {"storage": "elsewhere"}}, "storage"),  # fixed by the project
    ],
)
def test_api_rejects_invalid_parameters_naming_the_field(deployed, change, field):
    """The deployments enforce their schema: a bad value is refused at creation, no run is made."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    if "overrides" in change:
        deployment, parameters = deployed.project, {"project": "any", "storage": str(deployed.store), **change}
    else:
        deployment, parameters = deployed.finetune, {"config": {"data": str(deployed.data), "storage": str(deployed.store), **change}}
    with get_client(sync_client=True) as client:
        before = client.count_flow_runs()  # all of them: read_flow_runs stops at 200
        with pytest.raises(PrefectHTTPStatusError) as info:
            client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        after = client.count_flow_runs()
    assert info.value.response.status_code == 409
    message = info.value.response.json()["detail"]
    assert "Validation failed" in message and field in message, message
    assert after == before


def _render(configuration_class, flow_run_id, pool_name: str):
    """The job configuration a worker of ``pool_name`` builds for the flow run: the worker's own code
    (``resolve_for_flow_run``: pool template + deployment and run job variables, then prepare)."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def resolve():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            pool = await client.read_work_pool(pool_name)
            return await configuration_class.resolve_for_flow_run(run, client=client, work_pool=pool,
                                                                  worker_name="render-test")

    # on Prefect's own loop thread: a loop of our own (asyncio.run) would leave this process's events
    # client bound to a closed loop, and every later in-process run would lose its events
    return run_coro_as_sync(resolve())


@pytest.mark.slow
def test_container_gpu_pools_from_our_templates_render_the_job_a_gpu_child_gets(deployed, tmp_path, monkeypatch):
    """Docker and Kubernetes cuda pools made from deployments/pools/ on the real server; a train child run
    with the job variables the launcher sends; the workers' own code renders its container / Job.
    No Docker engine or cluster here: the rendered configuration is what is checked."""
    import docker.types
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.deployments import run_deployment
    from prefect_docker.worker import DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from fishtune.cli.flows import PREFECT_FILE
    from fishtune.cli.pools import PoolType, PoolTypeMismatch, cuda_template, ensure_pool
    from fishtune.tasks.params import TrainParams
    from fishtune.tasks.remote import job_variables_for

    # The CLI refuses a cuda pool of another type, in one line, and changes nothing.
    refused = subprocess.run([sys.executable, "-m", "fishtune", "deploy", "--storage", str(deployed.store),
                              "--pool-type", "kubernetes"], env=deployed.server.env, capture_output=True, text=True,
                             cwd=tmp_path)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert [line for line in refused.stderr.splitlines() if "work pool" in line] == [
        "fishtune deploy: work pool 'cuda' is a process pool, not kubernetes: deploy with --pool-type process, "
        "or delete it first (prefect work-pool delete cuda) and deploy again"]

    cuda_vars = yaml.safe_load(PREFECT_FILE.read_text())["definitions"]["cuda_pool"]["job_variables"]
    params = TrainParams(preset="tiny", max_steps=2, memory="24Gi")
    monkeypatch.setenv("FISHTUNE_REDIS_URL", "redis://:hunter2@redis.internal:6379/0")  # the worker host's secret
    rendered, made = {}, []
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("cuda").type == "process"
        train = client.read_deployment_by_name("train/train")
        try:
            for kind in (PoolType.docker, PoolType.kubernetes):
                name, template = f"render-{kind.value}", cuda_template(kind)
                assert ensure_pool(client, name, kind, template) == "created"
                made.append(name)
                assert ensure_pool(client, name, kind, template) == "unchanged"
                edited = json.loads(json.dumps(template))
                edited["variables"]["properties"]["image"]["default"] = "someone/else:1"
                client.update_work_pool(name, WorkPoolUpdate(base_job_template=edited))
                assert ensure_pool(client, name, kind, template) == "updated"  # a redeploy restores ours
                assert client.read_work_pool(name).base_job_template == template
                with pytest.raises(PoolTypeMismatch, match=f"work pool '{name}' is a {kind.value} pool, not process"):
                    ensure_pool(client, name, PoolType.process, {})
                deployment_id = client.create_deployment(
                    flow_id=train.flow_id, name=f"train-{kind.value}", work_pool_name=name,
                    entrypoint="fishtune.flows.gpu:train_flow", job_variables=cuda_vars,
                    parameter_openapi_schema=train.parameter_openapi_schema)
                # what the train launcher sends (tasks/remote.on_pool), started without waiting
                run = run_deployment(f"train/train-{kind.value}", timeout=0, job_variables=job_variables_for(params),
                                     parameters={"pack_url": "s3://b/store/pack/k", "base": "s3://b/base",
                                                 "store_root": "s3://b/store", "params": params.model_dump(mode="json")})
                cls = DockerWorkerJobConfiguration if kind is PoolType.docker else KubernetesWorkerJobConfiguration
                rendered[kind] = (run.id, _render(cls, run.id, name))
                client.delete_flow_run(run.id)
                client.delete_deployment(deployment_id)
        finally:
            for name in made:
                client.delete_work_pool(name)

    memory = str(24 * 2**30)
    run_id, job = rendered[PoolType.kubernetes]
    pod = job.job_manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "fishtune-cuda:latest"  # docker/Dockerfile.cuda, the template's default
    assert container["args"] == ["prefect", "flow-run", "execute"]  # on the image's PATH (/opt/venv/bin)
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1, "memory": memory},
                                      "requests": {"memory": memory}}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "CUDA_VISIBLE_DEVICES" not in env and env["DO_NOT_TRACK"] == "1"  # the cards: the device plugin's
    assert env["PREFECT__FLOW_RUN_ID"] == str(run_id) and env["PREFECT_API_URL"] == deployed.server.api
    assert container["envFrom"] == [{"secretRef": {"name": "fishtune", "optional": True}}]  # credentials: a Secret
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {} and pod["restartPolicy"] == "Never"
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert "hunter2" not in json.dumps(job.job_manifest)  # no host secret leaks into the Job

    run_id, container = rendered[PoolType.docker]
    assert container.image == "fishtune-cuda:latest" and container.image_pull_policy == "IfNotPresent"
    assert container.command == "prefect flow-run execute" and container.mem_limit == memory
    assert "CUDA_VISIBLE_DEVICES" not in container.env and container.env["PREFECT__FLOW_RUN_ID"] == str(run_id)
    assert container.container_create_kwargs == {
        "device_requests": [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}], "shm_size": "8g"}
    # docker-py takes them as they are (what containers.create builds from the worker's settings)
    host = docker.types.HostConfig(version="1.44", mem_limit=container.mem_limit,
                                   **container.container_create_kwargs)
    assert host["Memory"] == 24 * 2**30 and host["ShmSize"] == 8 * 2**30
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Count": 1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                                       "Options": {}}]
    assert "hunter2" not in json.dumps(container.model_dump(mode="json"))


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_normalize_shards_run_on_the_cpu_pool_and_merge_to_one_runs_bytes(deployed, tmp_path):
    """K=2 validate and K=2 normalize shards (data_shards 2) run as child runs of the
    validate-shard and normalize-shard deployments on the cpu pool (the fixture's cpu worker, which
    takes both of a stage at once); each merged artifact is byte for byte what one in-process run
    publishes, under its key, so a K=1 run after it reuses it."""
    from prefect.client.orchestration import get_client

    from fish_speech_core.storage import Store
    from fishtune.flows.config import FinetuneConfig
    from fishtune.flows.finetune import finetune
    from fishtune.tasks.data import normalize_task, validate_task

    data, store = tmp_path / "data", tmp_path / "store"
    for speaker in ("alice", "carmen"):  # alice's two clips are shard 1 of 2, carmen's shard 2
        (data / speaker).mkdir(parents=True)
        for clip in sorted((DEMO / speaker).iterdir())[:4]:
            shutil.copy(clip, data / speaker / clip.name)
    config = FinetuneConfig(data=str(data), storage=str(store), project="norm-shards", cpu_pool="cpu",
                            data_shards=2)  # no codec: stops after normalize
    first = finetune(config)
    with get_client(sync_client=True) as client:
        for name in ("validate", "normalize"):
            children = [c for c in _children(client, f"{name}-shard/{name}-shard")
                        if c.name.startswith(f"{name}/norm-shards/")]
            assert sorted((c.name, c.state.name, c.work_pool_name) for c in children) == [
                (f"{name}/norm-shards/shard-1-of-2", "Completed", "cpu"),
                (f"{name}/norm-shards/shard-2-of-2", "Completed", "cpu")]
            assert all({"fishtune", "project:norm-shards", f"stage:{name}"} <= set(c.tags) for c in children)
    validated = {s["stage"]: s for s in first["stages"]}["validate"]
    assert {k: validated["summary"][k] for k in ("accepted", "shards", "checked", "reused")} == {
        "accepted": 4, "shards": 2, "checked": 4, "reused": 0}
    one_validated = validate_task.fn(str(data), str(tmp_path / "one"))
    assert one_validated["key"] == validated["key"]
    merged, reference = (Store(root).lookup("validate", validated["key"]) for root in (str(store), str(tmp_path / "one")))
    assert set(merged.files) == set(reference.files) == {"manifest.parquet", "report.md", "summary.json"}
    for rel in merged.files:
        assert Path(merged.file_url(rel)).read_bytes() == Path(reference.file_url(rel)).read_bytes(), rel
    stage = {s["stage"]: s for s in first["stages"]}["normalize"]
    assert {k: stage["summary"][k] for k in ("files", "shards", "written", "skipped")} == {
        "files": 4, "shards": 2, "written": 4, "skipped": 0}
    merged = Store(str(store)).lookup("normalize", stage["key"])
    one = normalize_task.fn(str(data), str(tmp_path / "one"), work_dir=str(tmp_path / "one-work"))
    assert one["key"] == merged.key
    reference = Store(str(tmp_path / "one")).lookup("normalize", one["key"])
    assert set(merged.files) == set(reference.files) and len(merged.files) == 4 * 2 + 2
    for rel in merged.files:
        assert Path(merged.file_url(rel)).read_bytes() == Path(reference.file_url(rel)).read_bytes(), rel
    # K=1 (in this process) after K=2: the same key, the published artifact is reused
    again = normalize_task.fn(str(data), str(store), work_dir=str(tmp_path / "k1-work"))
    assert again["key"] == stage["key"] and again["summary"]["reused_artifact"]
    assert validate_task.fn(str(data), str(store))["summary"]["reused_artifact"]


@pytest.mark.slow
def test_extraction_shards_run_on_two_cuda_workers_and_a_lost_one_reruns_alone(deployed, tiny_models, tmp_path):
    """K=2 extraction shards (K from the `gpu` limit's 2 slots) run at once on two cuda workers;
    the host of one dies mid-shard (its worker and the job it started are SIGKILLed): the parent
    notices the worker went offline and fails naming that shard; the rerun launches that shard
    alone (on the surviving worker: the other shard's launcher is Cached), and the merged artifact
    is byte for byte what one in-process run publishes. A K=1 run then finds it: nothing is launched.

    Last in the module: it replaces the fixture's cuda worker by two of its own (named, 3 s
    heartbeats, the stall fault armed for one clip)."""
    import os
    import signal
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from fish_speech_core.sharding import shard_of
    from fish_speech_core.storage import Store
    from fishtune.flows.config import FinetuneConfig
    from fishtune.flows.finetune import finetune
    from fishtune.tasks.codec import extract_task
    from fishtune.tasks.params import ExtractParams
    from fishtune.tasks.remote import GPU_LIMIT, worker_of
    from tests.faults.inject.fishtune_faults import child_env

    data, armed, store = tmp_path / "data", tmp_path / "armed", tmp_path / "store"
    armed.mkdir()
    for speaker in ("alice", "carmen"):
        (data / speaker).mkdir(parents=True)
        for clip in sorted((DEMO / speaker).iterdir())[:4]:  # 2 clips each: audio + transcript
            shutil.copy(clip, data / speaker / clip.name)
    assert {shard_of(f"alice/alice_00{i}", 2) for i in (0, 1)} == {0} and {shard_of(f"carmen/carmen_00{i}", 2) for i in (0, 1)} == {1}
    (armed / "carmen_001.stall").touch()  # shard 2 stalls at its second clip

    deployed.cuda_worker.terminate()  # only the two workers below take cuda runs now
    deployed.cuda_worker.wait(timeout=30)
    workers = {}
    for name in ("cuda-1", "cuda-2"):
        home = tmp_path / name
        home.mkdir()
        proc = deployed.server.spawn("worker", "start", "--pool", "cuda", "--limit", "1", "--name", name,
                                     log=f"worker-{name}.log", cwd=home,
                                     env={"HOME": str(home), "PREFECT_WORKER_HEARTBEAT_SECONDS": "3",
                                          "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
                                          **child_env(f"stall_extract={armed}")})
        workers[proc.pid] = name
    killed = {}

    def the_host_dies() -> None:  # once shard 2 stalls: SIGKILL its worker and the job that worker started
        marker, deadline = armed / "carmen_001.stalled", time.monotonic() + 240
        while not (marker.is_file() and marker.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if marker.is_file() and marker.read_text().strip():
            job = int(marker.read_text())
            worker = _parent_pid(job)
            killed.update(job=job, worker=workers.get(worker))
            os.kill(worker, signal.SIGKILL)
            os.kill(job, signal.SIGKILL)

    config = FinetuneConfig(data=str(data), storage=str(store), project="shards", codec=str(tiny_models / "codec.pth"),
                            gpu_pool="cuda", extract_num_workers=0)  # no base: stops after pack
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, 2)  # two GPUs: K=2 by default, both at once
        try:
            killer = threading.Thread(target=the_host_dies, daemon=True)
            killer.start()
            first = finetune(config, return_state=True)
            killer.join(timeout=5)
            assert first.is_failed() and killed.get("worker"), (first, killed)
            assert re.search(r"extract: 1 of 2 shard\(s\) failed \(shard-2-of-2: child run 'extract/shards/shard-2-of-2' "
                             rf"of deployment extract-shard/extract-shard ended Crashed: its worker '{killed['worker']}' went "
                             r"offline while it ran .+\); the 1 finished shard\(s\) are kept", first.message), first.message
            second = finetune(config)
            third = finetune(config.model_copy(update={"extract_shards": 1}))
            children = sorted((c for c in _children(client, "extract-shard/extract-shard") if c.name.startswith("extract/shards/")),
                              key=lambda c: c.expected_start_time)
            by_name = [(c.name, c.state.name, worker_of(client, c.id)) for c in children]
            second_tasks = {t.name: t.state.name for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[second["run_id"]])))}
            one_run = [c for c in _children(client, "extract/extract") if c.name.startswith("extract/shards")]
        finally:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, 1)
    survivor = next(name for name in workers.values() if name != killed["worker"])
    # the first run: one shard on each worker; the second: shard 2 alone, on the worker that is left
    assert sorted(by_name[:2]) == sorted([("extract/shards/shard-1-of-2", "Completed", survivor),
                                          ("extract/shards/shard-2-of-2", "Crashed", killed["worker"])]), by_name
    assert by_name[2:] == [("extract/shards/shard-2-of-2", "Completed", survivor)], by_name
    assert second_tasks["extract/shards/shard-1-of-2"] == "Cached" and second_tasks["extract/shards/shard-2-of-2"] == "Completed"
    stages = {s["stage"]: s for s in second["stages"]}
    assert list(stages) == ["validate", "normalize", "extract", "pack"] and stages["pack"]["summary"]["sentences"] == 4
    # shard 1's two clips came from cache; of shard 2's, carmen_000 was written before the kill (the
    # work folder of a local store is shared by the workers of this host): only carmen_001 is redone
    assert {k: stages["extract"]["summary"][k] for k in ("files", "shards", "extracted", "skipped")} == {
        "files": 4, "shards": 2, "extracted": 1, "skipped": 3}
    # K=1 after K=2: the same key, so the extract stage is Cached and no extract child is launched
    assert {s["stage"]: s for s in third["stages"]}["extract"]["cached"] and not one_run
    # byte for byte what one extraction of the same normalized data publishes
    merged = Store(str(store)).lookup("extract", stages["extract"]["key"])
    normalized = stages["normalize"]["url"]
    one = extract_task.fn(normalized, str(tiny_models / "codec.pth"), str(tmp_path / "one"), ExtractParams(num_workers=0),
                          work_dir=str(tmp_path / "one-work"))
    assert one["key"] == merged.key
    reference = Store(str(tmp_path / "one")).lookup("extract", one["key"])
    assert set(merged.files) == set(reference.files) and len(merged.files) == 4 * 3 + 1
    for rel in merged.files:
        assert Path(merged.file_url(rel)).read_bytes() == Path(reference.file_url(rel)).read_bytes(), rel
