import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile

from fish_speech_core import dataset as ds
from fish_speech_core.normalize import NormalizeSettings, STATE_DIR, loudness_normalize, normalize_tree
from fish_speech_core.validate import integrated_loudness
from tests.audio_factory import tree_digest, write_clip

DEMO = Path(__file__).parents[1] / "examples" / "demo-data"


def test_matches_reference_loudness_fixture(reference):
    audio, rate = soundfile.read(reference / "loudness" / "in.wav")  # float64, int16 / 32768
    expected = np.load(reference / "loudness" / "expected.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference emits no warning on this file; neither do we
        out = loudness_normalize(audio, rate, peak=-1.0, loudness=-23.0, block_size=0.4)
    assert out.dtype == np.float64 and out.shape == expected.shape
    assert np.max(np.abs(out - expected)) <= 1e-9
    edge = json.loads((reference / "loudness" / "edge-cases.json").read_text())["in.wav"]
    assert integrated_loudness(out[None], rate) == pytest.approx(edge["output_integrated_lufs"], abs=1e-9)


def test_reference_edge_cases_are_clear_errors_not_nan(reference, tmp_path):
    short, rate = soundfile.read(reference / "loudness" / "short.wav")
    with pytest.raises(ValueError, match="block size"):  # pyloudnorm's own message, as the reference
        loudness_normalize(short, rate)
    silent, rate = soundfile.read(reference / "loudness" / "silent.wav")
    with pytest.raises(ValueError, match="silent"):  # the reference returns all-NaN audio here
        loudness_normalize(silent, rate)
    # Through the tree, both are rejected with a reason and nothing is written for them.
    data = tmp_path / "in" / "spk"
    data.mkdir(parents=True)
    for name in ("short.wav", "silent.wav", "in.wav"):
        shutil.copy(reference / "loudness" / name, data / name)
        (data / name).with_suffix(".lab").write_text("text")
    report = normalize_tree(tmp_path / "in", tmp_path / "out", show_progress=False)
    assert {(r.path, r.reason) for r in report.rejected} == {("spk/short.wav", ds.TOO_SHORT), ("spk/silent.wav", ds.SILENT)}
    assert [r.rel_path for r in report.results] == ["spk/in.wav"]
    assert sorted(p.name for p in (tmp_path / "out" / "spk").iterdir()) == ["in.lab", "in.wav"]
    out, _ = soundfile.read(tmp_path / "out" / "spk" / "in.wav")
    expected = np.load(reference / "loudness" / "expected.npy")
    assert np.max(np.abs(out - expected)) <= 1 / 32768  # only the 16-bit quantization of the written file


def test_tree_mirrors_input_copies_transcripts_and_never_touches_input(tmp_path):
    src = tmp_path / "in"
    shutil.copytree(DEMO, src)
    write_clip(src / "alice" / "broken.wav", text="bad").write_bytes(b"not audio at all")
    before = tree_digest(src)
    report = normalize_tree(src, tmp_path / "out", num_workers=2, show_progress=False)
    assert tree_digest(src) == before
    assert [(r.path, r.reason) for r in report.rejected] == [("alice/broken.wav", ds.UNREADABLE_AUDIO)]
    assert report.count("written") == 28 and not report.count("failed")
    for record in report.results:
        out = tmp_path / "out" / record.rel_path
        assert out.suffix == Path(record.rel_path).suffix  # --format keep
        assert out.with_suffix(".lab").read_bytes() == (src / record.rel_path).with_suffix(".lab").read_bytes()
        audio, rate = soundfile.read(out, always_2d=True)
        in_info = soundfile.info(src / record.rel_path)
        assert (rate, audio.shape[1]) == (in_info.samplerate, in_info.channels)
        if out.suffix != ".mp3":  # lossless outputs hit the target closely
            assert integrated_loudness(audio.T, rate) == pytest.approx(-23.0, abs=0.05)


def test_rerun_skips_only_what_is_current(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_clip(src / "spk" / f"c{i}.wav", 1.0, seed=i)
    first = normalize_tree(src, out, show_progress=False)
    assert first.count("written") == 3
    second = normalize_tree(src, out, show_progress=False)
    assert second.count("skipped") == 3
    # a skipped file's result is the one it was written with (length, clipping): reports do not depend on what was skipped
    as_result = lambda r: (r.rel_path, r.duration, r.clipped, r.limited)
    assert [as_result(r) for r in second.results] == [as_result(r) for r in first.results] and first.results[0].duration > 0

    write_clip(src / "spk" / "c1.wav", 1.2, seed=9)  # new bytes under the same name
    (out / "spk" / "c2.wav").write_bytes(b"damaged output")  # an output that no longer matches its record
    again = normalize_tree(src, out, show_progress=False)
    assert {r.rel_path: r.status for r in again.results} == {
        "spk/c0.wav": "skipped", "spk/c1.wav": "written", "spk/c2.wav": "written"}

    louder = normalize_tree(src, out, NormalizeSettings(loudness=-20.0), show_progress=False)
    assert louder.count("written") == 3  # a changed target redoes every file (the reference keeps stale ones)
    audio, rate = soundfile.read(out / "spk" / "c0.wav")
    assert integrated_loudness(audio[None], rate) == pytest.approx(-20.0, abs=0.05)
    assert normalize_tree(src, out, NormalizeSettings(loudness=-20.0), overwrite=True, show_progress=False).count("written") == 3


def test_clipping_is_counted_and_prevented(tmp_path):
    src = tmp_path / "in" / "spk"
    src.mkdir(parents=True)
    # A quiet signal with one loud click: -23 LUFS gain pushes the click far above 0 dBFS.
    audio = np.random.default_rng(0).standard_normal(16000) * 0.001
    audio[8000] = 0.9
    soundfile.write(src / "click.wav", audio, 16000, subtype="FLOAT")
    (src / "click.lab").write_text("click")
    report = normalize_tree(tmp_path / "in", tmp_path / "out", show_progress=False)
    assert [(r.rel_path, r.clipped, r.limited) for r in report.results] == [("spk/click.wav", True, True)]
    written, _ = soundfile.read(tmp_path / "out" / "spk" / "click.wav")
    assert np.max(np.abs(written)) == pytest.approx(10 ** (-1 / 20), rel=1e-6)
    report = normalize_tree(tmp_path / "in", tmp_path / "out2", NormalizeSettings(prevent_clipping=False), show_progress=False)
    assert [(r.clipped, r.limited) for r in report.results] == [(True, False)]


def test_format_conversion_and_root_safety(tmp_path):
    src = tmp_path / "in"
    write_clip(src / "spk" / "a.wav")
    normalize_tree(src, tmp_path / "out", NormalizeSettings(format="flac"), show_progress=False)
    assert soundfile.info(tmp_path / "out" / "spk" / "a.flac").format == "FLAC"
    for bad_output in (src, src / "inside"):
        with pytest.raises(ValueError, match="INPUT"):
            normalize_tree(src, bad_output, show_progress=False)
    with pytest.raises(ValueError, match="inside OUTPUT"):
        normalize_tree(src, tmp_path, show_progress=False)


def test_clean_empties_only_output(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    write_clip(src / "spk" / "a.wav")
    (out / "old").mkdir(parents=True)
    (out / "old" / "stale.wav").write_bytes(b"x")
    (tmp_path / "sibling.txt").write_text("keep me")
    normalize_tree(src, out, clean=True, show_progress=False)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if STATE_DIR not in p.parts) == [
        "spk", "spk/a.lab", "spk/a.wav"]
    assert (tmp_path / "sibling.txt").read_text() == "keep me"


@pytest.mark.slow
def test_killed_run_leaves_nothing_a_rerun_trusts(tmp_path):
    src = tmp_path / "in"
    for copy in range(4):  # enough work that the kill lands mid-run; speaker folders stay flat
        for speaker in sorted(p for p in DEMO.iterdir() if p.is_dir()):
            shutil.copytree(speaker, src / f"{speaker.name}-set{copy}")
    reference_out = tmp_path / "uninterrupted"

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fishtune", "normalize", str(src), str(out), "--num-workers", "1"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / STATE_DIR / "normalize"

    def kill_after_five() -> None:
        deadline = time.time() + 120
        # count finished records only: a killed write's temporary ends in .json too
        while time.time() < deadline and len([p for p in state.rglob("*.json") if ".tmp" not in p.name]) < 5:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # the uninterrupted run is made here while the CLI starts (single-threaded imports) and is
    # watched from a thread; the two write to folders of their own
    killer = threading.Thread(target=kill_after_five)
    killer.start()
    try:
        normalize_tree(src, reference_out, num_workers=1, show_progress=False)
    finally:
        killer.join()
    done_before_kill = len([p for p in state.rglob("*.json") if ".tmp" not in p.name])  # not a killed write
    assert 5 <= done_before_kill < 112, "the kill must land mid-run"

    rerun = normalize_tree(src, out, num_workers=1, show_progress=False)
    assert rerun.count("skipped") >= 5 and rerun.count("written") == 112 - rerun.count("skipped")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    expected = {k: v for k, v in tree_digest(reference_out).items() if not k.startswith(STATE_DIR)}
    got = {k: v for k, v in tree_digest(out).items() if not k.startswith(STATE_DIR)}
    assert got == expected  # byte-identical to an uninterrupted run
