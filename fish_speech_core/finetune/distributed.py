"""Where a training process sits in its run, and the processes and process group around it.

One process per device ("rank"). The ranks of a node are started by the process a user started
(``fishtune train``, the flow's train task): it is the node's local rank 0 and starts the others
as ``python -m fish_speech_core.finetune.rank`` with ``LOCAL_RANK`` set, rather than through
Lightning's launchers (``ddp`` re-runs the parent's command line, a Prefect flow run or pytest
included; ``ddp_spawn`` pickles the trainer and starts new processes for every ``fit`` and
``validate`` call). Nodes meet at ``MASTER_ADDR:MASTER_PORT`` (torch's static ``env://``
rendezvous, the variables Lightning's own environment and torchrun use): every node gets
``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` and ``WORLD_SIZE``, and one ``fishtune train`` per
node. A process started with ``LOCAL_RANK`` set (by us, or by torchrun) starts nobody.

No torch or Lightning import at module level: the flow layer reads :class:`Rendezvous`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fish_speech_core import defaults
from fish_speech_core.finetune.limits import TrainError

RANK_ENV = ("NODE_RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")


@dataclass(frozen=True)
class Rendezvous:
    """What the launcher of this process said about it (all optional on one node).

    ``local_rank`` None: nobody started this process as a rank, so it is local rank 0 and
    starts its node's other ranks. ``master_port`` None: a free port (one node only).
    """

    node_rank: int = 0
    local_rank: int | None = None
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    world_size: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Rendezvous":
        """From ``NODE_RANK`` (or ``GROUP_RANK``), ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``.

        Raises:
            TrainError: a variable that is not a number, naming it.
        """
        def number(name: str, low: int) -> int | None:
            raw = env.get(name)
            if raw in (None, ""):
                return None
            try:
                value = int(raw)
            except ValueError:
                value = low - 1
            if value < low:
                raise TrainError(f"environment variable {name}={raw!r} must be an integer >= {low}")
            return value

        node = number("NODE_RANK", 0)
        node = number("GROUP_RANK", 0) if node is None else node
        return cls(node_rank=node or 0, local_rank=number("LOCAL_RANK", 0),
                   master_addr=env.get("MASTER_ADDR") or "127.0.0.1", master_port=number("MASTER_PORT", 1),
                   world_size=number("WORLD_SIZE", 1))

    def env(self) -> dict[str, str]:
        """The variables :meth:`from_env` reads back (unset fields left out)."""
        out = {"NODE_RANK": str(self.node_rank), "MASTER_ADDR": self.master_addr}
        for name, value in (("LOCAL_RANK", self.local_rank), ("MASTER_PORT", self.master_port),
                            ("WORLD_SIZE", self.world_size)):
            if value is not None:
                out[name] = str(value)
        return out


@dataclass(frozen=True)
class World:
    """This process's place in the run, resolved from the config, the rendezvous and the machine."""

    accelerator: str  # "cpu" | "gpu"
    devices: int | list[int]  # what Lightning's Trainer gets: a count, or the GPU indices
    per_node: int  # processes on each node
    num_nodes: int
    node_rank: int
    local_rank: int
    master_addr: str
    master_port: int
    backend: str  # torch.distributed backend
    ddp: bool  # DDPStrategy (more than one process, or strategy ddp)
    starts_node: bool  # this process starts the node's other ranks

    @property
    def world_size(self) -> int:
        return self.per_node * self.num_nodes

    @property
    def global_rank(self) -> int:
        return self.node_rank * self.per_node + self.local_rank

    def rendezvous(self, local_rank: int) -> Rendezvous:
        return Rendezvous(self.node_rank, local_rank, self.master_addr, self.master_port, self.world_size)

    def describe(self) -> str:
        return f"rank {self.global_rank} of {self.world_size} (node {self.node_rank}, local rank {self.local_rank})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_world(devices: str, num_nodes: int, strategy: str, backend: str | None, rendezvous: Rendezvous,
                  cuda_count: int) -> World:
    """Check the layout and say where this process is in it.

    ``devices`` per node: on GPUs ``auto`` (all ``cuda_count``), a count or indices ``0,1``; on a
    machine without GPUs a process count (``auto`` = 1).

    Raises:
        TrainError: naming the flag or environment variable that does not fit.
    """
    if cuda_count:
        accelerator = "gpu"
        if devices == "auto":
            per_node, lightning_devices = cuda_count, cuda_count
        elif "," in devices:
            indices = [int(i) for i in devices.split(",")]
            if len(set(indices)) != len(indices) or max(indices) >= cuda_count:
                raise TrainError(f"--devices {devices}: this machine has GPUs 0..{cuda_count - 1}, each listed once")
            per_node, lightning_devices = len(indices), indices
        else:
            per_node = int(devices)
            if per_node > cuda_count:
                raise TrainError(f"--devices {devices}: this machine has {cuda_count} GPU(s)")
            lightning_devices = per_node
    else:
        accelerator = "cpu"
        if "," in devices:
            raise TrainError(f"--devices {devices} lists GPUs and this machine has none; on CPU give a process count")
        per_node = 1 if devices == "auto" else int(devices)
        lightning_devices = per_node
    world_size = per_node * num_nodes
    if rendezvous.world_size is not None and rendezvous.world_size != world_size:
        raise TrainError(f"WORLD_SIZE={rendezvous.world_size} but --devices {devices} x --num-nodes {num_nodes} "
                         f"makes {world_size} processes")
    if rendezvous.node_rank >= num_nodes:
        raise TrainError(f"NODE_RANK={rendezvous.node_rank} is not below --num-nodes {num_nodes}")
    local_rank = rendezvous.local_rank or 0
    if local_rank >= per_node:
        raise TrainError(f"LOCAL_RANK={local_rank} is not below the {per_node} processes per node (--devices {devices})")
    port = rendezvous.master_port
    if port is None:
        if num_nodes > 1:
            raise TrainError(f"--num-nodes {num_nodes}: set MASTER_ADDR (node 0's address) and MASTER_PORT on every "
                             f"node, and NODE_RANK 0..{num_nodes - 1}")
        if rendezvous.local_rank is not None and per_node > 1:
            raise TrainError("LOCAL_RANK is set without MASTER_PORT: the ranks of a node need one port to meet at")
        port = free_port()
    return World(
        accelerator=accelerator, devices=lightning_devices, per_node=per_node, num_nodes=num_nodes,
        node_rank=rendezvous.node_rank, local_rank=local_rank, master_addr=rendezvous.master_addr,
        master_port=port, backend=backend or ("nccl" if accelerator == "gpu" else "gloo"),
        ddp=world_size > 1 or strategy == "ddp",
        starts_node=rendezvous.local_rank is None and per_node > 1,
    )


# --- the node's other ranks --------------------------------------------------------------------


def cpu_threads(world: World) -> int:
    """Torch threads per rank on CPU: the machine's cores shared by the node's ranks."""
    return max(1, (os.cpu_count() or 1) // world.per_node)


def start_local_ranks(world: World, config: dict[str, Any], resume: str) -> list[subprocess.Popen]:
    """Start local ranks 1.. of this node, each training ``config`` from checkpoint ``resume``
    (a path, or ``never``: the decision of this process, so every rank resumes the same step)."""
    import json

    procs = []
    for local_rank in range(1, world.per_node):
        env = {**os.environ, **world.rendezvous(local_rank).env()}
        if world.accelerator == "cpu":
            env.setdefault("OMP_NUM_THREADS", str(cpu_threads(world)))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fish_speech_core.finetune.rank", json.dumps(config), resume], env=env,
            stdin=subprocess.DEVNULL,
        ))
    return procs


def stop_local_ranks(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """End the node's other ranks (after this one failed): SIGTERM, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_local_ranks(procs: list[subprocess.Popen], timeout: float = defaults.DIST_TIMEOUT_S) -> None:
    """Wait for the node's other ranks to finish.

    Raises:
        TrainError: one of them failed or did not end in ``timeout`` seconds.
    """
    for local_rank, proc in enumerate(procs, start=1):
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_local_ranks(procs)
            raise TrainError(f"local rank {local_rank} did not finish {timeout:.0f} s after this rank did") from None
        if status != 0:
            raise TrainError(f"local rank {local_rank} of this node failed (exit status {status}); its error is above")


# --- the process group -------------------------------------------------------------------------


def init_process_group(world: World) -> None:
    """torch.distributed for ``world`` (Lightning finds it initialised and uses it)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if world.accelerator == "gpu":
        index = world.devices[world.local_rank] if isinstance(world.devices, list) else world.local_rank
        torch.cuda.set_device(index)
    try:
        dist.init_process_group(world.backend, init_method=f"tcp://{world.master_addr}:{world.master_port}",
                                rank=world.global_rank, world_size=world.world_size,
                                timeout=timedelta(seconds=defaults.DIST_TIMEOUT_S))
    except (RuntimeError, ValueError) as err:
        raise TrainError(f"{world.describe()}: could not join the other ranks at {world.master_addr}:"
                         f"{world.master_port} within {defaults.DIST_TIMEOUT_S} s: {_first_line(err)}") from None


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_peer_failure(err: BaseException) -> bool:
    """An error of a collective whose peer went away (killed, crashed) or timed out."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        word in text for word in ("Connection reset", "Connection closed", "Broken pipe", "gloo", "NCCL", "timed out"))


def peer_failure(world: World, err: BaseException, checkpoints: list[int]) -> TrainError:
    resume = (f"rerun every rank with --resume auto to continue from step {checkpoints[-1]}" if checkpoints
              else "no checkpoint was written yet: rerun every rank to start again")
    return TrainError(f"{world.describe()}: training stopped because another rank of the run stopped or stopped "
                      f"answering ({_first_line(err)}); {resume}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def agree_on_resume(world: World, mine: Path | None, checkpoint_dir: Path) -> Path | None:
    """Rank 0's resume checkpoint, on every rank: the same file, copied from rank 0 to the ranks
    that lack it (nodes without a shared results folder). A collective: every rank calls it."""
    import torch.distributed as dist

    from fish_speech_core.files import atomic_write, sha256_file

    decision = [None]
    if world.global_rank == 0 and mine is not None:
        decision = [(mine.name, sha256_file(mine))]
    dist.broadcast_object_list(decision, src=0)
    if decision[0] is None:
        return None
    name, digest = decision[0]
    local = mine if world.global_rank == 0 else checkpoint_dir / name
    have = local.is_file() and sha256_file(local) == digest
    needs: list = [None] * world.world_size
    dist.all_gather_object(needs, not have)
    if any(needs):
        payload = [local.read_bytes() if world.global_rank == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        if not have:
            local.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(local) as handle:
                handle.write(payload[0])
    return local


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (itself when no process group is up)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def lightning_environment(world: World):
    """A Lightning ClusterEnvironment reporting ``world`` (processes started by us or torchrun)."""
    from lightning.fabric.plugins.environments import ClusterEnvironment

    class Fixed(ClusterEnvironment):
        @property
        def creates_processes_externally(self) -> bool:
            return True

        @property
        def main_address(self) -> str:
            return world.master_addr

        @property
        def main_port(self) -> int:
            return world.master_port

        @staticmethod
        def detect() -> bool:
            return True

        def world_size(self) -> int:
            return world.world_size

        def set_world_size(self, size: int) -> None:
            if size != world.world_size:
                raise ValueError(f"Lightning wants {size} processes, the run has {world.world_size}")

        def global_rank(self) -> int:
            return world.global_rank

        def set_global_rank(self, rank: int) -> None:
            if rank != world.global_rank:
                raise ValueError(f"Lightning puts this process at rank {rank}, the run at {world.global_rank}")

        def local_rank(self) -> int:
            return world.local_rank

        def node_rank(self) -> int:
            return world.node_rank

    return Fixed()
