"""Faults that tests inject into fishtune from outside: product code reads no test variable.

Two ways in:

* A child process (``python -m fishtune ...``): start it with ``env=child_env("stall_checkpoint=4")``.
  That puts this folder first on its ``PYTHONPATH`` and sets ``FISHTUNE_TEST_FAULTS``; the
  ``sitecustomize.py`` beside this file installs the faults when the interpreter starts. Children
  of that process inherit both, so training subprocesses get the faults too.
* In-process: ``install("raise_after_checkpoint=10", patch=monkeypatch.setattr)`` (undone with
  the monkeypatch at the end of the test).

A spec is ``name=argument[,name=argument...]``. The faults:

* ``stall_checkpoint=STEP``: the write of ``step_<STEP>.ckpt`` writes half its bytes into the temp
  file, flushes them and sleeps :data:`STALL_SECONDS`, so a test can SIGKILL it mid-write.
* ``raise_after_checkpoint=STEP``: training raises ``RuntimeError`` at the first optimizer step
  past STEP once a checkpoint exists, once per run folder (a ``.fault-injected`` marker there
  remembers it), so a rerun resumes and finishes.
* ``stall_extract=FOLDER``: extraction stalls (:data:`STALL_SECONDS`) before writing the codes of
  a clip ``<stem>`` armed by a file ``FOLDER/<stem>.stall``; it first renames that file to
  ``<stem>.stalled`` holding its pid, so a test knows whom to kill and the rerun does not stall.
  Without an armed clip it does nothing (workers can carry it for a whole test module).
* ``sigkill_after_step=STEP``: the process SIGKILLs itself when its first training batch after
  optimizer step STEP starts (one rank of a distributed run dying without a word).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

FAULTS_ENV = "FISHTUNE_TEST_FAULTS"
HERE = Path(__file__).resolve().parent
STALL_SECONDS = 300
FAULT_MARKER = ".fault-injected"

Patch = Callable[[object, str, object], None]


def child_env(spec: str) -> dict[str, str]:
    """Environment entries for a subprocess that should run with the faults of ``spec``."""
    path = [str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(path), FAULTS_ENV: spec}


def install(spec: str, patch: Patch = setattr) -> None:
    """Install every fault named in ``spec``; an unknown name is an error, never ignored."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, argument = item.partition("=")
        if name not in FAULTS:
            raise ValueError(f"{FAULTS_ENV}: unknown fault {name!r}; known: {sorted(FAULTS)}")
        FAULTS[name](argument, patch)


class _HalfThenStall:
    """A file handle whose first write stops half-way (flushed, so the bytes are on disk)."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data) -> int:
        half = len(data) // 2
        self._handle.write(data[:half])
        self._handle.flush()
        time.sleep(STALL_SECONDS)  # the test kills the process here
        return half + self._handle.write(data[half:])

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def stall_checkpoint(step: str, patch: Patch) -> None:
    from fish_speech_core.finetune import checkpoints

    real = checkpoints.atomic_write
    target = checkpoints.checkpoint_name(int(step))

    @contextlib.contextmanager
    def stalling(path, *args, **kwargs):
        with real(path, *args, **kwargs) as handle:
            yield _HalfThenStall(handle) if Path(path).name == target else handle

    # AtomicCheckpointIO.save_checkpoint looks atomic_write up in its module at call time.
    patch(checkpoints, "atomic_write", stalling)


def raise_after_checkpoint(step: str, patch: Patch) -> None:
    from fish_speech_core.finetune import checkpoints, train

    after = int(step)
    real = train.StepProgress.on_train_batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        real(self, trainer, pl_module, outputs, batch, batch_idx)
        run_dir = Path(trainer.default_root_dir)
        step_now = trainer.global_step
        if step_now > after and not (run_dir / FAULT_MARKER).exists() and checkpoints.list_checkpoints(run_dir / "checkpoints"):
            (run_dir / FAULT_MARKER).write_text(str(step_now))
            raise RuntimeError(f"injected training fault at step {step_now} ({FAULTS_ENV})")

    patch(train.StepProgress, "on_train_batch_end", on_train_batch_end)


def _when_imported(name: str, then: Callable[[object], None]) -> None:
    """``then(module)`` once module ``name`` is imported (now, if it is): a process that never
    extracts (a worker, a server) never pays for importing torch."""
    import importlib.abc
    import importlib.util
    import sys

    if name in sys.modules:
        then(sys.modules[name])
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            load = spec.loader.exec_module

            def exec_module(module) -> None:
                load(module)
                then(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


def stall_extract(folder: str, patch: Patch) -> None:
    _when_imported("fish_speech_core.codec.extract", lambda module: _stall_extract(Path(folder), module, patch))


def _stall_extract(armed: Path, extract, patch: Patch) -> None:
    real = extract.write_codes

    def write_codes(job, *args, **kwargs):
        trigger = armed / f"{job.audio_path.stem}.stall"
        try:
            trigger.rename(armed / f"{job.audio_path.stem}.stalled")  # one process wins, once
        except FileNotFoundError:
            return real(job, *args, **kwargs)
        (armed / f"{job.audio_path.stem}.stalled").write_text(str(os.getpid()))
        time.sleep(STALL_SECONDS)  # the test kills this process here
        return real(job, *args, **kwargs)

    # run_extraction looks write_codes up in its module at call time.
    patch(extract, "write_codes", write_codes)


def sigkill_after_step(step: str, patch: Patch) -> None:
    import signal

    from fish_speech_core.finetune import train

    after = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == after:
            os.kill(os.getpid(), signal.SIGKILL)

    patch(train.StepProgress, "on_train_batch_start", on_train_batch_start)


FAULTS: dict[str, Callable[[str, Patch], None]] = {
    "stall_extract": stall_extract,
    "sigkill_after_step": sigkill_after_step,
    "stall_checkpoint": stall_checkpoint,
    "raise_after_checkpoint": raise_after_checkpoint,
}
