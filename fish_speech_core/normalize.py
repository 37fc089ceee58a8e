"""Loudness normalization of a dataset tree (peak -1 dBFS, then -23 LUFS, ITU-R BS.1770-4).

The math is the reference recipe's (pyloudnorm: peak-normalize, measure integrated loudness
with a 0.4 s block, gain to the target). Around it we add what the reference tool lacks:
transcripts are copied, the input is never written, a file is skipped only when its output was
made from the same input bytes with the same settings, clipping is counted (and prevented by
default), a bad file is reported instead of killing the pool, and every write is atomic.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile

from fish_speech_core.audio import read_audio
from fish_speech_core.choices import AudioFormat, values
from fish_speech_core.dataset import PATH_ESCAPES, read_regular_bytes
from fish_speech_core.defaults import LOUDNESS_LUFS, PEAK_DBFS
from fish_speech_core.files import (
    NAME_MAX,
    DiskFullError,
    NotWritableError,
    PathEscapeError,
    atomic_write,
    is_abandoned,
    is_temporary,
    refuse_overlap,
    require_writable,
    resolve_inside,
    sha256_bytes,
    sha256_file,
)
from fish_speech_core.formats.text import clean_transcript
from fish_speech_core.parallel import map_with_progress
from fish_speech_core.validate import Record, ValidationSettings, accepted_items, validate

# Bump when the output of normalize_file changes for the same input and settings:
# it is part of every skip record, so old outputs are redone.
NORMALIZE_VERSION = 1
STATE_DIR = ".fishtune"  # hidden, so discovery never mistakes our bookkeeping for data
FORMATS = values(AudioFormat)  # ("keep", "flac", "wav")
_CONTAINER = {".wav": "WAV", ".flac": "FLAC", ".mp3": "MP3", ".ogg": "OGG"}


@dataclass(frozen=True)
class NormalizeSettings:
    peak: float = PEAK_DBFS  # dBFS, the first step's target and the clipping ceiling
    loudness: float = LOUDNESS_LUFS  # LUFS
    block_size: float = 0.4  # seconds, BS.1770 gating block
    format: str = "keep"  # keep | flac | wav
    prevent_clipping: bool = True


def loudness_normalize(
    audio: np.ndarray, sample_rate: int, peak: float = PEAK_DBFS, loudness: float = LOUDNESS_LUFS, block_size: float = 0.4
) -> np.ndarray:
    """Peak-normalize to ``peak`` dBFS, then gain to ``loudness`` LUFS (float64 in and out).

    ``audio`` is (frames,) or (frames, channels), as pyloudnorm expects.

    Raises:
        ValueError: audio shorter than one block, or silent (its loudness cannot be measured).
    """
    import pyloudnorm

    current_peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if current_peak == 0.0 or not np.isfinite(current_peak):
        raise ValueError("audio is silent or not finite; loudness cannot be normalized")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "possible clipping": we measure it ourselves
        peaked = pyloudnorm.normalize.peak(audio, peak)
        measured = pyloudnorm.Meter(sample_rate, block_size=block_size).integrated_loudness(peaked)
        if not np.isfinite(measured):
            raise ValueError("integrated loudness is -inf (every block is below the -70 LUFS gate)")
        return pyloudnorm.normalize.loudness(peaked, measured, loudness)


@dataclass(frozen=True)
class _Job:
    rel_path: str
    input_path: Path
    output_path: Path
    transcript_src: Path | None
    transcript_text: str | None
    transcript_out: Path
    state_path: Path
    input_sha256: str
    settings: NormalizeSettings
    overwrite: bool
    input_root: Path | None = None  # every read stays inside it (checked again at read time)


@dataclass
class FileResult:
    rel_path: str
    status: str  # written | skipped | failed
    output: str = ""
    duration: float = 0.0
    clipped: bool = False  # the loudness gain pushed a peak above 0 dBFS
    limited: bool = False  # ... and we scaled the file down to the peak ceiling
    detail: str = ""


def _state(job: _Job) -> dict:
    return {
        "version": NORMALIZE_VERSION,
        "input_sha256": job.input_sha256,
        "settings": asdict(job.settings),
    }


def _current_record(job: _Job) -> dict | None:
    """The skip record when the output exists, is intact and was made from these bytes with these
    settings (and the record says what a skipped file's result is: its length and clipping), else None."""
    try:
        recorded = json.loads(job.state_path.read_text())
    except (OSError, ValueError):
        return None
    if any(recorded.get(key) != value for key, value in _state(job).items()) or "duration" not in recorded:
        return None
    if not job.output_path.is_file() or not job.transcript_out.is_file():
        return None
    return recorded if recorded.get("output_sha256") == sha256_file(job.output_path) else None


def _output_subtype(container: str, input_subtype: str) -> str | None:
    if soundfile.check_format(container, input_subtype):
        return input_subtype
    return None  # soundfile's default for the container


def _transcript_bytes(job: _Job) -> bytes:
    if job.transcript_src is not None:
        text = read_regular_bytes(job.transcript_src).decode("utf-8")
    else:
        text = job.transcript_text or ""
    return clean_transcript(text).encode("utf-8")


def _state_path(output_root: Path, out_rel: str) -> Path:
    """Where the skip record of ``out_rel`` lives; a name too long for ``.json`` is hashed instead."""
    path = output_root / STATE_DIR / "normalize" / (out_rel + ".json")
    if len(os.fsencode(path.name)) <= NAME_MAX:
        return path
    return path.with_name(sha256_bytes(os.fsencode(out_rel))[:32] + ".json")


def normalize_file(job: _Job) -> FileResult:
    """Normalize one file; errors become a ``failed`` result, except a full disk, which
    would fail every later file too and is raised (:class:`DiskFullError`)."""
    recorded = None if job.overwrite else _current_record(job)
    if recorded is not None:  # the same result as when it was written: a report never depends on what was skipped
        return FileResult(job.rel_path, "skipped", str(job.output_path), duration=recorded["duration"],
                          clipped=recorded["clipped"], limited=recorded["limited"])
    if job.input_root is not None:  # discovery checked these; a link may be re-pointed since
        for source in (job.input_path, job.transcript_src):
            try:
                if source is not None:
                    resolve_inside(job.input_root, source)
            except (PathEscapeError, OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
                return FileResult(job.rel_path, "failed", detail=f"{PATH_ESCAPES}: {exc}")
    try:
        info = soundfile.info(str(job.input_path))
        audio, sample_rate = read_audio(job.input_path, dtype="float64")
        frames_first = audio[0] if audio.shape[0] == 1 else audio.T  # pyloudnorm layout
        s = job.settings
        out = loudness_normalize(frames_first, sample_rate, s.peak, s.loudness, s.block_size)
        result = FileResult(job.rel_path, "written", str(job.output_path), duration=audio.shape[1] / sample_rate)
        top = float(np.max(np.abs(out)))
        if top > 1.0:
            result.clipped = True
            if s.prevent_clipping:
                out = out * (10.0 ** (s.peak / 20.0) / top)
                result.limited = True
        container = _CONTAINER[job.output_path.suffix.lower()]
        # Encoded in memory, then written: libsndfile reports a full disk as a generic error,
        # a plain write() as ENOSPC, which atomic_write turns into a DiskFullError.
        encoded = io.BytesIO()
        soundfile.write(encoded, out, sample_rate, subtype=_output_subtype(container, info.subtype), format=container)
        with atomic_write(job.output_path, size=encoded.getbuffer().nbytes) as handle:
            handle.write(encoded.getbuffer())
        # The copy is the cleaned transcript (BOM, control characters dropped; NFC), the same text
        # validate checked and pack will pack; ordinary transcripts come out byte for byte.
        with atomic_write(job.transcript_out, "wb") as handle:
            handle.write(_transcript_bytes(job))
        # The record is written last: a crash before it means the file is redone, never trusted.
        with atomic_write(job.state_path, "w") as handle:
            json.dump({**_state(job), "output_sha256": sha256_file(job.output_path), "duration": result.duration,
                       "clipped": result.clipped, "limited": result.limited}, handle)
        return result
    except (DiskFullError, NotWritableError):
        raise  # every later file would fail the same way: stop the run
    except Exception as exc:  # one bad file must not stop the others
        return FileResult(job.rel_path, "failed", detail=f"{type(exc).__name__}: {exc}")


@dataclass
class NormalizeReport:
    input: str
    output: str
    settings: NormalizeSettings
    results: list[FileResult] = field(default_factory=list)
    rejected: list[Record] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def clipped(self) -> list[FileResult]:
        return [r for r in self.results if r.clipped]

    def summary(self) -> dict:
        written_audio = sum(r.duration for r in self.results if r.status == "written")
        return {
            "input": self.input,
            "output": self.output,
            "settings": asdict(self.settings),
            "written": self.count("written"),
            "skipped": self.count("skipped"),
            "failed": [{"path": r.rel_path, "detail": r.detail} for r in self.results if r.status == "failed"],
            "rejected": [{"path": r.path, "reason": r.reason, "detail": r.detail} for r in self.rejected],
            "clipped": [{"path": r.rel_path, "limited": r.limited} for r in self.clipped],
            "audio_seconds_written": written_audio,
            "wall_seconds": self.seconds,
            "audio_seconds_per_second": written_audio / self.seconds if self.seconds else 0.0,
        }


def check_roots(input_root: Path, output_root: Path) -> None:
    """Refuse layouts where writing OUTPUT could touch INPUT."""
    refuse_overlap([("INPUT", input_root)], output_root, "OUTPUT")


def _output_rel(rel_path: str, fmt: str) -> str:
    return rel_path if fmt == "keep" else str(Path(rel_path).with_suffix("." + fmt).as_posix())


def _remove_leftover_temporaries(output_root: Path) -> None:
    for dirpath, _, filenames in os.walk(output_root):
        for name in filenames:
            # only a killed run's: a second normalize must not delete the first one's in-flight temps
            if is_temporary(Path(name)) and is_abandoned(Path(dirpath) / name):
                (Path(dirpath) / name).unlink(missing_ok=True)


def clean_output(output_root: Path) -> None:
    """Empty OUTPUT (only OUTPUT: the folder itself stays)."""
    if not output_root.exists():
        return
    for child in output_root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def normalize_tree(
    input_root: str | os.PathLike,
    output_root: str | os.PathLike,
    settings: NormalizeSettings = NormalizeSettings(),
    validation: ValidationSettings = ValidationSettings(),
    filelist: str | os.PathLike | None = None,
    num_workers: int = 1,
    clean: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> NormalizeReport:
    """Validate INPUT, then write the normalized audio + transcripts of accepted items into OUTPUT."""
    if settings.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {settings.format!r}")
    src, dst = Path(input_root).absolute(), Path(output_root).absolute()
    check_roots(src, dst)
    require_writable(dst)  # a read-only OUTPUT is one line now, not a failure per file later
    started = time.perf_counter()
    report = validate(src, filelist, validation, num_workers, show_progress)
    if clean:
        clean_output(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _remove_leftover_temporaries(dst)

    items = {item.rel_path: item for item in accepted_items(report, filelist)}
    jobs = []
    for record in report.accepted:
        item = items[record.path]
        out_rel = _output_rel(record.path, settings.format)
        jobs.append(
            _Job(
                rel_path=record.path,
                input_path=item.audio_path,
                output_path=dst / out_rel,
                transcript_src=item.text_path,
                transcript_text=item.text,
                transcript_out=(dst / out_rel).with_suffix(validation.text_extension),
                state_path=_state_path(dst, out_rel),
                input_sha256=record.sha256 or "",
                settings=settings,
                overwrite=overwrite,
                input_root=src,
            )
        )
    results = map_with_progress(normalize_file, jobs, num_workers, "normalize", show_progress)
    return NormalizeReport(str(src), str(dst), settings, results, report.rejected, time.perf_counter() - started)


def write_report(report: NormalizeReport, path: str | os.PathLike) -> Path:
    with atomic_write(path, "w") as handle:
        json.dump(report.summary(), handle, indent=2, ensure_ascii=False)
    return Path(path)
