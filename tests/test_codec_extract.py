"""The extraction engine: exact codes on disk, incremental by content, robust, batch-order free."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from fish_speech_core.codec import FireflyCodec, load_codec
from fish_speech_core.codec.extract import (
    ExtractSettings,
    Job,
    encode_batches,
    extract,
    extract_codes,
    make_batches,
    plan_extraction,
    run_extraction,
    sidecar_path_for,
)

NAMES = {"a": "a.wav", "b": "b.flac", "c": "c.wav"}
FAST = ExtractSettings(num_workers=0)


@pytest.fixture(scope="module")
def firefly(reference: Path) -> Path:
    return reference / "firefly"


@pytest.fixture(scope="module")
def model(firefly: Path) -> FireflyCodec:
    return load_codec(firefly / "small-model.pth", firefly / "small-config.json")


@pytest.fixture()
def data(tmp_path: Path, firefly: Path) -> Path:
    """A dataset folder holding copies of a.wav, b.flac and spk/c.wav."""
    root = tmp_path / "data"
    (root / "spk").mkdir(parents=True)
    shutil.copy(firefly / "a.wav", root / "a.wav")
    shutil.copy(firefly / "b.flac", root / "b.flac")
    shutil.copy(firefly / "c.wav", root / "spk" / "c.wav")
    return root


def audio_paths(root: Path) -> dict[str, Path]:
    return {"a": root / "a.wav", "b": root / "b.flac", "c": root / "spk" / "c.wav"}


def npy_bytes(root: Path) -> dict[str, bytes]:
    return {k: p.with_suffix(".npy").read_bytes() for k, p in audio_paths(root).items()}


def statuses(summary) -> dict[str, str]:
    return {r.audio_path.stem: r.status for r in summary.results}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_extract_writes_the_reference_npy_files(model, data, firefly, num_workers):
    summary = extract(model, list(audio_paths(data).values()), ExtractSettings(num_workers=num_workers))
    assert statuses(summary) == {"a": "extracted", "b": "extracted", "c": "extracted"}
    for key, path in audio_paths(data).items():
        # byte for byte what the reference writes for a file on its own (npy v1.0, <i4, C order)
        assert path.with_suffix(".npy").read_bytes() == (firefly / "expected-codes-alone" / f"{key}.npy").read_bytes()
    assert sorted(p.name for p in data.rglob("*") if p.is_file()) == sorted(
        ["a.wav", "a.npy", "a.npy.json", "b.flac", "b.npy", "b.npy.json", "c.wav", "c.npy", "c.npy.json"]
    )
    assert summary.extracted_seconds == pytest.approx(3.0 + 2.0 + 1.5)


def test_in_memory_api_returns_codes_without_writing(model, data, firefly):
    paths = audio_paths(data)
    codes = extract_codes(model, list(paths.values()), ExtractSettings(num_workers=0, batch_size=2))
    assert list(codes) == list(paths.values())
    for key, path in paths.items():
        np.testing.assert_array_equal(codes[path], np.load(firefly / "expected-codes-alone" / f"{key}.npy"))
        assert codes[path].dtype == np.int32
    assert not list(data.rglob("*.npy"))


def test_rerun_skips_unchanged_and_redoes_changed_audio(model, data):
    paths = list(audio_paths(data).values())
    extract(model, paths, FAST)
    first = npy_bytes(data)
    stamps = {p: p.with_suffix(".npy").stat().st_mtime_ns for p in paths}

    again = extract(model, paths, FAST)
    assert statuses(again) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert {p: p.with_suffix(".npy").stat().st_mtime_ns for p in paths} == stamps

    # New content under the same name (c reversed): only c is redone.
    c = audio_paths(data)["c"]
    audio, rate = soundfile.read(c, dtype="int16")
    soundfile.write(c, audio[::-1].copy(), rate, subtype="PCM_16")
    third = extract(model, paths, FAST)
    assert statuses(third) == {"a": "skipped", "b": "skipped", "c": "extracted"}
    assert npy_bytes(data)["a"] == first["a"] and npy_bytes(data)["c"] != first["c"]
    record = json.loads(sidecar_path_for(c.with_suffix(".npy")).read_text())
    assert record["shape"] == [8, 32]


def test_changed_codec_or_dtype_redoes_everything(model, data, firefly):
    paths = list(audio_paths(data).values())
    extract(model, paths, FAST)
    other = load_codec(firefly / "small-model.pth", firefly / "small-config.json")
    with torch.no_grad():
        other.backbone.norm.bias.add_(0.01)
    assert set(statuses(extract(other, paths, FAST)).values()) == {"extracted"}
    assert set(statuses(extract(other, paths, FAST)).values()) == {"skipped"}
    bf16 = ExtractSettings(num_workers=0, dtype="bf16")
    assert set(statuses(extract(other, paths, bf16)).values()) == {"extracted"}
    overwrite = ExtractSettings(num_workers=0, dtype="bf16", overwrite=True)
    assert set(statuses(extract(other, paths, overwrite)).values()) == {"extracted"}


def test_damaged_or_orphan_npy_is_never_taken_as_done(model, data, firefly):
    paths = audio_paths(data)
    extract(model, list(paths.values()), FAST)
    # a: npy truncated after the sidecar was written; b: a leftover npy without its sidecar.
    a_npy = paths["a"].with_suffix(".npy")
    a_npy.write_bytes(a_npy.read_bytes()[:100])
    sidecar_path_for(paths["b"].with_suffix(".npy")).unlink()
    summary = extract(model, list(paths.values()), FAST)
    assert statuses(summary) == {"a": "extracted", "b": "extracted", "c": "skipped"}
    for key, path in paths.items():
        assert path.with_suffix(".npy").read_bytes() == (firefly / "expected-codes-alone" / f"{key}.npy").read_bytes()


def test_kill_mid_run_loses_only_the_batch_in_flight(model, data, firefly):
    paths = list(audio_paths(data).values())
    settings = ExtractSettings(num_workers=0, batch_size=1)
    plan = plan_extraction(paths, model, settings)

    def die_after_first(result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extraction(model, plan, settings, on_result=die_after_first)
    done = [p for p in paths if sidecar_path_for(p.with_suffix(".npy")).exists()]
    assert len(done) == 1  # the first file finished; nothing else written
    assert not [p for p in data.rglob(".*") if p.is_file()], "temporary files left behind"
    rerun = extract(model, paths, settings)
    assert sorted(statuses(rerun).values()) == ["extracted", "extracted", "skipped"]
    for key, path in audio_paths(data).items():
        assert path.with_suffix(".npy").read_bytes() == (firefly / "expected-codes-alone" / f"{key}.npy").read_bytes()


def test_corrupt_files_are_reported_and_others_extracted(model, data, firefly):
    garbage = data / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    truncated = data / "truncated.flac"  # header reads, decoding fails
    truncated.write_bytes((firefly / "b.flac").read_bytes()[:45000])
    paths = [*audio_paths(data).values(), garbage, truncated]
    for workers in (0, 1):
        summary = extract(model, paths, ExtractSettings(num_workers=workers, overwrite=True))
        by_name = {r.audio_path.name: r for r in summary.results}
        assert by_name["garbage.wav"].status == "rejected"
        assert "unreadable audio" in by_name["garbage.wav"].reason
        assert by_name["truncated.flac"].status == "failed"
        assert "lost sync" in by_name["truncated.flac"].reason
        assert [by_name[n].status for n in ("a.wav", "b.flac", "c.wav")] == ["extracted"] * 3
    assert not garbage.with_suffix(".npy").exists() and not truncated.with_suffix(".npy").exists()


def test_files_over_max_seconds_are_rejected_with_reason(model, data):
    summary = extract(model, list(audio_paths(data).values()), ExtractSettings(num_workers=0, max_seconds=2.5))
    by_stem = {r.audio_path.stem: r for r in summary.results}
    assert by_stem["a"].status == "rejected"
    assert "3.0 s is longer than --max-seconds 2.5" in by_stem["a"].reason
    assert by_stem["b"].status == by_stem["c"].status == "extracted"
    assert not (data / "a.npy").exists()


def test_too_short_and_clashing_files_are_rejected(model, data):
    short = data / "short.wav"
    soundfile.write(short, np.zeros(1000, dtype=np.float32), 44100)
    twin = data / "a.flac"  # would write the same a.npy as a.wav
    shutil.copy(data / "b.flac", twin)
    paths = [data / "a.wav", twin, short]
    by_name = {r.audio_path.name: r for r in extract(model, paths, FAST).results}
    assert by_name["short.wav"].status == "rejected" and "shorter than one code frame" in by_name["short.wav"].reason
    assert by_name["a.flac"].status == "rejected" and "a.wav already writes a.npy" in by_name["a.flac"].reason
    assert by_name["a.wav"].status == "extracted"


def test_bucketed_and_file_order_batching_give_identical_codes(model, tmp_path, firefly):
    """Mixed lengths (cuts of a, b and c) in many batch compositions: codes never change."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        source = firefly / list(NAMES.values())[i % 3]
        audio, rate = soundfile.read(source, dtype="int16")
        start = int(rng.integers(0, len(audio) // 3))
        length = int(rng.integers(len(audio) // 3, len(audio) - start + 1))
        path = tmp_path / f"clip{i:02d}{source.suffix}"
        soundfile.write(path, audio[start : start + length], rate, subtype="PCM_16")
        paths.append(path)
    baseline = extract_codes(model, paths, ExtractSettings(num_workers=0, batch_size=1))
    for batch_size in (4, 12):
        for bucket in (True, False):
            codes = extract_codes(model, paths, ExtractSettings(num_workers=0, batch_size=batch_size, bucket=bucket))
            for path in paths:
                assert np.array_equal(codes[path], baseline[path]), (batch_size, bucket, path.name)


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fishtune-decode")]


def test_decode_thread_loads_ahead_and_ends_with_its_consumer():
    """The GPU path's decode thread (no GPU here: its loader alone, with a stand-in load)."""
    from fish_speech_core.codec.extract import _prefetched

    loaded, ahead = [], threading.Event()

    def load(index: int) -> int:
        loaded.append(index)
        if index == 2:
            ahead.set()
        return index

    batches = _prefetched([[0], [1], [2], [3], [4]], load, depth=2)
    assert next(batches) == [0]
    assert ahead.wait(10)  # batches 1 and 2 load while 0 is consumed
    assert len(_decode_threads()) == 1
    batches.close()  # e.g. the run stops on an error: the thread is joined, nothing keeps running
    assert _decode_threads() == [] and 4 not in loaded


def test_cpu_extraction_decodes_in_line(model, data):
    plan = plan_extraction(list(audio_paths(data).values()), model, FAST)
    results = encode_batches(model, plan.todo, ExtractSettings(num_workers=0, batch_size=1))
    job, codes, digest, error = next(results)
    assert codes is not None and codes.dtype == np.int32 and error == "" and len(digest) == 64
    assert _decode_threads() == []  # on CPU a thread beside the encoder only slows it
    results.close()


def test_make_batches_buckets_by_length():
    jobs = [Job(Path(f"{n}.wav"), Path(f"{n}.npy"), n / 44100, n) for n in (5, 50, 7, 40, 6, 60)]
    assert make_batches(jobs, 2, bucket=True) == [[5, 1], [3, 2], [4, 0]]
    assert make_batches(jobs, 4, bucket=False) == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="batch_size"):
        ExtractSettings(batch_size=0)


def test_make_batches_caps_padded_samples():
    jobs = [Job(Path(f"{n}.wav"), Path(f"{n}.npy"), n / 44100, n) for n in (5, 50, 7, 40, 6, 60)]
    # sorted 60, 50, 40, 7, 6, 5: padded size of a batch = longest * count <= 100
    assert make_batches(jobs, 4, bucket=True, max_batch_samples=100) == [[5], [1, 3], [2, 4, 0]]
    assert make_batches(jobs, 4, bucket=False, max_batch_samples=100) == [[0, 1], [2, 3], [4], [5]]
