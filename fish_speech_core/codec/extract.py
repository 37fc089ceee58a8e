"""Semantic-token extraction: audio files -> ``<stem>.npy`` int32 codes (groups, frames).

Pipeline: :func:`plan_extraction` reads headers only (lengths, rejections) and decides what is
already done; :func:`run_extraction` decodes, resamples and (on CPU) computes log-mels, then
encodes length-bucketed batches under ``torch.inference_mode``. With no worker processes, a CPU
codec decodes each batch just before encoding it (a thread beside it slowed both, see
:func:`_loaded_batches`) and a GPU codec has a decode thread stay ahead; with workers, DataLoader
processes decode.

Incremental by content: each ``x.npy`` gets a sidecar ``x.npy.json`` recording the sha256 of
the audio bytes, the codec hash (:func:`~fish_speech_core.codec.checkpoint.codec_hash`), the
settings that change codes, and the npy's own sha256. A file is skipped only when all four
still match, so changed audio, another codec, or a damaged npy is redone. The npy is written
first and the sidecar second, both atomically: a kill in between leaves no sidecar and the
rerun redoes that file.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from fish_speech_core.audio import audio_info, read_audio, resample, to_mono
from fish_speech_core.codec.checkpoint import codec_hash
from fish_speech_core.codec.model import FireflyCodec, NonFiniteEncodingError
from fish_speech_core.codes import SIDECAR_SUFFIX, CodeSpec, sidecar_path_for
from fish_speech_core.defaults import CPU_BATCH_SECONDS, EXTRACT_DECODE_WORKERS, MAX_SECONDS
from fish_speech_core.files import atomic_write, remove_temporaries, sha256_bytes, sha256_file

SIDECAR_FORMAT = "fishtune-codes/1"
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
ENCODER_NOT_FINITE = "the encoder output is not finite (NaN/Inf) for this audio: no codes written"


# Files per encoder batch when none is given. On CPU a batch only adds padding work: batch 1 ran
# 34.6 audio-s/s against 30.4 for 16 length-bucketed files and 20.0 for 16 in file order
# (bench/extract.py, 2-core EPYC, quiet); on a GPU batching is what keeps it busy.
CPU_BATCH_SIZE = 1
GPU_BATCH_SIZE = 16


def default_batch_size(device: str) -> int:
    return CPU_BATCH_SIZE if str(device).startswith("cpu") else GPU_BATCH_SIZE


def batching_for(device: str, batch_size: int | None = None,
                 max_batch_seconds: float | None = None) -> tuple[int, float | None]:
    """(files per batch, padded-seconds cap) for ``device``: unset ones take the device's defaults."""
    on_cpu = str(device).startswith("cpu")
    if not max_batch_seconds:
        max_batch_seconds = CPU_BATCH_SECONDS if on_cpu else None
    return batch_size or default_batch_size(device), max_batch_seconds


@dataclass(frozen=True)
class ExtractSettings:
    """Knobs of one extraction run. Only ``dtype`` changes the codes (it is in the sidecar)."""

    batch_size: int = 16
    num_workers: int = EXTRACT_DECODE_WORKERS  # 0: this process decodes (in line on CPU, a thread on GPU)
    max_seconds: float = MAX_SECONDS
    dtype: str = "fp32"  # "fp32" (reference parity) or "bf16" (autocast on the encoder)
    overwrite: bool = False
    bucket: bool = True  # length-bucketed batches; False = file order (for comparisons)
    # Padded audio per batch; on CPU big batches run slower per second of audio (memory-bound).
    max_batch_seconds: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers}")
        if self.max_batch_seconds is not None and not self.max_batch_seconds > 0:
            problems.append(f"max_batch_seconds must be > 0, got {self.max_batch_seconds}")
        if not self.max_seconds > 0:
            problems.append(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def code_settings(self) -> dict[str, str]:
        """The settings recorded in sidecars: a change here means the codes may differ."""
        return {"dtype": self.dtype}


@dataclass(frozen=True)
class Job:
    """One audio file to encode."""

    audio_path: Path
    npy_path: Path
    seconds: float  # from the header
    num_samples: int  # estimated length at the codec rate, for bucketing


@dataclass(frozen=True)
class FileResult:
    audio_path: Path
    status: str  # "extracted" | "skipped" | "rejected" | "failed"
    reason: str = ""
    seconds: float = 0.0
    npy_path: Path | None = None


@dataclass
class ExtractPlan:
    todo: list[Job] = field(default_factory=list)
    skipped: list[FileResult] = field(default_factory=list)  # up to date
    rejected: list[FileResult] = field(default_factory=list)  # too long/short, unreadable header

    @property
    def todo_seconds(self) -> float:
        return sum(job.seconds for job in self.todo)


@dataclass
class ExtractSummary:
    results: list[FileResult]
    wall_seconds: float

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def extracted_seconds(self) -> float:
        return sum(r.seconds for r in self.results if r.status == "extracted")

    @property
    def speed(self) -> float:
        """Audio seconds encoded per wall second (the inverse real-time factor)."""
        return self.extracted_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


def npy_path_for(audio_path: Path) -> Path:
    return audio_path.with_suffix(".npy")


def code_spec(model: FireflyCodec) -> CodeSpec:
    """Rows and value range of the codes ``model`` makes (recorded in every sidecar)."""
    return CodeSpec.from_levels(model.config.num_codebooks, tuple(model.config.quantizer.levels))


def check_finite_weights(model: FireflyCodec) -> None:
    """Refuse a codec whose encoding weights hold NaN/Inf: every code it made would be garbage.

    Raises:
        ValueError: naming how many tensors and the first few.
    """
    bad = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
           if not name.startswith("head.") and tensor.is_floating_point()
           and not bool(torch.isfinite(tensor).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ValueError(f"the codec's weights are not finite (NaN or Inf in {len(bad)} tensor(s): "
                         f"{shown}); the checkpoint is damaged, use the released generator .pth")


# --------------------------------------------------------------------------- planning


def _is_up_to_date(audio_path: Path, npy_path: Path, model_hash: str, settings: dict) -> bool:
    """True when the sidecar proves the npy came from these audio bytes, codec and settings."""
    sidecar = sidecar_path_for(npy_path)
    if npy_path.is_symlink() or sidecar.is_symlink():
        return False  # we only write regular files: a link is not ours, and may point anywhere
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (
        isinstance(record, dict)
        and record.get("format") == SIDECAR_FORMAT
        and record.get("codec_hash") == model_hash
        and record.get("settings") == settings
        and npy_path.is_file()
    ):
        return False
    return (
        sha256_file(npy_path) == record.get("npy_sha256")
        and sha256_file(audio_path) == record.get("audio_sha256")
    )


def plan_extraction(
    audio_paths: Sequence[Path],
    model: FireflyCodec,
    settings: ExtractSettings,
    model_hash: str | None = None,
) -> ExtractPlan:
    """Read headers, reject what cannot be encoded, and skip what is already up to date."""
    model_hash = model_hash or codec_hash(model)
    code_settings = settings.code_settings()
    rate = model.sample_rate
    min_samples = model.config.samples_per_code
    plan = ExtractPlan()
    owners: dict[Path, Path] = {}
    for audio_path in audio_paths:
        audio_path = Path(audio_path)
        npy_path = npy_path_for(audio_path)
        if npy_path in owners:
            plan.rejected.append(
                FileResult(audio_path, "rejected", f"{owners[npy_path].name} already writes {npy_path.name}")
            )
            continue
        owners[npy_path] = audio_path
        try:
            info = audio_info(audio_path)
        except Exception as error:  # libsndfile raises RuntimeError subclasses; be broad
            plan.rejected.append(FileResult(audio_path, "rejected", f"unreadable audio: {error}"))
            continue
        seconds = info.duration
        num_samples = math.ceil(info.frames * rate / info.sample_rate) if info.sample_rate else 0
        if seconds > settings.max_seconds:
            plan.rejected.append(
                FileResult(
                    audio_path, "rejected",
                    f"{seconds:.1f} s is longer than --max-seconds {settings.max_seconds:g}; "
                    "split it or raise the limit",
                    seconds,
                )
            )
            continue
        if num_samples < min_samples:
            plan.rejected.append(
                FileResult(
                    audio_path, "rejected",
                    f"{seconds * 1000:.0f} ms is shorter than one code frame "
                    f"({min_samples / rate * 1000:.0f} ms)",
                    seconds,
                )
            )
            continue
        if not settings.overwrite and _is_up_to_date(audio_path, npy_path, model_hash, code_settings):
            plan.skipped.append(FileResult(audio_path, "skipped", "up to date", seconds, npy_path))
            continue
        plan.todo.append(Job(audio_path, npy_path, seconds, num_samples))
    return plan


# --------------------------------------------------------------------------- batching


def make_batches(
    jobs: Sequence[Job], batch_size: int, bucket: bool = True, max_batch_samples: int | None = None
) -> list[list[int]]:
    """Indices of ``jobs`` grouped into batches.

    Bucketed: sorted by length, longest batch first (an OOM shows at once, the ETA errs long),
    so each batch pads little. Otherwise file order, padding to the longest in each batch.
    Either way a batch holds at most ``batch_size`` files and, when ``max_batch_samples`` is
    set, at most that many samples once padded (a single longer file still gets its batch).
    """
    order = list(range(len(jobs)))
    if bucket:
        order.sort(key=lambda i: jobs[i].num_samples, reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        length = max(longest, jobs[index].num_samples)
        full = len(current) >= batch_size or (
            max_batch_samples is not None and current and length * (len(current) + 1) > max_batch_samples
        )
        if full:
            batches.append(current)
            current, length = [], jobs[index].num_samples
        current.append(index)
        longest = length
    if current:
        batches.append(current)
    return batches


@dataclass
class _Loaded:
    index: int
    audio: torch.Tensor | None  # (T,) float32 at the codec rate
    audio_sha256: str = ""
    error: str = ""
    mel: torch.Tensor | None = None  # (n_mels, T // hop) when the loader computes the log-mel


class _AudioDataset(torch.utils.data.Dataset):
    """Reads, hashes, downmixes and resamples one file (and, given ``spec_transform``, computes
    its log-mel); runs in the extracting thread, a decode thread or DataLoader workers."""

    def __init__(self, jobs: Sequence[Job], sample_rate: int, max_seconds: float,
                 spec_transform: torch.nn.Module | None = None, min_samples: int = 1) -> None:
        self.jobs = list(jobs)
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds
        self.spec_transform = spec_transform
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> _Loaded:
        job = self.jobs[index]
        try:
            digest = sha256_bytes(job.audio_path.read_bytes())  # recorded in the sidecar
            audio, rate = read_audio(job.audio_path)  # by path: libsndfile sniffs the format
            if audio.shape[-1] > self.max_seconds * rate:  # header lied (e.g. some mp3s)
                return _Loaded(index, None, digest, f"decoded length {audio.shape[-1] / rate:.1f} s "
                               f"exceeds --max-seconds {self.max_seconds:g}")
            if not np.isfinite(audio).all():  # would encode to garbage codes (INT32_MIN)
                return _Loaded(index, None, digest, "audio holds NaN or infinite samples")
            mono = torch.from_numpy(to_mono(audio))
            audio = resample(mono, rate, self.sample_rate)
            if audio.shape[-1] < self.min_samples:
                return _Loaded(index, None, digest,
                               f"decoded to {audio.shape[-1]} samples, shorter than one code frame")
            if self.spec_transform is None:
                return _Loaded(index, audio, digest)
            with torch.inference_mode():  # the same log-mel the encoder would compute, one clip at a time
                return _Loaded(index, audio, digest, mel=self.spec_transform(audio))
        except Exception as error:  # corrupt or unsupported: reported, never fatal
            return _Loaded(index, None, "", f"{type(error).__name__}: {error}")


def _collate(items: list[_Loaded]) -> list[_Loaded]:
    return items


def _prefetched(batches: list[list[int]], load: Callable[[int], _Loaded], depth: int = 2) -> Iterator[list[_Loaded]]:
    """``[load(i) for i in batch]`` per batch, loaded up to ``depth`` batches ahead on one thread.

    soundfile, hashlib, resampling and the STFT release the GIL, so the thread decodes while the
    main thread encodes; unlike a worker process it needs no start-up, no pickling of results,
    and no second copy of torch's thread pool competing for the same cores.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fishtune-decode")
    pending: deque[Future] = deque()
    todo = iter(batches)
    try:
        for batch in islice(todo, depth):
            pending.append(pool.submit(lambda b=batch: [load(i) for i in b]))
        while pending:
            loaded = pending.popleft().result()
            batch = next(todo, None)
            if batch is not None:
                pending.append(pool.submit(lambda b=batch: [load(i) for i in b]))
            yield loaded
    finally:  # also when the consumer stops early: drop what is queued, wait for the one running
        pool.shutdown(wait=True, cancel_futures=True)


def _loaded_batches(
    jobs: Sequence[Job], batches: list[list[int]], model: FireflyCodec, settings: ExtractSettings
) -> Iterator[list[_Loaded]]:
    device = next(model.parameters()).device
    # The log-mel is per clip (batch-invariant), so on CPU it moves off the encoder's path too;
    # on a GPU the encoder's device computes it faster.
    spec = model.spec_transform if device.type == "cpu" else None
    dataset = _AudioDataset(jobs, model.sample_rate, settings.max_seconds, spec, model.config.samples_per_code)
    if settings.num_workers == 0 and device.type == "cpu":
        # In line, not in a thread: the encoder already keeps every core busy, and a decode thread's
        # own torch ops (resampling, STFT) made the two OpenMP teams contend. Quiet 2 cores, same
        # run, 24 clips / 184 s: 32-35 audio-s/s in line (the encoder alone on decoded audio: 33-35)
        # against 23-28 with the thread (docs/codec.md).
        for batch in batches:
            yield [dataset[i] for i in batch]
        return
    if settings.num_workers == 0:
        yield from _prefetched(batches, dataset.__getitem__)
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=settings.num_workers,
        collate_fn=_collate,
        prefetch_factor=2,
    )
    yield from loader


# --------------------------------------------------------------------------- encoding


def encode_batches(
    model: FireflyCodec,
    jobs: Sequence[Job],
    settings: ExtractSettings,
) -> Iterator[tuple[Job, np.ndarray | None, str, str]]:
    """Yield ``(job, codes int32 (groups, frames) or None, audio sha256, error)`` per job.

    The library entry for in-memory use: nothing is written.
    """
    device = next(model.parameters()).device
    autocast_dtype = DTYPES[settings.dtype]
    cap = settings.max_batch_seconds
    batches = make_batches(
        jobs, settings.batch_size, settings.bucket, None if cap is None else int(cap * model.sample_rate)
    )
    for loaded in _loaded_batches(jobs, batches, model, settings):
        good = []
        for item in loaded:
            if item.audio is None:
                yield jobs[item.index], None, item.audio_sha256, item.error
            else:
                good.append(item)
        if not good:
            continue
        try:
            arrays = _encode(model, good, device, autocast_dtype)
        except NonFiniteEncodingError as error:  # only the clips it names; the rest again
            rest = [i for i in range(len(good)) if i not in error.indices]
            encoded = iter(_encode(model, [good[i] for i in rest], device, autocast_dtype) if rest else [])
            arrays = [ENCODER_NOT_FINITE if i in error.indices else next(encoded) for i in range(len(good))]
        except RuntimeError:  # e.g. out of memory: retry one by one so only the culprit fails
            if len(good) == 1:
                raise
            arrays = []
            for item in good:
                try:
                    arrays.append(_encode(model, [item], device, autocast_dtype)[0])
                except NonFiniteEncodingError:
                    arrays.append(ENCODER_NOT_FINITE)
                except RuntimeError as error:
                    arrays.append(f"encoding failed: {type(error).__name__}: {error}")
        for item, array in zip(good, arrays, strict=True):
            if isinstance(array, str):
                yield jobs[item.index], None, item.audio_sha256, array
            else:
                yield jobs[item.index], array, item.audio_sha256, ""


def _encode(model: FireflyCodec, items: list[_Loaded], device: torch.device, autocast_dtype) -> list[np.ndarray]:
    from fish_speech_core.threads import one_thread, small_on_cpu

    with torch.inference_mode(), one_thread(small_on_cpu(model, device)):
        if all(item.mel is not None for item in items):
            codes = model.encode_log_mels([item.mel.to(device) for item in items],
                                          [item.audio.shape[-1] for item in items], autocast_dtype)
        else:
            codes = model.encode([item.audio.to(device) for item in items], autocast_dtype=autocast_dtype)
        return [c.to("cpu", torch.int32).numpy() for c in codes]


def extract_codes(
    model: FireflyCodec, audio_paths: Sequence[Path], settings: ExtractSettings | None = None
) -> dict[Path, np.ndarray]:
    """Encode files to codes in memory (no files written, nothing skipped).

    Raises:
        ValueError: listing every file that could not be encoded.
    """
    settings = settings or ExtractSettings(num_workers=0)
    plan = plan_extraction(audio_paths, model, replace(settings, overwrite=True))
    out: dict[Path, np.ndarray] = {}
    errors = [f"{r.audio_path}: {r.reason}" for r in plan.rejected]
    for job, codes, _, error in encode_batches(model, plan.todo, settings):
        if codes is None:
            errors.append(f"{job.audio_path}: {error}")
        else:
            out[job.audio_path] = codes
    if errors:
        raise ValueError("could not encode: " + "; ".join(errors))
    return {Path(p): out[Path(p)] for p in audio_paths}


def write_codes(job: Job, codes: np.ndarray, audio_sha256: str, model_hash: str, settings: dict,
                spec: CodeSpec | None = None) -> None:
    """Atomically write ``x.npy`` then its sidecar (the sidecar is what marks it done).

    ``spec`` (the codec's rows and codebook size) goes into the sidecar, so pack can check the
    array against the codec that made it.
    """
    buffer = io.BytesIO()  # in memory first: small, and a full disk then names the exact size
    np.save(buffer, codes)
    with atomic_write(job.npy_path, size=buffer.getbuffer().nbytes) as handle:
        handle.write(buffer.getbuffer())
    record = {
        "format": SIDECAR_FORMAT,
        "audio": job.audio_path.name,
        "audio_sha256": audio_sha256,
        "codec_hash": model_hash,
        "settings": settings,
        "npy_sha256": sha256_file(job.npy_path),
        "shape": list(codes.shape),
    }
    if spec is not None:
        record |= {"num_codebooks": spec.num_codebooks, "codebook_size": spec.codebook_size}
    with atomic_write(sidecar_path_for(job.npy_path), "w") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")


def _record_spec(npy_path: Path, spec: CodeSpec) -> None:
    """Add the codec's spec to a sidecar written before sidecars carried it (the codec hash
    already matched), so pack can check those codes too without re-encoding them."""
    sidecar = sidecar_path_for(npy_path)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(record, dict) or "num_codebooks" in record:
        return
    record |= {"num_codebooks": spec.num_codebooks, "codebook_size": spec.codebook_size}
    with atomic_write(sidecar, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.write("\n")


def run_extraction(
    model: FireflyCodec,
    plan: ExtractPlan,
    settings: ExtractSettings,
    model_hash: str | None = None,
    on_result: Callable[[FileResult], None] | None = None,
) -> ExtractSummary:
    """Encode ``plan.todo`` and write each ``<stem>.npy`` with its sidecar.

    ``on_result`` is called once per finished file (for progress bars); the summary holds
    every result of the plan, skipped and rejected included.
    """
    model_hash = model_hash or codec_hash(model)
    code_settings = settings.code_settings()
    spec = code_spec(model)
    # Temp files a killed run left beside the audio are never read; clear those of our outputs.
    npys = [job.npy_path for job in plan.todo] + [r.npy_path for r in plan.skipped if r.npy_path]
    remove_temporaries([p for npy in npys for p in (npy, sidecar_path_for(npy))])
    for skipped in plan.skipped:
        if skipped.npy_path is not None:
            _record_spec(skipped.npy_path, spec)
    results: list[FileResult] = [*plan.skipped, *plan.rejected]
    start = time.perf_counter()
    for job, codes, digest, error in encode_batches(model, plan.todo, settings):
        if codes is None:
            # An older sidecar must not vouch for this file any more: a rerun redoes it.
            sidecar_path_for(job.npy_path).unlink(missing_ok=True)
            result = FileResult(job.audio_path, "failed", error, job.seconds)
        else:
            write_codes(job, codes, digest, model_hash, code_settings, spec)
            result = FileResult(job.audio_path, "extracted", "", job.seconds, job.npy_path)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return ExtractSummary(results, time.perf_counter() - start)


def extract(
    model: FireflyCodec,
    audio_paths: Sequence[Path],
    settings: ExtractSettings | None = None,
    on_result: Callable[[FileResult], None] | None = None,
) -> ExtractSummary:
    """Plan and run: the whole incremental extraction of ``audio_paths``."""
    settings = settings or ExtractSettings()
    check_finite_weights(model)
    model_hash = codec_hash(model)
    plan = plan_extraction(audio_paths, model, settings, model_hash)
    return run_extraction(model, plan, settings, model_hash, on_result)


__all__ = [
    "ExtractPlan",
    "ExtractSettings",
    "ExtractSummary",
    "SIDECAR_SUFFIX",
    "check_finite_weights",
    "code_spec",
    "FileResult",
    "Job",
    "encode_batches",
    "extract",
    "extract_codes",
    "make_batches",
    "npy_path_for",
    "plan_extraction",
    "run_extraction",
    "sidecar_path_for",
    "write_codes",
]
