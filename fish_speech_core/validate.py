"""Dataset validation: classify every file as accepted or rejected-with-reason.

The result is a manifest (one row per audio file or orphan transcript) that later stages
consume, plus a per-speaker summary with data-size advice. Audio headers are read first;
a file is decoded (once) only when the header checks pass, for the silence / NaN checks.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np

from fish_speech_core import dataset as ds
from fish_speech_core.audio import audio_info, read_audio
from fish_speech_core.defaults import MAX_SECONDS, TEXT_EXTENSION
from fish_speech_core.files import atomic_path, sha256_file
from fish_speech_core.formats.text import has_spoken_content, training_text
from fish_speech_core.parallel import map_with_progress

ACCEPTED = "accepted"
REJECTED = "rejected"
LOUDNESS_BLOCK_SECONDS = 0.4  # pyloudnorm's default gating block: shorter audio cannot be measured
# Fast read speech is ~15-20 characters/s in alphabetic scripts (fewer in CJK); far more means
# the transcript belongs to more audio than the file holds.
MAX_CHARS_PER_SECOND = 40.0
MIN_SPEAKER_MINUTES = 30.0  # below this, a finetune rarely helps (advice only, never an error)
# Telephone speech is 8 kHz; below it the 300-3400 Hz band that carries intelligibility is cut
# (1 Hz or 100 Hz "rates" are broken headers, not recordings).
MIN_SAMPLE_RATE = 8000
MAX_CHANNELS = 5  # pyloudnorm's BS.1770 channel weights stop at 5 (L, R, C, Ls, Rs)
# Voice energy lies between the fundamental (~80 Hz) and the formants/consonants up to ~4 kHz.
# Real speech puts most of its energy there (the demo data and espeak-ng: > 0.9); a file with
# under 5% there is DC, rumble or ultrasound, whatever its loudness reading says.
SPEECH_BAND_HZ = (80.0, 4000.0)
MIN_SPEECH_BAND_FRACTION = 0.05


@dataclass(frozen=True)
class ValidationSettings:
    text_extension: str = TEXT_EXTENSION
    max_seconds: float = MAX_SECONDS
    min_seconds: float = LOUDNESS_BLOCK_SECONDS


@dataclass
class Record:
    """One row of the manifest."""

    path: str  # relative to the data root
    speaker: str
    status: str
    reason: str = ""
    detail: str = ""
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    sha256: str | None = None
    transcript: str | None = None
    peak: float | None = None  # max |sample|, linear
    loudness: float | None = None  # integrated loudness, LUFS (BS.1770-4)
    language: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED


def _reject(item: ds.Item, reason: str, detail: str = "", **known) -> Record:
    return Record(item.rel_path, item.speaker, REJECTED, reason, detail, language=item.language, **known)


def integrated_loudness(audio: np.ndarray, sample_rate: int, block_size: float = LOUDNESS_BLOCK_SECONDS) -> float:
    """BS.1770-4 integrated loudness of (channels, frames) audio, via pyloudnorm."""
    import pyloudnorm

    meter = pyloudnorm.Meter(sample_rate, block_size=block_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # silence gives log10(0): we report -inf
        return float(meter.integrated_loudness(audio.T.astype(np.float64)))


SPECTRUM_FRAME = 8192  # samples per spectrum frame: ~2-6 Hz bins, well below the 80 Hz edge
_FRAMES_PER_BATCH = 64  # bounds the FFT's memory for long, high-rate files


def speech_band_fraction(audio: np.ndarray, sample_rate: int) -> float:
    """Share of the mono mix's spectral energy (DC included) in :data:`SPEECH_BAND_HZ`; 0 for silence.

    Hann-windowed frames of :data:`SPECTRUM_FRAME` samples (the whole file if shorter), their
    power spectra summed: the mono mix is what the codec encodes.
    """
    mono = np.asarray(audio, dtype=np.float64).reshape(-1, np.shape(audio)[-1]).mean(axis=0)
    size = min(SPECTRUM_FRAME, mono.size)
    if size == 0:
        return 0.0
    frames = mono[: mono.size // size * size].reshape(-1, size)
    window = np.hanning(size) if size > 1 else np.ones(1)
    power = np.zeros(size // 2 + 1)
    for start in range(0, len(frames), _FRAMES_PER_BATCH):
        power += (np.abs(np.fft.rfft(frames[start:start + _FRAMES_PER_BATCH] * window, axis=1)) ** 2).sum(axis=0)
    total = float(power.sum())
    if total <= 0.0 or not math.isfinite(total):
        return 0.0
    freqs = np.fft.rfftfreq(size, 1.0 / sample_rate)
    low, high = SPEECH_BAND_HZ
    return float(power[(freqs >= low) & (freqs <= high)].sum()) / total


def check_item(item: ds.Item, settings: ValidationSettings) -> Record:
    """Run every check on one item; never raises, even for data no check anticipated."""
    try:
        return _check_item(item, settings)
    except Exception as exc:  # one bad file must never stop the run: it becomes a rejected row
        return _reject(item, ds.UNREADABLE_AUDIO, f"{type(exc).__name__}: {exc}"[:300])


def _check_item(item: ds.Item, settings: ValidationSettings) -> Record:
    try:
        transcript = ds.read_transcript(item)
    except UnicodeDecodeError as exc:
        return _reject(item, ds.TRANSCRIPT_NOT_UTF8, f"byte {exc.start}: {exc.reason}")
    except OSError as exc:
        return _reject(item, ds.UNREADABLE_TRANSCRIPT, exc.strerror or str(exc))
    if not transcript.strip():
        return _reject(item, ds.EMPTY_TRANSCRIPT)
    if not has_spoken_content(transcript):
        return _reject(
            item, ds.EMPTY_TRANSCRIPT, "no letters or digits after cleaning (only punctuation, "
            "tags, emoji or invisible characters)", transcript=transcript.strip(),
        )
    transcript = transcript.strip()

    try:
        info = audio_info(item.audio_path)
    except Exception as exc:  # libsndfile raises several types for corrupt files
        return _reject(item, ds.UNREADABLE_AUDIO, str(exc).strip() or type(exc).__name__, transcript=transcript)
    known = dict(sample_rate=info.sample_rate, channels=info.channels, transcript=transcript)
    if info.sample_rate < MIN_SAMPLE_RATE:
        return _reject(item, ds.SAMPLE_RATE_TOO_LOW, f"{info.sample_rate} Hz < {MIN_SAMPLE_RATE} Hz", **known)
    if info.channels > MAX_CHANNELS:
        return _reject(
            item, ds.TOO_MANY_CHANNELS, f"{info.channels} channels > {MAX_CHANNELS}; downmix to mono or stereo", **known
        )
    if info.frames == 0:
        return _reject(item, ds.ZERO_LENGTH, **known, duration=0.0)
    if info.duration > settings.max_seconds:
        return _reject(
            item, ds.TOO_LONG, f"{info.duration:.1f} s > {settings.max_seconds:g} s; split it", duration=info.duration, **known
        )
    if info.duration < settings.min_seconds:
        return _reject(item, ds.TOO_SHORT, f"{info.duration:.3f} s < {settings.min_seconds:g} s", duration=info.duration, **known)

    try:
        audio, sample_rate = read_audio(item.audio_path)
    except Exception as exc:
        return _reject(item, ds.UNREADABLE_AUDIO, str(exc).strip() or type(exc).__name__, **known)
    duration = audio.shape[1] / sample_rate  # the decoded length: mp3 headers only estimate it
    known["duration"] = duration
    if audio.shape[1] == 0:
        return _reject(item, ds.ZERO_LENGTH, **known)
    if not np.isfinite(audio).all():
        return _reject(item, ds.NON_FINITE, f"{int((~np.isfinite(audio)).sum())} samples", **known)
    if duration < settings.min_seconds:
        return _reject(item, ds.TOO_SHORT, f"{duration:.3f} s < {settings.min_seconds:g} s", **known)
    chars = len(training_text(transcript))
    if chars > MAX_CHARS_PER_SECOND * duration:
        return _reject(
            item, ds.TRANSCRIPT_TOO_LONG,
            f"{chars} characters for {duration:.2f} s (> {MAX_CHARS_PER_SECOND:g}/s): split the text "
            "or check that it belongs to this audio", **known,
        )
    loudness = integrated_loudness(audio, sample_rate)
    peak = float(np.abs(audio).max())
    if math.isinf(loudness):
        return _reject(item, ds.SILENT, f"peak {peak:.2g}", peak=peak, **known)
    band = speech_band_fraction(audio, sample_rate)
    if band < MIN_SPEECH_BAND_FRACTION:
        low, high = SPEECH_BAND_HZ
        return _reject(
            item, ds.NO_SPEECH_BAND, f"{band:.1%} of the energy in {low:g} Hz-{high / 1000:g} kHz "
            f"(< {MIN_SPEECH_BAND_FRACTION:.0%})", peak=peak, loudness=loudness, **known,
        )
    return Record(
        item.rel_path,
        item.speaker,
        ACCEPTED,
        sha256=sha256_file(item.audio_path),
        peak=peak,
        loudness=loudness,
        language=item.language,
        **known,
    )


@dataclass
class ValidationReport:
    root: Path
    records: list[Record]
    settings: ValidationSettings = field(default_factory=ValidationSettings)

    @property
    def accepted(self) -> list[Record]:
        return [r for r in self.records if r.accepted]

    @property
    def rejected(self) -> list[Record]:
        return [r for r in self.records if not r.accepted]

    def speaker_hours(self) -> dict[str, float]:
        hours: dict[str, float] = defaultdict(float)
        for record in self.records:
            if record.accepted:
                hours[record.speaker] += (record.duration or 0.0) / 3600
        return dict(sorted(hours.items()))

    def rejects_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r.reason for r in self.rejected).items()))

    def advice(self) -> list[str]:
        """Data-size warnings: never errors, only what a user should know before training."""
        notes = []
        for speaker, hours in self.speaker_hours().items():
            if hours * 60 < MIN_SPEAKER_MINUTES:
                notes.append(
                    f"speaker {speaker!r} has {hours * 60:.1f} min of accepted audio; finetunes on less "
                    f"than {MIN_SPEAKER_MINUTES:.0f} min rarely help"
                )
        if not self.accepted:
            notes.append("no accepted audio: nothing to train on")
        return notes

    def summary(self, with_root: bool = True) -> dict:
        """Counts, hours and rejects by speaker; ``with_root=False`` leaves out the data folder (a
        host's path: not what a content-keyed artifact may hold)."""
        per_speaker: dict[str, dict] = defaultdict(lambda: {"accepted": 0, "rejected": 0, "hours": 0.0})
        for record in self.records:
            row = per_speaker[record.speaker or "(none)"]
            row[record.status] += 1
            if record.accepted:
                row["hours"] += (record.duration or 0.0) / 3600
        return {
            **({"root": ds.printable(str(self.root))} if with_root else {}),
            "accepted": len(self.accepted),
            "rejected": len(self.rejected),
            "total_hours": sum(self.speaker_hours().values()),
            "speakers": dict(sorted(per_speaker.items())),
            "rejects_by_reason": self.rejects_by_reason(),
            "rejects": [
                {"path": r.path, "reason": r.reason, "detail": r.detail} for r in sorted(self.rejected, key=lambda r: r.path)
            ],
            "advice": self.advice(),
        }

    def to_markdown(self) -> str:
        s = self.summary()
        lines = [
            f"**{s['accepted']} accepted, {s['rejected']} rejected, {s['total_hours'] * 60:.1f} min of audio**",
            "",
            "| speaker | accepted | rejected | minutes |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {row['accepted']} | {row['rejected']} | {row['hours'] * 60:.2f} |"
            for name, row in s["speakers"].items()
        ]
        if s["rejects"]:
            lines += ["", "| rejected file | reason | detail |", "|---|---|---|"]
            lines += [f"| `{r['path']}` | {r['reason']} | {r['detail']} |" for r in s["rejects"]]
        lines += [f"\n> {note}" for note in s["advice"]]
        return "\n".join(lines) + "\n"

    def write_parquet(self, path: str | os.PathLike, with_root: bool = True) -> Path:
        """The manifest, one row per record; ``with_root=False``: no data folder in its metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {f.name: [getattr(r, f.name) for r in self.records] for f in fields(Record)}
        schema = pa.schema(
            [
                ("path", pa.string()), ("speaker", pa.string()), ("status", pa.string()),
                ("reason", pa.string()), ("detail", pa.string()), ("duration", pa.float64()),
                ("sample_rate", pa.int32()), ("channels", pa.int32()), ("sha256", pa.string()),
                ("transcript", pa.string()), ("peak", pa.float64()), ("loudness", pa.float64()),
                ("language", pa.string()),
            ],
            metadata={**({"root": ds.printable(str(self.root))} if with_root else {}),
                      "max_seconds": str(self.settings.max_seconds)},
        )
        table = pa.table(columns, schema=schema)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return Path(path)


def read_manifest(path: str | os.PathLike) -> list[Record]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return [Record(**row) for row in table.to_pylist()]


def collect_items(
    root: str | os.PathLike, filelist: str | os.PathLike | None = None, text_extension: str = TEXT_EXTENSION
) -> tuple[list[ds.Item], list[ds.Rejection]]:
    """Items from the folder layout, or from ``filelist`` when given."""
    if filelist is not None:
        return ds.read_filelist(filelist, root)
    return ds.discover(root, text_extension)


def report_of(root: str | os.PathLike, records: Iterable[Record], settings: ValidationSettings) -> ValidationReport:
    """The report of ``records`` in the manifest's order (by speaker, then path; stable): how one
    run orders its rows, and how a merge of shards' rows gets the same table."""
    return ValidationReport(Path(root).absolute(), sorted(records, key=lambda r: (r.speaker, r.path)), settings)


def validate(
    root: str | os.PathLike,
    filelist: str | os.PathLike | None = None,
    settings: ValidationSettings = ValidationSettings(),
    num_workers: int = 1,
    show_progress: bool = True,
    keep: Callable[[str], bool] | None = None,
) -> ValidationReport:
    """Discover and check every item of a dataset; returns the full report (accepted + rejected).

    ``keep(rel_path)``: check only the files (and report only the rejections) it keeps, e.g. one
    shard's; the others are left out of the report."""
    root = Path(root).absolute()
    items, rejections = collect_items(root, filelist, settings.text_extension)
    if keep is not None:
        items, rejections = [i for i in items if keep(i.rel_path)], [r for r in rejections if keep(r.rel_path)]
    checked = map_with_progress(
        partial(check_item, settings=settings), items, num_workers, "validate", show_progress
    )
    return report_of(root, checked + [Record(r.rel_path, r.speaker, REJECTED, r.reason, r.detail) for r in rejections],
                     settings)


def accepted_items(report: ValidationReport, filelist: str | os.PathLike | None = None) -> list[ds.Item]:
    """The :class:`Item` objects of the accepted records (for stages that work per file)."""
    items, _ = collect_items(report.root, filelist, report.settings.text_extension)
    ok = {r.path for r in report.accepted}
    return [item for item in items if item.rel_path in ok]

