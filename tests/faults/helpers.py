"""Fault injection for tests/faults: CLI subprocesses killed at a chosen moment, and folders
that run out of space."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fish_speech_core.files import is_temporary

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo-data"  # 28 clips (wav/flac/mp3) of 3 speakers
AUDIO = (".wav", ".flac", ".mp3")


def fishtune(*args, env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
    """``python -m fishtune ARGS`` in the background (output captured for the failure message)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fishtune", *map(str, args)], cwd=ROOT,
        env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 180) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 10 ms, never a blind sleep).

    Fails the test when the process ends first or ``ready`` never holds: the kill must land
    mid-way for the test to mean anything.
    """
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the process ended (status {proc.returncode}) before the kill point:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the kill point was never reached")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and is_temporary(p))


class SmallDisk:
    """A folder whose writes can be made to run out of space, for real (nothing is mocked).

    As root (this sandbox, and CI when it allows ``mount``): a 64 MiB tmpfs; ``limit(n)``
    fills it with a ballast file until only ``n`` bytes are free, so writes fail with ENOSPC.
    Elsewhere: a plain folder, and ``limit(n)`` gives the subprocess an RLIMIT_FSIZE of ``n``
    bytes (any file growing past ``n`` fails with EFBIG; SIGXFSZ is ignored so write() returns
    the error instead of killing the process). Either way the limited command must run as a
    subprocess through ``preexec_fn`` of the limit.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # FAULTS_DISK_LIMIT=fsize tries the fallback where mounting would work.
        if os.environ.get("FAULTS_DISK_LIMIT") == "fsize":
            self.mode = "fsize"
        else:
            probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)],
                                   capture_output=True)
            self.mode = "tmpfs" if probe.returncode == 0 else "fsize"
        self.ballast = root / "ballast.bin"

    @contextlib.contextmanager
    def limit(self, headroom: int) -> Iterator[Callable[[], None] | None]:
        """Within the block, the subprocess started with the yielded ``preexec_fn`` has
        ``headroom`` bytes to write (tmpfs: free space; fsize: per file)."""
        if self.mode == "fsize":
            def preexec() -> None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (headroom, headroom))
            yield preexec
            return
        free = os.statvfs(self.root)
        with open(self.ballast, "wb") as handle:
            handle.truncate(0)
            handle.write(b"\0" * max(0, free.f_bavail * free.f_frsize - headroom))
        try:
            yield None
        finally:
            self.ballast.unlink()

    def close(self) -> None:
        if self.mode == "tmpfs":
            subprocess.run(["umount", "--lazy", str(self.root)], check=True)  # even if a child lingers
