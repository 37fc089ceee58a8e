"""Training inputs checked before any step (issue 13): --max-length against the base, the sampling
mode recorded, coverage reported, and byte-identical checkpoints for the same inputs."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from fish_speech_core.finetune.checkpoints import read_checkpoint
from fish_speech_core.finetune.module import TrainConfig
from fish_speech_core.finetune.train import TrainError, resolve_max_length
from tests.finetune.helpers_train import make_base_and_data, run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_base_and_data(tmp_path_factory.mktemp("inputs"), speakers=2, sentences=8)


def test_max_length_longer_than_the_base_fails_at_once_naming_both_numbers(setup, tmp_path):
    base, protos = setup  # the tiny base: max_seq_len 512
    started = time.perf_counter()
    out = run_cli("train", "--project", "long", "--base", base, "--data", protos, "--max-length", "4096",
                  "--results-dir", tmp_path)
    assert out.exit_code == 1
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert len(lines) == 1, out.output
    assert "--max-length 4096" in lines[0] and "max_seq_len 512" in lines[0] and "--max-length 512 or less" in lines[0]
    assert str(base) in lines[0] and "Traceback" not in out.output
    assert time.perf_counter() - started < 10  # before the model or the data are loaded
    assert not (tmp_path / "long").exists()  # nothing written


def test_default_max_length_adapts_to_the_base():
    assert resolve_max_length(None, 512, "b") == 512
    assert resolve_max_length(None, 8192, "b") == 4096
    assert resolve_max_length(None, 512, "b", default=256) == 256  # the tiny preset's own default
    assert resolve_max_length(512, 512, "b") == 512
    with pytest.raises(TrainError, match=r"max_length 600 is longer than the base's max_seq_len 512"):
        resolve_max_length(600, 512, "b", flag="max_length")


def test_runs_saved_before_the_sampling_choice_read_as_reference():
    old = TrainConfig(project="p", base="b", data=("d",)).to_dict()
    del old["sampling"]
    assert TrainConfig.from_dict(old).sampling == "reference"
    assert TrainConfig(project="p", base="b", data=("d",)).sampling == "cover"
    assert "--sampling must be one of" in " ".join(TrainConfig(project="p", base="b", data=("d",), sampling="x").validate())


@pytest.mark.slow
def test_train_records_sampling_and_max_length_and_reports_coverage(setup, tmp_path):
    base, protos = setup
    out = run_cli("train", "--project", "cov", "--base", base, "--data", protos, "--max-steps", "4",
                  "--val-check-interval", "2", "--batch-size", "2", "--val-fraction", "0.2",
                  "--results-dir", tmp_path)
    assert out.exit_code == 0, out.output
    run = tmp_path / "cov"
    config = json.loads((run / "config.json").read_text())
    assert config["sampling"] == "cover" and config["max_length"] == 512  # min(4096, tiny max_seq_len)
    saved = read_checkpoint(run / "checkpoints" / "step_000000004.ckpt")
    assert saved["fishtune_config"]["sampling"] == "cover"
    coverage = json.loads((run / "summary.json").read_text())["coverage"]
    assert set(coverage) == {"SPK0", "SPK1"}
    for row in coverage.values():
        assert 0 < row["seen"] <= row["sentences"] <= 8
    assert sorted(saved["fishtune_seen"]) == saved["fishtune_seen"]
    flat = " ".join(out.output.split())  # rich wraps the table title to the terminal width
    assert "sentences seen / sentences in the training split" in flat and "SPK0" in flat

    # same inputs (same paths: a checkpoint records its run's config), same checkpoint bytes
    first = (run / "checkpoints" / "step_000000004.ckpt").read_bytes()
    shutil.rmtree(run)
    again = run_cli("train", "--project", "cov", "--base", base, "--data", protos, "--max-steps", "4",
                    "--val-check-interval", "2", "--batch-size", "2", "--val-fraction", "0.2",
                    "--results-dir", tmp_path)
    assert again.exit_code == 0, again.output
    assert (run / "checkpoints" / "step_000000004.ckpt").read_bytes() == first

    # --sampling reference is recorded too, and resuming with the other mode is refused
    out = run_cli("train", "--project", "cov", "--base", base, "--data", protos, "--max-steps", "6",
                  "--sampling", "reference", "--results-dir", tmp_path)
    assert out.exit_code == 1 and "sampling: checkpoint has 'cover', now 'reference'" in out.output


def test_init_base_and_init_codec_give_the_same_bytes_in_any_folder(tmp_path):
    for command, name in (("init-base", "model.pth"), ("init-codec", None)):
        outputs = []
        for folder in ("one", "two-with-a-longer-name"):
            target = tmp_path / folder / (command if name else "codec.pth")
            out = run_cli(command, target, "--preset", "tiny", "--seed", "3")
            assert out.exit_code == 0, out.output
            outputs.append((target / name) if name else target)
        assert outputs[0].read_bytes() == outputs[1].read_bytes(), command


def test_cli_sampling_choices_are_the_core_modes():
    from fish_speech_core.finetune.data import DEFAULT_SAMPLING, SAMPLING_MODES
    from fishtune.cli.train import Sampling

    assert [m.value for m in Sampling] == list(SAMPLING_MODES) and Sampling.cover.value == DEFAULT_SAMPLING
