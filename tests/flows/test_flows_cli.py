import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fishtune.cli import app
from fishtune.cli.flows import FLAGS, PREFECT_FILE, _deployable
from fishtune.flows.config import FinetuneConfig

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"
runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_finetune_help_mirrors_the_config_model():
    result = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    help_text = _plain(result.output)
    for flag in FLAGS.values():
        assert flag in help_text, flag
    # every config field (nested ones included) has a flag
    fields = set(FinetuneConfig.model_fields) - {"normalize"} | {"normalize.loudness", "normalize.peak", "normalize.format"}
    assert fields == set(FLAGS)


def test_finetune_reports_every_bad_value_by_flag(tmp_path):
    result = runner.invoke(
        app, ["finetune", "--data", str(tmp_path), "--project", "Bad Name", "--num-workers", "0", "--max-steps", "0"],
        env={"COLUMNS": "300", "NO_COLOR": "1"},
    )
    assert result.exit_code == 2
    text = " ".join(_plain(result.output).split())
    for flag in ("--project", "--num-workers", "--max-steps"):
        assert flag in text


def test_deploy_finds_every_flow_and_skips_missing_ones(tmp_path):
    ready, missing = _deployable(PREFECT_FILE)
    assert (set(ready), missing) == ({"finetune", "finetune-project", "validate-shard", "normalize-shard", "extract", "extract-shard", "train", "evaluate", "merge", "watch"}, [])
    # entry points are module paths (a worker imports the installed fishtune), never repository files
    text = PREFECT_FILE.read_text()
    assert "entrypoint: fishtune.flows.gpu:train_flow" in text and ".py:" not in text
    edited = tmp_path / "prefect.yaml"  # a deployment whose module is not installed is skipped
    edited.write_text(text.replace("fishtune.flows.gpu:train_flow", "fishtune.flows.not_landed:train_flow"))
    ready, missing = _deployable(edited)
    assert missing == ["train"] and set(ready) == {"finetune", "finetune-project", "validate-shard", "normalize-shard", "extract", "extract-shard", "evaluate", "merge", "watch"}


def test_deploy_needs_only_the_storage(tmp_path):
    """Without --data the plain finetune deployment gets no data default (prefect deploy would make
    an unset {{ $FISHTUNE_DATA }} "", which the config refuses); with it, the file is deployed as is."""
    import yaml

    from fishtune.cli.flows import _with_set_parameters

    assert _with_set_parameters(PREFECT_FILE, {"FISHTUNE_STORAGE": "s", "FISHTUNE_DATA": "d"}, tmp_path) == PREFECT_FILE
    copy = _with_set_parameters(PREFECT_FILE, {"FISHTUNE_STORAGE": "s"}, tmp_path)
    deployments = {d["name"]: d for d in yaml.safe_load(copy.read_text())["deployments"]}
    original = {d["name"]: d for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]}
    assert deployments["finetune"]["parameters"] == {"config": {"storage": "{{ $FISHTUNE_STORAGE }}", "gpu_pool": "cuda"}}
    assert {n: d for n, d in deployments.items() if n != "finetune"} == {n: d for n, d in original.items() if n != "finetune"}


@pytest.mark.slow
def test_finetune_command_runs_the_flow(prefect_env, tmp_path):
    result = runner.invoke(
        app, ["finetune", "--data", str(DEMO), "--speaker", "carmen", "--storage", str(tmp_path / "store"), "--project", "cli-test"],
        env={"COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert result.exit_code == 0, result.output
    text = _plain(result.output)
    assert "validate" in text and "normalize" in text and "Report:" in text
    reports = list((tmp_path / "store" / "runs").glob("*/report.md"))
    assert len(reports) == 1 and "| carmen | 8 | 0 |" in reports[0].read_text()
