"""Data-file cases: one bad file among good ones, audio that is not speech, dirty transcripts.

Each case puts one hostile file beside a good clip and checks that the command names the file
and its reason, exits as documented (validate 0, normalize 0 with nothing failed), and that the
good clip went on (accepted in the manifest, written by normalize). Bad data that ends up
accepted or written is a ``silent-accept``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile

from fish_speech_core.formats.protos import iter_text_data
from tests.audio_factory import voiced, write_clip
from tests.hardening.corpus import Case, Run

NON_UTF8 = os.fsdecode(b"caf\xe9")


def _validate(tmp: Path, setup: Callable[[Path], None], reason: str, shown: str, bad: tuple[str, ...] = (),
              extra: tuple[str, ...] = ()) -> Run:
    """``validate`` on anna/good.wav plus what ``setup`` adds; ``bad`` rows must not be accepted."""
    data = tmp / "data"
    write_clip(data / "anna" / "good.wav")
    setup(data / "anna")
    report = tmp / "manifest.parquet"

    def check(done) -> str | None:
        if not report.is_file():
            return "unclear"
        rows = {r["path"]: r for r in pq.read_table(report).to_pylist()}
        if rows.get("anna/good.wav", {}).get("status") != "accepted":
            return "unclear"  # the good clip did not go on
        if any(rows.get(path, {}).get("status") == "accepted" for path in bad):
            return "silent-accept"
        if any(r["reason"] == "orphan-transcript" for r in rows.values()):
            return "unclear"
        return None

    return Run(["validate", str(data), "--report", str(report), *extra], exit_codes=(0,),
               output_has=(shown, reason), unchanged=(data,), check=check, timeout=60)


def _normalize(tmp: Path, setup: Callable[[Path], None], reason: str, shown: str) -> Run:
    data, out = tmp / "data", tmp / "out"
    write_clip(data / "anna" / "good.wav")
    setup(data / "anna")

    def check(done) -> str | None:
        if not (out / "anna" / "good.wav").is_file():
            return "unclear"
        summary = json.loads((out / ".fishtune" / "normalize-report.json").read_text(encoding="utf-8"))
        return "unclear" if summary["failed"] else None

    return Run(["normalize", str(data), str(out), "--num-workers", "1"], exit_codes=(0,),
               output_has=(shown, reason), unchanged=(data,), check=check, timeout=60)


def _six_channels(spk: Path) -> None:
    write_clip(spk / "six.wav", channels=6, seed=1)


def _non_utf8_name(spk: Path) -> None:
    (spk / f"{NON_UTF8}.wav").write_bytes((spk / "good.wav").read_bytes())
    (spk / f"{NON_UTF8}.lab").write_text("hello")


def _symlink_loop(spk: Path) -> None:
    os.symlink("loop.wav", spk / "loop.wav")
    (spk / "loop.lab").write_text("hello")


def _dangling(spk: Path) -> None:
    os.symlink("gone.wav", spk / "dangling.wav")
    (spk / "dangling.lab").write_text("hello")


def _fifo_lab(spk: Path) -> None:
    write_clip(spk / "pipe.wav", text=None, seed=1)
    os.mkfifo(spk / "pipe.lab")


def _fifo_wav(spk: Path) -> None:
    os.mkfifo(spk / "pipe.wav")
    (spk / "pipe.lab").write_text("hello")


def _long_name(spk: Path) -> None:
    write_clip(spk / ("n" * 241 + ".wav"), seed=1)


def _unsupported(spk: Path) -> None:
    for name in ("a.opus", "b.M4A", "c.aiff"):
        (spk / name).write_bytes(b"\0" * 64)
        (spk / name).with_suffix(".lab").write_text("hello")


def _dc_only(spk: Path) -> None:
    soundfile.write(spk / "dc.wav", np.full(32000, 0.4), 16000)
    (spk / "dc.lab").write_text("hello there")


def _low_rates(spk: Path) -> None:
    for rate in (1, 100):
        soundfile.write(spk / f"rate{rate}.wav", voiced(12, 1000)[: 12 * rate], rate)
        (spk / f"rate{rate}.lab").write_text("hello")


def _control_only(spk: Path) -> None:
    write_clip(spk / "ctl.wav", seed=1, text=None)
    (spk / "ctl.lab").write_bytes(b"\xef\xbb\xbf\x00\x1b[31m\x07")


def _nested(tmp: Path) -> Run:
    data = tmp / "data"
    write_clip(data / "alice" / "s1" / "a.wav")
    write_clip(data / "bob" / "s1" / "a.wav", seed=1)
    write_clip(data / "carol" / "c.wav", seed=2)
    report = tmp / "manifest.parquet"

    def check(done) -> str | None:
        rows = pq.read_table(report).to_pylist()
        if any(r["status"] == "accepted" and r["speaker"] == "s1" for r in rows):
            return "silent-accept"
        return None

    return Run(["validate", str(data), "--report", str(report)], exit_codes=(0,),
               output_has=("alice/s1/a.wav", "bob/s1/a.wav", "nested-speaker-folder"), unchanged=(data,),
               check=check, timeout=60)


DIRTY = "\ufeffhel\x00lo \x1b[31mthere\x1b[0m\x07\n"


def _dirty_transcript_normalized(tmp: Path) -> Run:
    data, out = tmp / "data", tmp / "out"
    write_clip(data / "anna" / "good.wav", text=None)
    (data / "anna" / "good.lab").write_bytes(DIRTY.encode("utf-8"))

    def check(done) -> str | None:
        text = (out / "anna" / "good.lab").read_text(encoding="utf-8")
        return "silent-accept" if text != "hello there\n" else None

    return Run(["normalize", str(data), str(out), "--num-workers", "1"], exit_codes=(0,), unchanged=(data,),
               check=check, timeout=60)


def _dirty_transcript_packed(tmp: Path) -> Run:
    data, out = tmp / "codes", tmp / "shards"
    (data / "anna").mkdir(parents=True)
    (data / "anna" / "a.lab").write_bytes(DIRTY.encode("utf-8"))
    np.save(data / "anna" / "a.npy", np.ones((8, 12), np.int32))
    (data / "anna" / "b.lab").write_bytes(b"\x00\x1b[0m ")
    np.save(data / "anna" / "b.npy", np.ones((8, 12), np.int32))

    def check(done) -> str | None:
        texts = [s.texts[0] for td in iter_text_data(out) for s in td.sentences]
        return "silent-accept" if texts != ["hello there "] else None

    return Run(["pack", "--input", str(data), "--output", str(out)], exit_codes=(0,),
               output_has=("b.lab", "no letters or digits"), unchanged=(data,), check=check, timeout=60)


def _latin1_filelist(tmp: Path) -> Run:
    data = tmp / "data"
    write_clip(data / "anna" / "a.wav")
    write_clip(data / "anna" / "b.wav", seed=1)
    filelist = tmp / "list.txt"
    filelist.write_bytes(b"anna/a.wav|anna|en|plain ascii\nanna/b.wav|anna|es|caf\xe9 ol\xe9\n")
    report = tmp / "manifest.parquet"

    def check(done) -> str | None:
        rows = {r["path"]: r["status"] for r in pq.read_table(report).to_pylist()}
        return None if rows == {"anna/a.wav": "accepted", "list.txt:2": "rejected"} else "unclear"

    return Run(["validate", str(data), "--filelist", str(filelist), "--report", str(report)], exit_codes=(0,),
               output_has=("list.txt:2", "filelist-line-not-utf8"), unchanged=(data, filelist), check=check, timeout=60)


def _v(setup, reason, shown, bad=()):
    return lambda tmp: _validate(tmp, setup, reason, shown, bad)


def _n(setup, reason, shown):
    return lambda tmp: _normalize(tmp, setup, reason, shown)


CASES = [
    Case("data", "validate-six-channels", _v(_six_channels, "too-many-channels", "six.wav", ("anna/six.wav",))),
    Case("data", "normalize-six-channels", _n(_six_channels, "too-many-channels", "six.wav")),
    Case("data", "validate-non-utf8-name", _v(_non_utf8_name, "bad-file-name", "caf\\xe9.wav")),
    Case("data", "validate-symlink-loop", _v(_symlink_loop, "broken-symlink", "loop.wav")),
    Case("data", "normalize-dangling-symlink", _n(_dangling, "broken-symlink", "dangling.wav")),
    Case("data", "validate-fifo-lab", _v(_fifo_lab, "not-a-regular-file", "pipe.lab", ("anna/pipe.wav",))),
    Case("data", "normalize-fifo-wav", _n(_fifo_wav, "not-a-regular-file", "pipe.wav")),
    Case("data", "normalize-245-byte-name", _n(_long_name, "2 written", "0 failed")),
    Case("data", "validate-opus-m4a-aiff", _v(_unsupported, "unsupported-audio-format", "b.M4A")),
    Case("data", "validate-dc-only", _v(_dc_only, "no-speech-band-content", "dc.wav", ("anna/dc.wav",))),
    Case("data", "validate-1hz-100hz-rates", _v(_low_rates, "sample-rate-too-low", "rate100.wav",
                                                ("anna/rate1.wav", "anna/rate100.wav"))),
    Case("data", "validate-nested-speakers", _nested),
    Case("data", "validate-control-only-transcript",
         _v(_control_only, "empty-transcript", "ctl.wav", ("anna/ctl.wav",))),
    Case("data", "normalize-bom-nul-esc-transcript", _dirty_transcript_normalized),
    Case("data", "pack-bom-nul-esc-transcript", _dirty_transcript_packed),
    Case("data", "validate-latin1-filelist", _latin1_filelist),
]
