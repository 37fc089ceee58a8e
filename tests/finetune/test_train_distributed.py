"""Training over 2 processes on CPU with real torch.distributed (gloo) equals one process with the
same global batch and seed: 2 devices on one node, and 2 nodes of 1 device (two `fishtune train`
on 127.0.0.1); a rank SIGKILLed mid-run stops the other with one clear line, and the rerun
resumes both from rank 0's last checkpoint (node 1 has its own results folder: it gets the file
from rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fish_speech_core.finetune.checkpoints import list_checkpoints, read_checkpoint
from fish_speech_core.finetune.distributed import free_port
from fish_speech_core.finetune.module import TrainConfig
from fish_speech_core.finetune.train import train
from tests.faults.inject.fishtune_faults import child_env
from tests.finetune.helpers_train import make_base_and_data, run_cli

ROOT = Path(__file__).resolve().parents[2]
# global batch 4 (2 per rank), dropout on (the recipe's 0.01), validation + checkpoint every 2 steps
RUN = dict(max_steps=4, val_check_interval=2, batch_size=4, max_length=128, val_fraction=0.2, lr=1e-3)
FLAGS = ("--max-steps", "4", "--val-check-interval", "2", "--batch-size", "4", "--max-length", "128",
         "--val-fraction", "0.2", "--lr", "1e-3")
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_base_and_data(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def setup(inputs, tmp_path_factory):
    """The inputs and the one-process run every layout must reproduce."""
    base, protos = inputs
    single = train(TrainConfig(project="one", base=str(base), data=(str(protos),),
                               results_dir=str(tmp_path_factory.mktemp("one")), **RUN), show_progress=False)
    assert single.world_size == 1 and single.final_step == 4
    return base, protos, single


def steps(run: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(run / "checkpoints")]


def assert_same_training(run: Path, single) -> None:
    """Adapters within TOLERANCE of the one-process run at every checkpoint, same history rows."""
    for step in (2, 4):
        got = read_checkpoint(run / "checkpoints" / f"step_{step:09d}.ckpt")
        want = read_checkpoint(single.run_dir / "checkpoints" / f"step_{step:09d}.ckpt")
        assert got["global_step"] == step and got["lr_schedulers"] == want["lr_schedulers"]
        assert got["state_dict"].keys() == want["state_dict"].keys()
        worst = max(float((got["state_dict"][k] - want["state_dict"][k]).abs().max()) for k in want["state_dict"])
        assert worst <= TOLERANCE, f"step {step}: adapters differ by {worst}"
        assert any(float(v.abs().max()) > 1e-3 for k, v in got["state_dict"].items() if k.endswith("lora_B"))
    history = json.loads((run / "history.json").read_text())
    want = json.loads((single.run_dir / "history.json").read_text())
    assert [r["step"] for r in history] == [r["step"] for r in want] == [0, 2, 4]
    for a, b in zip(history, want):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["recommended"]["step"] == single.recommendation.step


@pytest.mark.slow
def test_two_devices_on_one_node_train_like_one_process(setup, tmp_path):
    base, protos, single = setup
    result = train(TrainConfig(project="two", base=str(base), data=(str(protos),), results_dir=str(tmp_path),
                               devices="2", **RUN), show_progress=False)
    assert result.world_size == 2 and result.rank == 0 and result.final_step == 4
    assert_same_training(tmp_path / "two", single)
    assert result.coverage == single.coverage  # the same samples, whoever trained on them
    assert not torch.distributed.is_initialized()  # the process group ends with the run


def node_env(rank: int, port: int) -> dict[str, str]:
    return {"NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}


def start_node1(base, protos, results: Path, port: int, faults: str | None = None) -> subprocess.Popen:
    env = {**os.environ, **node_env(1, port), **(child_env(faults) if faults else {})}
    return subprocess.Popen(
        [sys.executable, "-m", "fishtune", "train", "--project", "nodes", "--base", str(base), "--data", str(protos),
         "--results-dir", str(results), "--num-nodes", "2", "--devices", "1", *FLAGS],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def node0(base, protos, results: Path, port: int):
    """Node 0 is this process (fishtune train through the CLI, with the node's environment)."""
    from typer.testing import CliRunner

    from fishtune.cli import app

    args = ["train", "--project", "nodes", "--base", str(base), "--data", str(protos), "--results-dir", str(results),
            "--num-nodes", "2", "--devices", "1", *FLAGS]
    return CliRunner().invoke(app, args, env=node_env(0, port))


@pytest.mark.slow
def test_two_nodes_a_killed_rank_stops_the_other_and_the_rerun_resumes_both(setup, tmp_path):
    base, protos, single = setup
    run = tmp_path / "node0" / "nodes"

    # 1. Node 1 SIGKILLs itself when step 3 starts (after the step-2 checkpoint): node 0 stops with one line.
    port = free_port()
    peer = start_node1(base, protos, tmp_path / "node1", port, faults="sigkill_after_step=2")
    died: list[float] = []
    threading.Thread(target=lambda: (peer.wait(), died.append(time.monotonic())), daemon=True).start()
    out = node0(base, protos, tmp_path / "node0", port)
    stopped = time.monotonic()
    assert peer.wait(timeout=60) == -9, peer.stdout.read()[-3000:]
    assert out.exit_code == 1, out.output[-3000:]
    errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "another rank of the run stopped" in errors[0], out.output[-3000:]
    assert "--resume auto to continue from step 2" in errors[0] and "Traceback" not in out.output
    assert stopped - died[0] < 30  # noticed at once (gloo: the connection closed), not after a timeout
    assert steps(run) == [2] and steps(tmp_path / "node1" / "nodes") == []  # rank 0 writes, alone

    # 2. The rerun of both resumes from rank 0's step 2 (node 1 gets the file) and trains like one process.
    port = free_port()
    peer = start_node1(base, protos, tmp_path / "node1", port)
    out = node0(base, protos, tmp_path / "node0", port)
    log, _ = peer.communicate(timeout=120)
    assert out.exit_code == 0, out.output[-3000:]
    assert peer.returncode == 0, log[-3000:]
    assert "rank 1 of 2: trained to step 4, resumed from step_000000002.ckpt" in log
    assert steps(run) == [2, 4]
    assert_same_training(run, single)


# --- layout checks (no processes) ------------------------------------------------------------


def test_rendezvous_and_layout_are_checked_naming_the_variable_or_flag():
    from fish_speech_core.finetune.distributed import Rendezvous, resolve_world
    from fish_speech_core.finetune.limits import TrainError

    env = {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29600", "WORLD_SIZE": "4"}
    rdzv = Rendezvous.from_env(env)
    assert rdzv == Rendezvous(node_rank=1, local_rank=None, master_addr="10.0.0.5", master_port=29600, world_size=4)
    assert Rendezvous.from_env(rdzv.env()) == rdzv
    world = resolve_world("2", 2, "auto", None, rdzv, cuda_count=2)
    assert (world.accelerator, world.world_size, world.global_rank, world.backend) == ("gpu", 4, 2, "nccl")
    assert world.ddp and world.starts_node  # local rank 0 of node 1 starts local rank 1
    cpu = resolve_world("auto", 1, "auto", None, Rendezvous(), cuda_count=0)
    assert (cpu.accelerator, cpu.devices, cpu.ddp, cpu.starts_node) == ("cpu", 1, False, False)
    assert resolve_world("1", 1, "ddp", None, Rendezvous(), cuda_count=0).ddp  # strategy ddp: even alone
    for devices, nodes, rendezvous, cuda, message in [
        ("2", 2, Rendezvous.from_env({**env, "WORLD_SIZE": "3"}), 2, "WORLD_SIZE=3 but --devices 2 x --num-nodes 2"),
        ("1", 2, Rendezvous(), 0, "set MASTER_ADDR"),
        ("3", 1, Rendezvous(), 2, "this machine has 2 GPU"),
        ("0,1", 1, Rendezvous(), 0, "lists GPUs and this machine has none"),
        ("1", 2, Rendezvous.from_env({**env, "NODE_RANK": "2", "WORLD_SIZE": "2"}), 0, "NODE_RANK=2 is not below"),
    ]:
        with pytest.raises(TrainError, match=message):
            resolve_world(devices, nodes, "auto", None, rendezvous, cuda)
    with pytest.raises(TrainError, match="MASTER_PORT='x' must be an integer"):
        Rendezvous.from_env({"MASTER_PORT": "x"})
    problems = TrainConfig(project="p", base="b", data=("d",), devices="0", num_nodes=0, strategy="fsdp",
                           process_group_backend="mpi").validate()
    assert [p.split()[0] for p in problems] == ["--num-nodes", "--strategy", "--process-group-backend", "--devices"]


def test_batch_must_split_over_the_processes(inputs, tmp_path):
    base, protos = inputs
    with pytest.raises(Exception, match=r"--batch-size 3 \(the global batch\) does not split evenly over the 2"):
        train(TrainConfig(project="odd", base=str(base), data=(str(protos),), results_dir=str(tmp_path),
                          devices="2", **{**RUN, "batch_size": 3}), show_progress=False)
    assert not (tmp_path / "odd").exists()
