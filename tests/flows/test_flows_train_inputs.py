"""Issue 13 in the flow, without a flow run: the train stage's coverage and per-file reuse in the
report and console table, sampling / max_length in the config, and the length check before any stage."""

import pytest
from pydantic import ValidationError

from fish_speech_core.finetune.limits import TrainError
from fish_speech_core.storage import RunManifest, StageRecord
from fishtune.flows.config import FinetuneConfig, Sampling
from fishtune.flows.finetune import _check_max_length
from fishtune.flows.report import cache_label, report_markdown
from tests.finetune.helpers_train import run_cli


def test_cache_cell_says_how_much_per_file_work_a_stage_redid():
    assert cache_label("normalize", True, {"written": 0, "skipped": 0}) == "hit"
    assert cache_label("normalize", False, {"written": 1, "skipped": 25}) == "miss (1 of 26 files redone)"
    assert cache_label("extract", False, {"extracted": 3, "skipped": 23}) == "miss (3 of 26 files redone)"
    assert cache_label("extract", False, {"extracted": 26, "skipped": 0}) == "miss"  # all redone
    assert cache_label("train", False, {"reused_artifact": True}) == "miss (artifact reused)"
    assert cache_label("pack", False, {"speakers": 3}) == "miss"


def test_report_shows_reuse_and_sentences_seen_per_speaker():
    stages = [
        StageRecord("normalize", key="n", url="/s/normalize/n", summary={"written": 1, "skipped": 25}),
        StageRecord("train", key="t", url="/s/train/t", outputs={"checkpoint": "/s/train/t/checkpoints/step_000000010.ckpt"},
                    summary={"history": [{"step": 10, "train_loss": 3.0, "val_loss": 2.9}], "recommended_step": 10,
                             "coverage": {"bruno": {"seen": 20, "sentences": 21}, "a|lice": {"seen": 3, "sentences": 3}}}),
    ]
    report = report_markdown(FinetuneConfig(data="/d"), RunManifest("r", "finetune", {}, status="completed", stages=stages))
    assert "| normalize | miss (1 of 26 files redone) |" in report
    assert "| speaker | sentences seen / sentences in the training split |" in report
    assert "| bruno | 20 / 21 (95%) |" in report and "| a\\|lice | 3 / 3 (100%) |" in report


def test_flow_config_has_sampling_and_max_length():
    config = FinetuneConfig(data="/d")
    assert config.sampling is Sampling.cover and config.max_length is None
    from fish_speech_core.finetune.data import DEFAULT_SAMPLING, SAMPLING_MODES

    assert [m.value for m in Sampling] == list(SAMPLING_MODES) and config.sampling.value == DEFAULT_SAMPLING
    with pytest.raises(ValidationError, match="max_length"):
        FinetuneConfig(data="/d", max_length=5)
    with pytest.raises(ValidationError, match="sampling"):
        FinetuneConfig(data="/d", sampling="shuffle")


def test_flow_refuses_a_max_length_the_base_cannot_take_before_any_stage(tmp_path):
    base = tmp_path / "base"
    assert run_cli("init-base", base, "--preset", "tiny").exit_code == 0  # max_seq_len 512
    with pytest.raises(TrainError, match=r"max_length 1024 is longer than the base's max_seq_len 512.*max_length 512 or less"):
        _check_max_length(FinetuneConfig(data="/d", base=str(base), max_length=1024))
    _check_max_length(FinetuneConfig(data="/d", base=str(base), max_length=512))
    _check_max_length(FinetuneConfig(data="/d", base=str(base)))  # unset: the train task adapts it
