import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile

from fish_speech_core import dataset as ds
from fish_speech_core.validate import ValidationSettings, read_manifest, validate
from tests.audio_factory import tree_digest, write_clip


@pytest.fixture
def bad_corpus(tmp_path):
    """A dataset with one file for every reject reason, plus good files."""
    root = tmp_path / "data"
    spk = root / "spk"
    write_clip(spk / "good1.wav", 1.5, seed=1)
    write_clip(spk / "good2.flac", 2.0, 22050, seed=2, channels=2)
    write_clip(spk / "no_text.wav", text=None)
    write_clip(spk / "empty_text.wav", text="  \n\t")
    write_clip(spk / "latin1.wav", text=None).with_suffix(".lab").write_bytes(b"caf\xe9 con leche")
    (spk / "orphan.lab").write_text("nobody speaks this")
    (spk / "corrupt.wav").write_bytes(b"RIFF\x00\x00junk" + os.urandom(300))
    (spk / "corrupt.lab").write_text("broken")
    soundfile.write(spk / "zero.wav", np.zeros(0), 16000)
    (spk / "zero.lab").write_text("nothing")
    write_clip(spk / "short.wav", 0.2)
    soundfile.write(spk / "silent.wav", np.zeros(16000), 16000)
    (spk / "silent.lab").write_text("shh")
    nan = np.full(16000, 0.1)
    nan[100] = np.nan
    soundfile.write(spk / "nan.wav", nan, 16000, subtype="FLOAT")
    (spk / "nan.lab").write_text("not a number")
    write_clip(spk / "twice.wav")
    write_clip(spk / "twice.flac")
    write_clip(spk / "long.wav", 4.0, 8000)
    outside = write_clip(tmp_path / "outside" / "secret.wav")
    (spk / "escape.wav").symlink_to(outside)
    (spk / "escape.lab").write_text("escaping")
    write_clip(spk / "bad\nname.wav")
    (root / "notes.txt").write_text("not data: ignored")
    (spk / "good1.npy").write_bytes(b"codes are outputs, not inputs")
    return root


EXPECTED = {
    "spk/good1.wav": ("accepted", ""),
    "spk/good2.flac": ("accepted", ""),
    "spk/no_text.wav": ("rejected", ds.MISSING_TRANSCRIPT),
    "spk/empty_text.wav": ("rejected", ds.EMPTY_TRANSCRIPT),
    "spk/latin1.wav": ("rejected", ds.TRANSCRIPT_NOT_UTF8),
    "spk/orphan.lab": ("rejected", ds.ORPHAN_TRANSCRIPT),
    "spk/corrupt.wav": ("rejected", ds.UNREADABLE_AUDIO),
    "spk/zero.wav": ("rejected", ds.ZERO_LENGTH),
    "spk/short.wav": ("rejected", ds.TOO_SHORT),
    "spk/silent.wav": ("rejected", ds.SILENT),
    "spk/nan.wav": ("rejected", ds.NON_FINITE),
    "spk/twice.wav": ("rejected", ds.AMBIGUOUS),
    "spk/twice.flac": ("rejected", ds.AMBIGUOUS),
    "spk/long.wav": ("rejected", ds.TOO_LONG),
    "spk/escape.wav": ("rejected", ds.PATH_ESCAPES),
    "spk/bad\\nname.wav": ("rejected", ds.BAD_NAME),
    "spk/bad\\nname.lab": ("rejected", ds.BAD_NAME),
}


def test_every_reject_reason_is_named(bad_corpus):
    before = tree_digest(bad_corpus)
    report = validate(bad_corpus, settings=ValidationSettings(max_seconds=3.0), show_progress=False)
    got = {r.path: (r.status, r.reason) for r in report.records}
    assert got == EXPECTED
    assert tree_digest(bad_corpus) == before  # validation never touches the data

    good = {r.path: r for r in report.accepted}
    g2 = good["spk/good2.flac"]
    assert (g2.sample_rate, g2.channels, g2.speaker, g2.transcript) == (22050, 2, "spk", "hello there")
    assert g2.duration == pytest.approx(2.0)
    assert g2.sha256 == __import__("hashlib").sha256((bad_corpus / "spk/good2.flac").read_bytes()).hexdigest()
    assert -40 < g2.loudness < -10
    summary = report.summary()
    assert summary["rejects_by_reason"][ds.AMBIGUOUS] == 2
    assert summary["accepted"] == 2 and summary["rejected"] == 15
    assert any("spk" in note and "30 min" in note for note in summary["advice"])


def test_manifest_is_parquet_with_every_row(bad_corpus, tmp_path):
    report = validate(bad_corpus, settings=ValidationSettings(max_seconds=3.0), show_progress=False)
    path = report.write_parquet(tmp_path / "manifest.parquet")
    table = pq.read_table(path)
    assert set(table.column_names) >= {"path", "speaker", "duration", "sample_rate", "channels", "sha256",
                                       "transcript", "status", "reason"}
    assert table.num_rows == len(EXPECTED)
    rows = {r.path: r for r in read_manifest(path)}
    assert rows["spk/long.wav"].reason == ds.TOO_LONG and rows["spk/long.wav"].duration == pytest.approx(4.0)


def test_parallel_validation_gives_the_same_report(bad_corpus):
    one = validate(bad_corpus, settings=ValidationSettings(max_seconds=3.0), show_progress=False)
    two = validate(bad_corpus, settings=ValidationSettings(max_seconds=3.0), num_workers=2, show_progress=False)
    assert one.records == two.records


def test_extensions_match_case_insensitively(tmp_path):
    write_clip(tmp_path / "spk" / "UPPER.WAV", text=None)
    (tmp_path / "spk" / "UPPER.LAB").write_text("shouting")
    report = validate(tmp_path, show_progress=False)
    assert [(r.path, r.status) for r in report.records] == [("spk/UPPER.WAV", "accepted")]


def test_filelist_layout_and_its_rejects(tmp_path):
    root = tmp_path / "data"
    write_clip(root / "wavs" / "a.wav", text=None)
    write_clip(root / "wavs" / "b.wav", text=None, seed=3)
    outside = write_clip(tmp_path / "elsewhere.wav", text=None)
    filelist = tmp_path / "list.txt"
    filelist.write_text(
        "wavs/a.wav|anna|en|Hello | with a pipe\n"
        f"{root / 'wavs' / 'b.wav'}|ben|es|Hola\n"
        "../elsewhere.wav|eve|en|sneaky\n"
        f"{outside}|eve|en|absolute outside\n"
        "wavs/missing.wav|anna|en|gone\n"
        "just one field\n"
        "wavs/a.wav|anna|en|listed again\n",
        encoding="utf-8",
    )
    report = validate(root, filelist=filelist, show_progress=False)
    got = {(r.path, r.status, r.reason) for r in report.records}
    assert ("wavs/a.wav", "accepted", "") in got
    assert ("wavs/b.wav", "accepted", "") in got
    assert ("../elsewhere.wav", "rejected", ds.PATH_ESCAPES) in got
    assert (str(outside), "rejected", ds.PATH_ESCAPES) in got
    assert ("wavs/missing.wav", "rejected", ds.MISSING_AUDIO) in got
    assert ("list.txt:6", "rejected", ds.MALFORMED_FILELIST_LINE) in got
    assert ("wavs/a.wav", "rejected", ds.AMBIGUOUS) in got
    accepted = {r.path: r for r in report.accepted}
    assert accepted["wavs/a.wav"].transcript == "Hello | with a pipe"
    assert accepted["wavs/a.wav"].speaker == "anna" and accepted["wavs/b.wav"].language == "es"


def test_demo_dataset_is_fully_accepted():
    root = Path(__file__).parents[1] / "examples" / "demo-data"
    report = validate(root, show_progress=False)
    assert not report.rejected
    speakers = report.speaker_hours()
    assert set(speakers) == {"alice", "bruno", "carmen"}
    rates = {r.sample_rate for r in report.accepted}
    assert rates == {16000, 22050, 44100}
    assert any(r.channels == 2 for r in report.accepted)
    assert {Path(r.path).suffix for r in report.accepted} == {".wav", ".flac", ".mp3"}
    assert all(1.0 <= r.duration <= 6.0 for r in report.accepted)
