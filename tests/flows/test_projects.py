"""Project specs on the store and the ``fishtune project`` commands (no Prefect server needed)."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fishtune import projects
from fishtune.cli import app
from fishtune.flows.config import FinetuneConfig

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"
runner = CliRunner()
ENV = {"COLUMNS": "300", "NO_COLOR": "1"}


def _run(*args: str):
    result = runner.invoke(app, ["project", *args], env=ENV)
    return result, re.sub(r"\x1b\[[0-9;]*m", "", result.output)


def test_project_create_show_edit_list_and_one_line_errors(tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    result, out = _run("create", "voice-a", "--data", str(DEMO), "--base", "models/base", "--codec", "models/codec.pth",
                       "--storage", str(store), "--set", "preset=tiny", "--set", "max_steps=5", "--set", "normalize.loudness=-20")
    assert result.exit_code == 0, out
    spec = json.loads((store / "projects" / "voice-a.json").read_text())
    # every FinetuneConfig field, validated and typed; local paths saved absolute (runs start elsewhere)
    assert set(spec) == set(FinetuneConfig.model_fields)
    assert (spec["project"], spec["storage"], spec["data"]) == ("voice-a", str(store), str(DEMO))
    assert (spec["base"], spec["codec"]) == (str(tmp_path / "models" / "base"), str(tmp_path / "models" / "codec.pth"))
    assert (spec["preset"], spec["max_steps"], spec["normalize"]) == ("tiny", 5, {"loudness": -20.0, "peak": -1.0, "format": "keep"})

    result, out = _run("show", "voice-a", "--storage", str(store))
    assert result.exit_code == 0 and json.loads(result.stdout) == spec
    result, out = _run("edit", "voice-a", "--storage", str(store), "--set", "max_steps=7", "--set", "normalize.peak=-2")
    assert result.exit_code == 0, out
    edited = projects.load(str(store), "voice-a")
    assert (edited.max_steps, edited.normalize.peak, edited.normalize.loudness, edited.preset.value) == (7, -2.0, -20.0, "tiny")
    result, _ = _run("edit", "voice-a", "--storage", str(store), "--set", "base=")  # FIELD= clears an optional field
    assert result.exit_code == 0 and projects.load(str(store), "voice-a").base is None
    assert _run("create", "voice-b", "--data", str(DEMO), "--base", "b", "--codec", "c", "--storage", str(store))[0].exit_code == 0
    result, out = _run("list", "--storage", str(store))
    assert result.exit_code == 0 and result.stdout.splitlines() == [f"voice-a\t{DEMO}", f"voice-b\t{DEMO}"]

    # Bad input: one line naming the field / project, exit 2, the saved spec unchanged.
    before = (store / "projects" / "voice-a.json").read_bytes()
    for args, expected in [
        (("edit", "voice-a", "--set", "max_steps=0"), "error: max_steps: Input should be greater than 0"),
        (("edit", "voice-a", "--set", "surprise=1"), "error: surprise: unknown field"),
        (("edit", "voice-a", "--set", "normalize.nope=1"), "error: normalize.nope: unknown field"),
        (("edit", "voice-a", "--set", "max_steps.x=1"), "error: max_steps.x: max_steps has no fields to set"),
        (("edit", "voice-a", "--set", "preset=huge"), "error: preset: Input should be 'tiny', 'small' or 'large'"),
        (("edit", "voice-a", "--set", "project=other"), "error: project: fixed by the project"),
        (("edit", "voice-a", "--set", "max_steps"), "error: --set 'max_steps': expected FIELD=VALUE"),
        (("edit", "voice-a"), "error: nothing to change"),
        (("edit", "nope", "--set", "max_steps=3"), "error: no project 'nope' in"),
        (("show", "nope"), "error: no project 'nope' in"),
        (("schedule", "voice-a"), "error: give one of --every, --cron or --off"),
        (("schedule", "voice-a", "--every", "10s"), "error: --every '10s': expected a number and s, m, h or d of at least one minute"),
        (("schedule", "nope", "--every", "5m"), "error: no project 'nope' in"),
        (("show", "Bad Name"), "error: project name 'Bad Name': String should match pattern"),
        (("create", "voice-a", "--data", "d", "--base", "b", "--codec", "c"), "error: project 'voice-a' exists in"),
        (("create", "voice-c", "--data", "s3://KEY:hunter2@bucket/raw", "--base", "b", "--codec", "c"), "error: data: s3://***@bucket/raw carries credentials"),
    ]:
        result, out = _run(*args, "--storage", str(store))
        assert result.exit_code == 2, (args, out)
        assert out.startswith(expected) and len(out.strip().splitlines()) == 1, (args, out)
        assert "hunter2" not in out and "Traceback" not in out
    assert (store / "projects" / "voice-a.json").read_bytes() == before
    assert "(projects there: voice-a, voice-b)" in _run("show", "nope", "--storage", str(store))[1]

    # A spec edited by hand into an invalid one is reported with its file and field.
    (store / "projects" / "voice-b.json").write_text(json.dumps({**spec, "max_steps": -1}))
    result, out = _run("show", "voice-b", "--storage", str(store))
    assert result.exit_code == 2 and out.strip() == f"error: {store}/projects/voice-b.json: max_steps: Input should be greater than 0"
    listed = _run("list", "--storage", str(store))[0].stdout.splitlines()  # the others are still listed
    assert listed == [f"voice-a\t{DEMO}", f"voice-b\tunreadable: {store}/projects/voice-b.json: max_steps: Input should be greater than 0"]


def test_project_spec_on_s3(s3_bucket):
    root = f"{s3_bucket}/store"
    config = projects.create(root, "remote", {"data": "s3://voices/raw", "base": "s3://models/base", "codec": "s3://models/codec.pth"})
    assert projects.list_projects(root) == ["remote"] and config.storage == root
    assert projects.load(root, "remote") == config
    assert projects.edit(root, "remote", {"max_steps": "9"}).max_steps == 9 == projects.load(root, "remote").max_steps


def test_overrides_hold_only_the_fields_given():
    """A run's typed overrides: every settable spec field, each optional; what a dump (a stored
    run's parameters, a re-sent run) holds is what was given, so an untouched field never clears
    the spec's value, while an explicit None does clear an optional one."""
    from pydantic import ValidationError

    given = projects.Overrides.model_validate({"max_steps": "3", "normalize": {"loudness": -20}, "base": None})
    assert given.model_dump(mode="json") == {"max_steps": 3, "normalize": {"loudness": -20.0}, "base": None}
    assert list(projects.given(given).items()) == [("normalize.loudness", -20.0), ("base", None), ("max_steps", 3)]
    assert projects.Overrides().model_dump() == {} and projects.given(projects.Overrides()) == {}
    assert projects.overrides({"normalize.peak": "-2", "codec": ""}).model_dump() == {"normalize": {"peak": -2.0}, "codec": None}
    spec = FinetuneConfig(data=str(DEMO), base="b", codec="c", max_steps=9, normalize={"loudness": -18, "peak": -3})
    run = projects.with_settings(spec, projects.given(given))
    assert (run.max_steps, run.normalize.loudness, run.normalize.peak, run.base, run.codec) == (3, -20.0, -3.0, None, spec.codec)
    for bad, expected in [({"max_steps": 0}, "max_steps: Input should be greater than 0"),
                          ({"normalize": {"loudness": 5}}, "normalize.loudness: Input should be less than or equal to 0"),
                          ({"max_steps": None}, "max_steps: Input should be a valid integer"),  # not optional in the spec
                          ({"storage": "x"}, "storage: unknown field")]:
        with pytest.raises(ValidationError) as info:
            projects.Overrides.model_validate(bad)
        assert projects.problems(info.value).startswith(expected)
    # one definition: the spec's fields (less the fixed ones) with their limits and help
    schema = projects.Overrides.model_json_schema()
    assert set(schema["properties"]) == set(FinetuneConfig.model_fields) - set(projects.FIXED)
    spec_max_steps = dict(FinetuneConfig.model_json_schema()["properties"]["max_steps"])
    assert spec_max_steps.pop("default") == 1000 and schema["properties"]["max_steps"] == spec_max_steps
    properties = [*schema["properties"].values(), *schema["$defs"]["NormalizeOptionsOverrides"]["properties"].values()]
    assert not [p for p in properties if "default" in p or "<" in p["description"]]  # the form shows them empty


@pytest.mark.slow
def test_project_run_uses_the_spec_and_records_this_runs_overrides(prefect_env, tmp_path):
    store = tmp_path / "store"
    projects.create(str(store), "run-test", {"data": str(DEMO), "base": "b", "codec": "c", "speaker": "carmen"})
    saved = (store / "projects" / "run-test.json").read_bytes()
    result, out = _run("run", "run-test", "--storage", str(store), "--set", "codec=", "--set", "base=", "--set", "max_seconds=20",
                       "--set", "normalize.loudness=-20")
    assert result.exit_code == 0, out
    assert "validate" in out and "normalize" in out and "Report:" in out
    [manifest] = [json.loads(p.read_text()) for p in (store / "runs").glob("*/manifest.json")]
    assert [s["stage"] for s in manifest["stages"]] == ["validate", "normalize"]  # no codec for this run: stops there
    assert (manifest["parameters"]["project"], manifest["parameters"]["speaker"]) == ("run-test", "carmen")
    assert manifest["parameters"]["overrides"] == {"codec": None, "base": None, "max_seconds": 20.0, "normalize.loudness": -20.0}
    assert manifest["parameters"]["normalize"]["loudness"] == -20.0
    assert (store / "projects" / "run-test.json").read_bytes() == saved  # overrides are never saved
    result, out = _run("run", "run-test", "--storage", str(store), "--set", "max_steps=0")
    assert result.exit_code == 2 and out.strip() == "error: max_steps: Input should be greater than 0"
