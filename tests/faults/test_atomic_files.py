"""The file-level guarantees the stage tests rely on, in-process and fast: a write that runs
out of space leaves the earlier version of the file intact and says what it needs; the temp
files of killed writes are recognised and cleared, and nothing else is."""

from __future__ import annotations

import contextlib
import pickle
import resource
import signal
import tempfile
from pathlib import Path

import pytest

from fish_speech_core.files import DiskFullError, atomic_path, atomic_write, remove_temporaries, temporary_target
from fish_speech_core.finetune.checkpoints import CheckpointWriteError, remove_partial_checkpoints


@contextlib.contextmanager
def file_size_limit(limit: int):
    """A real RLIMIT_FSIZE on this process for the block (writes past ``limit`` get EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_out_of_space_keeps_the_old_file_and_names_what_it_needs(tmp_path, mode):
    target = tmp_path / "report.json"
    target.write_text("old version\n")
    data = "x" * 50_000
    with file_size_limit(10_000), pytest.raises(DiskFullError) as caught:
        with atomic_write(target, mode) as handle:  # streamed: the total is unknown up front
            handle.write(data if mode == "w" else data.encode())
    message = str(caught.value)
    assert message.startswith(f"cannot write {target}: the file size limit (ulimit -f) was reached")
    assert "it needs at least 48.8 KiB (50000 bytes)" in message and f"free in {tmp_path}" in message
    assert "Nothing was written under that name" in message
    assert target.read_text() == "old version\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left


def test_known_size_is_named_exactly_and_writers_with_a_path_are_covered(tmp_path):
    with file_size_limit(1000), pytest.raises(DiskFullError, match=r"it needs 4.9 KiB \(5000 bytes\)"):
        with atomic_write(tmp_path / "a.bin", size=5000) as handle:
            handle.write(b"\0" * 5000)
    with file_size_limit(1000), pytest.raises(DiskFullError, match=r"it needs at least 1000 bytes"):
        with atomic_path(tmp_path / "b.bin") as tmp:  # e.g. torch.save / np.save to a path
            tmp.write_bytes(b"\0" * 5000)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_errors_survive_process_pools():
    for cls in (DiskFullError, CheckpointWriteError):
        err = cls(28, "cannot write /x: no space left on the device", "free some space and rerun", "/x")
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and str(back) == str(err) and back.errno == 28
        assert back.detail == err.detail and back.filename == "/x"


def test_only_temporaries_of_the_given_targets_are_removed(tmp_path):
    def temp_of(name: str) -> Path:
        stem, suffix = Path(name).stem, Path(name).suffix
        return Path(tempfile.mkstemp(dir=tmp_path, prefix=f".{stem}.", suffix=f".tmp{suffix}")[1])

    mine = [temp_of("x.npy"), temp_of("x.npy.json")]
    others = [temp_of("x.y.npy"), temp_of("y.npy"), temp_of("step_000000004.ckpt")]
    hidden = tmp_path / ".x.notmine.tmp.npy"  # not a name atomic_path makes
    hidden.write_text("keep")
    assert [temporary_target(p) for p in mine] == [tmp_path / "x.npy", tmp_path / "x.npy.json"]
    assert temporary_target(tmp_path / "x.npy") is None
    assert sorted(remove_temporaries([tmp_path / "x.npy", tmp_path / "x.npy.json"])) == sorted(mine)
    assert remove_partial_checkpoints(tmp_path) == [others[2]]
    assert sorted(tmp_path.iterdir()) == sorted([*others[:2], hidden])
