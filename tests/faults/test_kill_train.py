"""SIGKILL `fishtune train` between checkpoint writes and in the middle of one, then resume:
only complete checkpoints are ever loaded, the run ends exactly at max_steps, and (CPU, same
settings) its adapters, optimizer state and history equal an uninterrupted run's bit for bit."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fish_speech_core.finetune.checkpoints import list_checkpoints, read_checkpoint
from fish_speech_core.finetune.module import TrainConfig
from fish_speech_core.finetune.train import train
from tests.faults.helpers import finish, fishtune, kill_when, temporaries
from tests.faults.inject.fishtune_faults import child_env
from tests.finetune.helpers_train import FAST, make_base_and_data

MAX_STEPS, EVERY = 6, 2


def steps(run: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(run / "checkpoints")]


def assert_tensors_equal(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_sigkill_between_and_during_checkpoint_writes_then_resume(tmp_path):
    base, protos = make_base_and_data(tmp_path)
    flags = ("--base", base, "--data", protos, "--max-steps", MAX_STEPS, "--val-check-interval", EVERY,
             "--results-dir", tmp_path / "results", *FAST)
    run = tmp_path / "results" / "kill"

    # 1. Between writes: killed once the first checkpoint is published, while training goes on.
    #    The kill is watched from a thread while this thread trains the uninterrupted run: the two
    #    runs overlap (the CLI's start-up is single-threaded imports), their folders are apart.
    ckpts = run / "checkpoints"
    first = fishtune("train", "--project", "kill", *flags)
    with ThreadPoolExecutor(1) as pool:
        killing = pool.submit(kill_when, first, lambda: steps(run) != [] and not temporaries(ckpts))
        try:
            # FAST = batch 2, max length 128, val fraction 0.2, lr 1e-3; the recipe's LoRA dropout is on.
            whole = train(TrainConfig(project="whole", base=str(base), data=(str(protos),), max_steps=MAX_STEPS,
                                      val_check_interval=EVERY, batch_size=2, max_length=128, val_fraction=0.2,
                                      lr=1e-3, results_dir=str(tmp_path / "results")), show_progress=False)
        except BaseException:
            first.kill()  # the watcher then ends too
            raise
        killing.result(timeout=300)  # kill_when's own failure, if any, is raised here
    assert whole.final_step == MAX_STEPS
    assert steps(run) == [2]
    complete = (ckpts / "step_000000002.ckpt").stat().st_size
    read_checkpoint(ckpts / "step_000000002.ckpt")  # complete and loadable
    before = set(temporaries(ckpts))  # normally none; a slow kill may have hit the next write

    # 2. During a write: a fault injected from the test side (tests/faults/inject) stops the
    #    step-4 checkpoint half-written in its temp file; the kill lands there.
    proc = fishtune("train", "--project", "kill", *flags, env=child_env("stall_checkpoint=4"))
    kill_when(proc, lambda: any(p.stat().st_size > 0 for p in set(temporaries(ckpts)) - before))
    leftover = [p for p in temporaries(ckpts) if p not in before]
    assert [p.name.startswith(".step_000000004.") for p in leftover] == [True]
    assert 0 < leftover[0].stat().st_size < complete  # really half a checkpoint
    assert steps(run) == [2]  # the half-written step 4 is under no final name

    # 3. Resume: from step 2 (the last complete checkpoint), to exactly max_steps.
    status, log = finish(fishtune("train", "--project", "kill", *flags))
    assert status == 0, log
    assert "Restoring states from the checkpoint path at" in log and "step_000000002.ckpt" in log
    assert not temporaries(run), "the interrupted write's temp file was not cleared"
    assert steps(run) == [2, 4, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == MAX_STEPS
    assert any("removed .step_000000004." in note for note in summary["notes"])
    history = json.loads((run / "history.json").read_text())
    assert [row["step"] for row in history] == [0, 2, 4, 6]
    assert (run / "lora.json").is_file() and (run / "config.json").is_file()

    # Bit-exact on CPU: same adapters, optimizer state, LR schedule and history as the run
    # that was never interrupted (dropout masks depend on the step, not on the process).
    for step in (2, 6):
        got = read_checkpoint(run / "checkpoints" / f"step_{step:09d}.ckpt")
        want = read_checkpoint(whole.run_dir / "checkpoints" / f"step_{step:09d}.ckpt")
        assert got["global_step"] == want["global_step"] == step
        assert_tensors_equal(got["state_dict"], want["state_dict"], f"step {step} adapters")
        assert_tensors_equal(got["optimizer_states"], want["optimizer_states"], f"step {step} optimizer")
        assert got["lr_schedulers"] == want["lr_schedulers"]
    assert history == json.loads((whole.run_dir / "history.json").read_text())
