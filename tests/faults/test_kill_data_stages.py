"""SIGKILL during `fishtune normalize`, `fishtune extract` and `fishtune pack`, then rerun: nothing half-written is
ever trusted, and the rerun's outputs are byte-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fish_speech_core.codec.extract import sidecar_path_for
from fish_speech_core.files import is_temporary, sha256_file
from fish_speech_core.formats.protos import find_proto_files
from fish_speech_core.normalize import STATE_DIR
from fish_speech_core.pack import pack
from tests.audio_factory import tree_digest
from tests.faults.helpers import AUDIO, DEMO, finish, fishtune, kill_when, temporaries
from tests.finetune.helpers_train import make_speakers


def demo_copies(root: Path, copies: int) -> Path:
    """``copies`` of the demo speakers, as flat speaker folders ``<speaker>-set<N>`` (no nesting)."""
    for copy in range(copies):
        for speaker in sorted(p for p in DEMO.iterdir() if p.is_dir()):
            shutil.copytree(speaker, root / f"{speaker.name}-set{copy}")
    return root


def outputs(root: Path) -> dict[str, bytes]:
    """Every published file under ``root`` except normalize's bookkeeping."""
    return {k: v for k, v in tree_digest(root).items() if not k.startswith(STATE_DIR)}


def finished(records: Path) -> list[Path]:
    """Completion records (a killed write of one leaves a temp file: that is no record)."""
    return [p for p in records.rglob("*.json") if not is_temporary(p)]


@pytest.mark.slow
def test_sigkill_during_normalize_then_rerun_is_byte_identical(tmp_path, demo_normalized):
    src = demo_copies(tmp_path / "in", 2)
    total = sum(1 for p in src.rglob("*") if p.suffix in AUDIO)
    # The uninterrupted run (normalize's output depends only on each file's bytes).
    reference = {
        f"{speaker}-{copy}/{name}": data
        for rel, data in outputs(demo_normalized).items() for copy in ("set0", "set1")
        for speaker, name in [rel.split("/", 1)]
    }

    out = tmp_path / "out"
    records = out / STATE_DIR / "normalize"
    proc = fishtune("normalize", src, out, "--num-workers", "1")
    kill_when(proc, lambda: len(finished(records)) >= 3)

    # Only files whose completion record matches their bytes count as done; everything else
    # under a final name (killed between the audio and its record) is redone by the rerun.
    done = {p.relative_to(records).with_suffix("").as_posix(): json.loads(p.read_text())
            for p in finished(records)}
    assert 3 <= len(done) < total, "the kill must land mid-run"
    for rel, record in done.items():
        assert record["output_sha256"] == sha256_file(out / rel)
        assert (out / rel).read_bytes() == reference[rel]
    # A file torn after the fact (its record still there) is not trusted either.
    torn = sorted(done)[0]
    (out / torn).write_bytes((out / torn).read_bytes()[:1000])

    rerun = fishtune("normalize", src, out, "--num-workers", "1")
    status, log = finish(rerun)
    assert status == 0, log
    report = json.loads((out / STATE_DIR / "normalize-report.json").read_text())
    assert report["skipped"] == len(done) - 1 and report["written"] == total - len(done) + 1
    assert not temporaries(out)
    assert outputs(out) == reference  # byte-identical, audio and transcripts


def codes_of(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.npy")) if not is_temporary(p)}


@pytest.mark.slow
def test_sigkill_during_extract_mid_batch_then_rerun_is_identical(tmp_path, tiny_codec, demo_codes):
    data = shutil.copytree(DEMO, tmp_path / "data")
    total = sum(1 for p in data.rglob("*") if p.suffix in AUDIO)
    expected = codes_of(demo_codes)  # an uninterrupted extraction of the same files
    assert len(expected) == total

    args = ("extract", data, "--checkpoint-path", tiny_codec, "--batch-size", "4", "--num-workers", "0")
    proc = fishtune(*args)
    kill_when(proc, lambda: len(codes_of(data)) >= 1)  # the first file of a batch of 4 is out
    written = codes_of(data)
    assert 1 <= len(written) < total, "the kill must land mid-run"
    for rel, path in written.items():  # whatever is under a final name is whole
        assert path.read_bytes() == expected[rel].read_bytes()

    done_before = sum(sidecar_path_for(p).is_file() for p in written.values())
    status, log = finish(fishtune(*args))
    assert status == 0, log
    assert f"skipped {done_before} up to date" in log
    assert not temporaries(data)
    got = codes_of(data)
    assert sorted(got) == sorted(expected)
    for rel, path in expected.items():
        a, b = np.load(got[rel]), np.load(path)
        assert a.dtype == b.dtype == np.int32 and np.array_equal(a, b), rel
        assert got[rel].read_bytes() == path.read_bytes(), rel
        assert json.loads(sidecar_path_for(got[rel]).read_text()) == json.loads(sidecar_path_for(path).read_text())


@pytest.mark.slow
def test_sigkill_during_pack_then_rerun_is_byte_identical(tmp_path):
    data = make_speakers(tmp_path / "data", speakers=4, sentences=500)
    expected = tmp_path / "uninterrupted"
    pack([data], expected, shard_size_mb=0.01)

    out = tmp_path / "out"
    args = ("pack", "-i", data, "-o", out, "-j", "1", "--shard-size", "0.01")
    kill_when(fishtune(*args), lambda: out.is_dir() and any(p.stat().st_size > 0 for p in temporaries(out)))
    # Shards are published only when the pack completes: a killed pack leaves no shard that
    # training could read, only hidden temp files.
    with pytest.raises(FileNotFoundError, match="no \\*.proto or \\*.protos shards"):
        find_proto_files(out)

    status, log = finish(fishtune(*args))
    assert status == 0, log
    assert not temporaries(out)
    assert tree_digest(out) == tree_digest(expected)  # packed bytes identical
