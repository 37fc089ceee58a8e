"""Hostile data files: one bad file never stops validate/normalize, and bad data is never accepted.

See docs/hardening.md ("Hostile inputs, round two: data files") for the rules these tests pin down.
"""

from __future__ import annotations

import json
import os
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from typer.testing import CliRunner

from fish_speech_core import dataset as ds
from fish_speech_core.files import NAME_MAX, UnresolvablePathError, atomic_path, resolve_inside
from fish_speech_core.formats.protos import iter_text_data
from fish_speech_core.formats.text import clean_pack_transcript, clean_transcript
from fish_speech_core.normalize import normalize_tree
from fish_speech_core.pack import pack
from fish_speech_core.validate import MIN_SPEECH_BAND_FRACTION, speech_band_fraction, validate
from fishtune.cli import app
from tests.audio_factory import tree_digest, voiced, write_clip

runner = CliRunner()
LONG_STEM = "n" * 241  # + ".wav" = 245 bytes: legal, but ".<stem>.XXXXXXXX.tmp.wav" is not
NON_UTF8 = os.fsdecode(b"caf\xe9")  # what os.listdir gives for a Latin-1 name: a lone surrogate


def _rows(report: Path) -> dict[str, tuple[str, str]]:
    return {r["path"]: (r["status"], r["reason"]) for r in pq.read_table(report).to_pylist()}


@pytest.fixture
def hostile(tmp_path) -> Path:
    """A speaker with good clips and one of each file that used to stop a run."""
    spk = tmp_path / "data" / "spk"
    write_clip(spk / "good.wav")
    write_clip(spk / f"{LONG_STEM}.wav", seed=1)
    write_clip(spk / "six.wav", channels=6, seed=2)
    os.symlink("loop.wav", spk / "loop.wav")
    (spk / "loop.lab").write_text("a loop")
    os.symlink("gone.wav", spk / "dangling.wav")
    (spk / "dangling.lab").write_text("dangling")
    write_clip(spk / "pipe.wav", seed=3, text=None)
    os.mkfifo(spk / "pipe.lab")
    os.mkfifo(spk / "fifo.wav")
    (spk / "fifo.lab").write_text("a fifo")
    for name in ("a.opus", "b.M4A", "c.AIFF"):
        (spk / name).write_bytes(b"\0" * 64)
        (spk / name).with_suffix(".lab").write_text("unsupported")
    (spk / f"{NON_UTF8}.wav").write_bytes((spk / "good.wav").read_bytes())  # soundfile cannot open it
    (spk / f"{NON_UTF8}.lab").write_text("caf\u00e9")
    folder = spk.parent / os.fsdecode(b"sp\xeak")  # a speaker folder whose name is not UTF-8
    folder.mkdir()
    (folder / "a.wav").write_bytes((spk / "good.wav").read_bytes())
    (folder / "a.lab").write_text("hello")
    return tmp_path / "data"


EXPECTED = {
    "spk/good.wav": ("accepted", ""),
    f"spk/{LONG_STEM}.wav": ("accepted", ""),
    "spk/six.wav": ("rejected", ds.TOO_MANY_CHANNELS),
    "spk/loop.wav": ("rejected", ds.BROKEN_SYMLINK),
    "spk/dangling.wav": ("rejected", ds.BROKEN_SYMLINK),
    "spk/pipe.lab": ("rejected", ds.NOT_REGULAR_FILE),
    "spk/pipe.wav": ("rejected", ds.MISSING_TRANSCRIPT),
    "spk/fifo.wav": ("rejected", ds.NOT_REGULAR_FILE),
    "spk/a.opus": ("rejected", ds.UNSUPPORTED_AUDIO),
    "spk/b.M4A": ("rejected", ds.UNSUPPORTED_AUDIO),
    "spk/c.AIFF": ("rejected", ds.UNSUPPORTED_AUDIO),
    "spk/caf\\xe9.wav": ("rejected", ds.BAD_NAME),
    "spk/caf\\xe9.lab": ("rejected", ds.BAD_NAME),
    "sp\\xeak/a.wav": ("rejected", ds.BAD_NAME),
    "sp\\xeak/a.lab": ("rejected", ds.BAD_NAME),
}


@pytest.mark.timeout(120)  # a FIFO opened for reading would block forever
def test_validate_rejects_each_bad_file_and_goes_on(hostile, tmp_path):
    before = tree_digest(hostile)
    report = tmp_path / "manifest.parquet"
    result = runner.invoke(app, ["validate", str(hostile), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert _rows(report) == EXPECTED  # no orphan-transcript for the unsupported formats' .lab files
    assert tree_digest(hostile) == before
    in_two = validate(hostile, num_workers=2, show_progress=False)  # the same in worker processes
    assert {r.path: (r.status, r.reason) for r in in_two.records} == EXPECTED
    strict = runner.invoke(app, ["validate", str(hostile), "--report", str(report), "--strict"])
    assert strict.exit_code == 1


@pytest.mark.timeout(120)
def test_normalize_writes_the_good_files_and_reports_the_rest(hostile, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["normalize", str(hostile), str(out), "--num-workers", "1"])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (out / "spk").iterdir())
    assert written == sorted(["good.wav", "good.lab", f"{LONG_STEM}.wav", f"{LONG_STEM}.lab"])
    assert not [p for p in out.rglob(".*.tmp*")]
    summary = json.loads((out / ".fishtune" / "normalize-report.json").read_text(encoding="utf-8"))
    assert summary["failed"] == []
    rejected = {path: reason for path, (status, reason) in EXPECTED.items() if status == "rejected"}
    assert {r["path"]: r["reason"] for r in summary["rejected"]} == rejected
    again = runner.invoke(app, ["normalize", str(hostile), str(out), "--num-workers", "1"])
    assert "2 up to date" in again.output  # the long name's skip record works too


def test_temporary_names_fit_name_max_whatever_the_target(tmp_path):
    for stem in ("x" * 251, "é" * 125, LONG_STEM):
        target = tmp_path / f"{stem}.wav"
        with atomic_path(target) as tmp:
            assert len(os.fsencode(tmp.name)) <= NAME_MAX
            tmp.write_bytes(b"data")
        assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_symlink_loop_is_unresolvable_not_a_crash(tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(UnresolvablePathError, match="symlink loop"):
        resolve_inside(tmp_path, "a")


def _write(path: Path, audio: np.ndarray, rate: int, text: str = "hello there") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, audio, rate)
    path.with_suffix(".lab").write_text(text)


def test_audio_that_is_not_speech_is_rejected(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    _write(data / "s" / "dc.wav", np.full(24000, 0.5), 16000)
    _write(data / "s" / "dc-noise.wav", 0.5 + 0.002 * rng.standard_normal(24000), 16000)
    _write(data / "s" / "rumble.wav", 0.5 * np.sin(2 * np.pi * 20 * np.arange(32000) / 16000), 16000)
    _write(data / "s" / "ultrasound.wav", 0.5 * np.sin(2 * np.pi * 12000 * np.arange(48000) / 48000), 48000)
    _write(data / "s" / "rate-1.wav", voiced(3, 1000)[:3], 1)
    _write(data / "s" / "rate-100.wav", voiced(10, 1000)[:1000], 100)
    _write(data / "s" / "rate-7999.wav", voiced(1.5, 7999), 7999)
    _write(data / "s" / "rate-8000.wav", voiced(1.5, 8000), 8000)
    _write(data / "s" / "offset-speech.wav", 0.05 + voiced(1.5), 16000)  # a DC offset under real speech
    records = {r.path: (r.status, r.reason) for r in validate(data, show_progress=False).records}
    assert records == {
        "s/dc.wav": ("rejected", ds.NO_SPEECH_BAND),
        "s/dc-noise.wav": ("rejected", ds.NO_SPEECH_BAND),
        "s/rumble.wav": ("rejected", ds.NO_SPEECH_BAND),
        "s/ultrasound.wav": ("rejected", ds.NO_SPEECH_BAND),
        "s/rate-1.wav": ("rejected", ds.SAMPLE_RATE_TOO_LOW),
        "s/rate-100.wav": ("rejected", ds.SAMPLE_RATE_TOO_LOW),
        "s/rate-7999.wav": ("rejected", ds.SAMPLE_RATE_TOO_LOW),
        "s/rate-8000.wav": ("accepted", ""),
        "s/offset-speech.wav": ("accepted", ""),
    }


def test_real_speech_keeps_passing(tmp_path):
    demo = Path(__file__).parents[2] / "examples" / "demo-data"
    report = validate(demo, show_progress=False)
    assert report.rejected == [] and len(report.accepted) > 20
    wav = tmp_path / "spoken.wav"
    for voice in ("en", "es", "de"):
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), "Sixty shy sheep chose cheese, softly."], check=True)
        audio, rate = soundfile.read(wav, always_2d=True)
        assert speech_band_fraction(audio.T, rate) > 10 * MIN_SPEECH_BAND_FRACTION, voice


def test_nested_speaker_folders_are_rejected_never_merged(tmp_path):
    data = tmp_path / "data"
    write_clip(data / "alice" / "s1" / "a.wav")
    write_clip(data / "bob" / "s1" / "a.wav", seed=1)
    (data / "bob" / "s1" / "orphan.lab").write_text("no audio")
    write_clip(data / "carol" / "c.wav", seed=2)
    report = validate(data, show_progress=False)
    rows = {r.path: (r.status, r.reason, r.speaker) for r in report.records}
    assert rows == {
        "alice/s1/a.wav": ("rejected", ds.NESTED_FOLDER, "alice"),
        "bob/s1/a.wav": ("rejected", ds.NESTED_FOLDER, "bob"),
        "bob/s1/orphan.lab": ("rejected", ds.NESTED_FOLDER, "bob"),
        "carol/c.wav": ("accepted", "", "carol"),
    }
    assert list(report.speaker_hours()) == ["carol"]


def test_transcripts_differing_only_in_case_are_ambiguous(tmp_path):
    data = tmp_path / "data"
    write_clip(data / "s" / "w.wav", text="one")
    (data / "s" / "w.LAB").write_text("two")
    write_clip(data / "s" / "x.WAV", seed=1)  # the extension's case alone is fine
    records = {r.path: (r.status, r.reason) for r in validate(data, show_progress=False).records}
    assert records == {"s/w.wav": ("rejected", ds.AMBIGUOUS), "s/x.WAV": ("accepted", "")}


DIRTY = "\ufeffHe\x00llo \x1b[1;31mwor\x07ld\x1b[0m, cafe\u0301\x7f\x85!\n"
CLEAN = "Hello world, caf\u00e9\x85!\n"  # NEL is whitespace: the packer turns it into a space


def test_clean_transcript_rules():
    assert clean_transcript(DIRTY) == CLEAN
    assert clean_transcript(CLEAN) == CLEAN
    assert unicodedata.is_normalized("NFC", clean_transcript("e\u0301"))
    for kept in ("plain text\n", "tab\tand\r\nCRLF", "क्\u200dष", "שלום", "a\u200bb"):
        assert clean_transcript(kept) == kept


def test_reference_transcripts_are_unchanged(reference):
    for lab in sorted((reference / "protos" / "dataset").rglob("*.lab")):
        text = lab.read_bytes().decode("utf-8")
        assert clean_transcript(text) == text, lab.name


def test_validate_normalize_and_pack_see_the_same_cleaned_text(tmp_path):
    data = tmp_path / "data"
    write_clip(data / "s" / "dirty.wav", text=None)
    (data / "s" / "dirty.lab").write_bytes(DIRTY.encode("utf-8"))
    write_clip(data / "s" / "noise.wav", text=None, seed=1)
    (data / "s" / "noise.lab").write_bytes(b"\xef\xbb\xbf\x00\x1b[0m\x07 \x01")
    before = tree_digest(data)
    records = {r.path: r for r in validate(data, show_progress=False).records}
    assert records["s/dirty.wav"].transcript == CLEAN.strip()
    assert (records["s/noise.wav"].status, records["s/noise.wav"].reason) == ("rejected", ds.EMPTY_TRANSCRIPT)
    out = tmp_path / "out"
    normalize_tree(data, out, show_progress=False)
    assert (out / "s" / "dirty.lab").read_bytes() == CLEAN.encode("utf-8")
    assert tree_digest(data) == before
    np.save(out / "s" / "dirty.npy", np.zeros((8, 10), np.int64))
    shards = tmp_path / "shards"
    pack([out], shards)
    texts = [s.texts[0] for td in iter_text_data(shards) for s in td.sentences]
    assert texts == [clean_pack_transcript(CLEAN)]
    # pack of the raw folder (no normalize in between) cleans the same way
    np.save(tmp_path / "raw.npy", np.zeros((8, 10), np.int64))
    raw = tmp_path / "raw" / "s"
    raw.mkdir(parents=True)
    (raw / "dirty.lab").write_bytes(DIRTY.encode("utf-8"))
    (raw / "dirty.npy").write_bytes((tmp_path / "raw.npy").read_bytes())
    (raw / "noise.lab").write_bytes(b"\x00\x1b[0m")
    (raw / "noise.npy").write_bytes((tmp_path / "raw.npy").read_bytes())
    summary = pack([tmp_path / "raw"], tmp_path / "raw-shards")
    assert [s.texts[0] for td in iter_text_data(tmp_path / "raw-shards") for s in td.sentences] == texts
    assert [r.item.rsplit("/", 1)[-1] for r in summary.rejects] == ["noise.lab"]


def test_a_latin1_filelist_rejects_its_bad_lines_by_number(tmp_path):
    data = tmp_path / "data"
    write_clip(data / "s" / "a.wav")
    write_clip(data / "s" / "b.wav", seed=1)
    filelist = tmp_path / "list.txt"
    (data / "s" / "c.opus").write_bytes(b"OggS")
    filelist.write_bytes(b"s/a.wav|s|en|plain ascii\ns/b.wav|s|es|caf\xe9 ol\xe9\ns/c.opus|s|en|opus\n")
    report = tmp_path / "manifest.parquet"
    result = runner.invoke(app, ["validate", str(data), "--filelist", str(filelist), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert _rows(report) == {
        "s/a.wav": ("accepted", ""),
        "list.txt:2": ("rejected", ds.FILELIST_NOT_UTF8),
        "s/c.opus": ("rejected", ds.UNSUPPORTED_AUDIO),
    }
    detail = next(r["detail"] for r in pq.read_table(report).to_pylist() if r["path"] == "list.txt:2")
    assert detail.startswith("byte 0xe9 at column 17")


@pytest.mark.timeout(180)
def test_the_flow_tasks_reject_the_same_files_and_go_on(hostile, tmp_path):
    from fish_speech_core.storage import Store
    from fishtune.tasks.data import normalize_task, validate_task

    store = Store(str(tmp_path / "store"))
    summary = validate_task.fn(str(hostile), store.root)["summary"]
    assert summary["accepted"] == 2
    assert {r["path"]: r["reason"] for r in summary["rejects"]} == {
        path: reason for path, (status, reason) in EXPECTED.items() if status == "rejected"
    }
    normalized = normalize_task.fn(str(hostile), store.root, work_dir=str(tmp_path / "work"))
    assert normalized["summary"]["files"] == 2
    published = set(store.lookup("normalize", normalized["key"]).files)
    assert published == {f"spk/{stem}{ext}" for stem in ("good", LONG_STEM) for ext in (".wav", ".lab")} | {
        "normalize-report.json", "summary.json"
    }


@pytest.mark.timeout(60)
def test_a_filelist_that_is_not_a_file_is_one_line_naming_it(tmp_path):
    data = tmp_path / "data"
    write_clip(data / "s" / "a.wav")
    os.mkfifo(tmp_path / "list.txt")
    result = runner.invoke(app, ["validate", str(data), "--filelist", str(tmp_path / "list.txt")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: cannot read filelist {tmp_path / 'list.txt'}: a FIFO, not a "
                                                  "regular file"]
