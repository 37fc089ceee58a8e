"""A full disk while writing a training checkpoint, extracted codes or normalized audio: a clear
error naming the file and the bytes it needs, earlier outputs intact, nothing partial under a
final name, and a rerun with space completes exactly like an uninterrupted run.

The disk really fills (a small tmpfs, or RLIMIT_FSIZE where mounting is not allowed; see
:class:`tests.faults.helpers.SmallDisk`); nothing is mocked.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fish_speech_core.codec.extract import sidecar_path_for
from fish_speech_core.files import is_temporary, sha256_file
from fish_speech_core.finetune.checkpoints import list_checkpoints, read_checkpoint
from fish_speech_core.finetune.module import TrainConfig
from fish_speech_core.finetune.train import train
from fish_speech_core.normalize import STATE_DIR
from tests.audio_factory import tree_digest
from tests.faults.helpers import DEMO, SmallDisk, finish, fishtune, temporaries
from tests.finetune.helpers_train import FAST, make_base_and_data

ALICE = DEMO / "alice"  # 10 clips
NEEDS = re.compile(r"it needs (?:at least )?(?:[\d.]+ [KMG]iB \()?(\d+) bytes")


@pytest.fixture()
def disk(tmp_path):
    small = SmallDisk(tmp_path / "small")
    yield small
    small.close()


def assert_clear_error(status: int, log: str, disk: SmallDisk, path_pattern: str) -> int:
    """Exit 1, one line naming the file and the space it needs, no traceback; returns the bytes."""
    assert status == 1, log
    assert "Traceback" not in log, log
    reason = "no space left on the device" if disk.mode == "tmpfs" else "the file size limit (ulimit -f) was reached"
    line = next((l for l in log.splitlines() if "cannot write" in l), "")
    assert reason in line and re.search(f"cannot write {re.escape(str(disk.root))}/{path_pattern}:", line), log
    match = NEEDS.search(line)
    assert match, line
    return int(match.group(1))


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint(tmp_path, disk):
    base, protos = make_base_and_data(tmp_path)
    results = disk.root / "results"
    config = TrainConfig(project="full", base=str(base), data=(str(protos),), max_steps=2, val_check_interval=2,
                         batch_size=2, max_length=128, val_fraction=0.2, lr=1e-3, results_dir=str(results))
    train(config, show_progress=False)
    ckpts = results / "full" / "checkpoints"
    first = ckpts / "step_000000002.ckpt"
    digest, size = sha256_file(first), first.stat().st_size

    # Room for logs and history, not for a ~1.6 MB checkpoint.
    with disk.limit(256 * 1024) as preexec:
        proc = fishtune("train", "--project", "full", "--base", base, "--data", protos, "--max-steps", 4,
                        "--val-check-interval", 2, "--results-dir", results, *FAST, preexec_fn=preexec)
        status, log = finish(proc)
    needed = assert_clear_error(status, log, disk, r"results/full/checkpoints/step_000000004\.ckpt")
    assert abs(needed - size) < 0.01 * size  # the size of a checkpoint like the first one
    assert "--resume auto" in log and "earlier checkpoints are intact" in log
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]
    assert sha256_file(first) == digest and read_checkpoint(first)["global_step"] == 2
    assert not temporaries(results)

    # With space again, the same command resumes from step 2 and finishes.
    result = train(TrainConfig(**{**config.__dict__, "max_steps": 4}), show_progress=False)
    assert result.resumed_from == first and result.final_step == 4
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 4]
    assert [row["step"] for row in json.loads((results / "full" / "history.json").read_text())] == [0, 2, 4]


def published(root: Path, suffix: str) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob(f"*{suffix}")) if not is_temporary(p)}


@pytest.mark.slow
def test_disk_full_while_writing_extracted_codes(disk, tiny_codec, demo_codes):
    expected = published(demo_codes / "alice", ".npy")  # an uninterrupted extraction
    assert len(expected) == 10

    data = shutil.copytree(ALICE, disk.root / "data")
    args = ("extract", data, "--checkpoint-path", tiny_codec, "--num-workers", "0", "--batch-size", "4")
    # tmpfs: a few 4 KiB pages (some files fit, then the disk is full); fsize: 1 KiB per file,
    # less than any clip's codes.
    with disk.limit(6 * 4096 if disk.mode == "tmpfs" else 1024) as preexec:
        status, log = finish(fishtune(*args, preexec_fn=preexec))
    needed = assert_clear_error(status, log, disk, r"data/alice_\d{3}\.npy(\.json)?")
    assert needed > 0
    written = published(data, ".npy")
    assert len(written) < len(expected)
    for rel, path in written.items():  # nothing partial under a final name
        assert path.read_bytes() == expected[rel].read_bytes(), rel
    assert not temporaries(data)

    status, log = finish(fishtune(*args))
    assert status == 0, log
    done = sum(sidecar_path_for(p).is_file() for p in written.values())
    assert f"Extracted {len(expected) - done} files" in log
    got = published(data, ".npy")
    assert sorted(got) == sorted(expected)
    for rel, path in expected.items():
        assert np.array_equal(np.load(got[rel]), np.load(path)) and got[rel].read_bytes() == path.read_bytes(), rel


@pytest.mark.slow
def test_disk_full_while_writing_normalized_audio(tmp_path, disk, demo_normalized):
    src = shutil.copytree(ALICE, tmp_path / "in" / "alice")
    want = {k: v for k, v in tree_digest(demo_normalized).items() if k.startswith("alice/")}

    out = disk.root / "out"
    args = ("normalize", src.parent, out, "--num-workers", "2")  # the error crosses the process pool
    # tmpfs: room for a few clips, then full; fsize: every clip is > 4 KiB, transcripts and
    # records are far smaller.
    with disk.limit(200 * 1024 if disk.mode == "tmpfs" else 4096) as preexec:
        status, log = finish(fishtune(*args, preexec_fn=preexec))
    # Whichever file met the full disk: a clip (exactly its size needed), its transcript or its record.
    needed = assert_clear_error(status, log, disk, r"out/(\.fishtune/normalize/)?alice/alice_\d{3}\.(wav|flac|mp3|lab)(\.json)?")
    failed = Path(re.search(r"cannot write (\S+):", log).group(1)).relative_to(out).as_posix()
    if failed in want:
        assert needed == len(want[failed])
    got = {k: v for k, v in tree_digest(out).items() if not k.startswith(STATE_DIR)}
    assert all(got[k] == want[k] for k in got)  # what exists is whole
    assert not temporaries(out)

    status, log = finish(fishtune(*args))
    assert status == 0, log
    assert {k: v for k, v in tree_digest(out).items() if not k.startswith(STATE_DIR)} == want
