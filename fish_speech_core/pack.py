"""Pack transcripts + semantic codes into ``.protos`` shards, byte-identical to Fish Speech 1.4.

One ``TextData`` record per speaker (source "folder", name = folder name) with one ``Sentence``
per item: ``texts = [clean_pack_transcript(transcript)]`` and one ``Semantics`` per codebook row
of ``<stem>.npy``. Groups and items are sorted, so the output depends only on the input files.
Items that cannot be packed are rejected with a reason, never fatal.

Work is split per item across processes; the parent writes records in input order, so any
``num_workers`` gives the same bytes as one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fish_speech_core.codes import DEFAULT_SPEC, array_problem, read_npy, recorded_spec
from fish_speech_core.dataset import NESTED_FOLDER, PATH_ESCAPES, read_filelist, read_regular_bytes
from fish_speech_core.defaults import SHARD_SIZE_MB, TEXT_EXTENSION
from fish_speech_core.files import (
    PathEscapeError,
    is_abandoned,
    is_temporary,
    refuse_overlap,
    require_writable,
    resolve_inside,
    temporary_target,
)
from fish_speech_core.formats.protos import ShardWriter, frame_record
from fish_speech_core.formats.text import clean_pack_transcript, clean_transcript, has_spoken_content
from fish_speech_core.formats.text_data_pb2 import Semantics, Sentence, TextData

CODES_SUFFIX = ".npy"
_SHARD_FILE = re.compile(r"\d{8}\.protos")
_SENTENCE_FIELD = 4  # TextData.sentences
# Items per worker task: big enough to amortise inter-process overhead, small enough to keep
# every worker busy to the end (about 4 tasks per worker). The output never depends on it.
_MIN_ITEMS_PER_TASK, _MAX_ITEMS_PER_TASK = 16, 256
# One worker packs ~2,000-3,000 items/s on a 2-core EPYC, and a pool costs ~30 ms to start and
# feed (bench/pack.py: 28 items run 4x slower with 2 workers than with 1). Below ~0.5 s of work
# per worker that overhead, and competing with the writing parent on few cores, eat the gain.
ITEMS_PER_WORKER = 1000
MAX_DEFAULT_WORKERS = 8


def default_pack_workers(items: int | None, cpus: int) -> int:
    """Worker processes to use when the user gives none: one per ``ITEMS_PER_WORKER`` items,
    at most ``cpus`` and ``MAX_DEFAULT_WORKERS``; ``items=None`` (unknown, e.g. a filelist) -> one
    per CPU."""
    limit = max(1, min(cpus, MAX_DEFAULT_WORKERS))
    return limit if items is None else max(1, min(limit, items // ITEMS_PER_WORKER))


@dataclass(frozen=True)
class PackItem:
    """One utterance to pack: its codes file plus either a transcript file or the text itself."""

    codes: Path
    transcript: Path | None = None
    text: str | None = None
    label: str = ""  # how reports name the item (transcript path or "filelist:LINE")
    root: Path | None = None  # the input folder every file read must stay inside (links included)


@dataclass(frozen=True)
class SpeakerGroup:
    name: str
    items: tuple[PackItem, ...]
    source: str = "folder"


@dataclass(frozen=True)
class Reject:
    item: str
    reason: str


@dataclass(frozen=True)
class PackSummary:
    shards: list[Path]
    speakers: int
    sentences: int
    frames: int
    bytes_written: int
    rejects: list[Reject] = field(default_factory=list)
    removed_stale: list[Path] = field(default_factory=list)


def discover_folder(root: str | os.PathLike, text_extension: str = TEXT_EXTENSION) -> tuple[list[SpeakerGroup], list[Reject]]:
    """Every transcript under ``root`` grouped by speaker folder, all sorted, and the rejects.

    A record is named after the folder holding its items (as the reference packer does), so the
    speakers are ``root`` itself or the folders directly under it. A deeper item
    (``root/alice/s1/x.lab``) is rejected as ``nested-speaker-folder``: named after its own
    folder it would become a speaker ``s1`` shared with ``bob/s1``, never ``alice``.
    Folder symlinks are not followed (as in validation's discovery); file symlinks are listed
    and :func:`encode_item` refuses those whose target leaves ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    by_folder: dict[Path, list[PackItem]] = {}
    rejects: list[Reject] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .fishtune state, hidden folders
        depth = len(Path(dirpath).relative_to(root).parts)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            # not only regular files: a FIFO or a link named x.lab is rejected by name, never skipped
            if path.suffix == text_extension and not is_temporary(path) and not path.is_dir():
                if depth > 1:
                    speaker = Path(dirpath).relative_to(root).parts[0]
                    rejects.append(Reject(str(path), f"{NESTED_FOLDER}: speakers are the folders directly under "
                                          f"{root}; move it into {speaker}/ (or pack {Path(dirpath)} as its own input)"))
                    continue
                item = PackItem(codes=path.with_suffix(CODES_SUFFIX), transcript=path, label=str(path), root=root)
                by_folder.setdefault(path.parent, []).append(item)
    groups = [SpeakerGroup(name=folder.name, items=tuple(items)) for folder, items in sorted(by_folder.items())]
    return groups, rejects


def parse_filelist(filelist: str | os.PathLike, root: str | os.PathLike) -> tuple[list[SpeakerGroup], list[Reject]]:
    """Groups from a VITS-style filelist ``audio_path|speaker|language|text``.

    Parsing and path safety are the dataset module's (one filelist parser for every stage);
    the codes are ``<audio stem>.npy`` beside the audio as listed, and must stay inside
    ``root`` too (a symlinked ``.npy`` may point elsewhere).
    """
    items, rejections = read_filelist(filelist, root, require_audio=False)
    rejects = [Reject(r.rel_path, f"{r.reason}: {r.detail}" if r.detail else r.reason) for r in rejections]
    by_speaker: dict[str, list[PackItem]] = {}
    for item in items:
        codes = item.audio_path.with_suffix(CODES_SUFFIX)
        by_speaker.setdefault(item.speaker, []).append(
            PackItem(codes=codes, text=item.text, label=item.rel_path, root=Path(root))
        )
    groups = [
        SpeakerGroup(name=speaker, items=tuple(sorted(items, key=lambda i: os.path.abspath(i.codes))), source="filelist")
        for speaker, items in sorted(by_speaker.items())
    ]
    return groups, rejects


def load_codes(path: Path) -> np.ndarray:
    """A (num_codebooks, frames) integer array from ``path``, checked against the codec that made
    it (its sidecar) or, without one, the Fish Speech 1.4 shape; ValueError says what is wrong."""
    codes = read_npy(path)  # memory-mapped: a lying header costs no memory
    spec = recorded_spec(path)
    problem = array_problem(codes, spec or DEFAULT_SPEC)
    if problem:
        source = "its sidecar" if spec else "Fish Speech 1.4 codes (no sidecar)"
        raise CodesError(f"{problem} ({source}: {(spec or DEFAULT_SPEC).num_codebooks} rows, "
                         f"values < {(spec or DEFAULT_SPEC).codebook_size})")
    return np.array(codes)  # a copy: the memory map is closed with it


class CodesError(ValueError):
    """A readable ``.npy`` whose array is not codes of the codec that made it."""


def encode_item(item: PackItem) -> tuple[bytes, int] | Reject:
    """The item as an encoded ``TextData.sentences`` field plus its frame count, or a Reject."""
    if item.root is not None:  # checked where the files are read: a link may change after discovery
        for path in (item.transcript, item.codes):
            if path is None or not (path.exists() or path.is_symlink()):
                continue
            try:
                resolve_inside(item.root, path)
            except (PathEscapeError, OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
                return Reject(item.label, f"{PATH_ESCAPES}: {err}")
    if not item.codes.is_file():
        if item.codes.exists():  # a FIFO or device: opening it could block forever
            return Reject(item.label, f"codes {item.codes.name} is not a regular file")
        return Reject(item.label, f"no codes file {item.codes.name} (run `fishtune extract` first)")
    if item.transcript is not None and not item.transcript.is_file():
        return Reject(item.label, f"transcript {item.transcript.name} is not a regular file")
    if item.transcript is not None:
        try:
            text = read_regular_bytes(item.transcript).decode("utf-8")
        except UnicodeDecodeError:
            return Reject(item.label, "transcript is not UTF-8")
        except OSError as err:
            return Reject(item.label, f"transcript unreadable: {err}")
    else:
        text = item.text or ""
    text = clean_transcript(text)  # the same cleaning validate and normalize apply
    if not has_spoken_content(text):
        # validate rejects these as empty-transcript; packing one would train on silence-as-text
        return Reject(item.label, "transcript has no letters or digits after cleaning")
    try:
        codes = load_codes(item.codes)
    except CodesError as err:
        return Reject(item.label, f"bad codes {item.codes.name}: {err}")
    except Exception as err:  # np.load raises many types for damaged files
        return Reject(item.label, f"unreadable codes {item.codes.name}: {err}")
    sentence = Sentence(
        texts=[clean_pack_transcript(text)],
        semantics=[Semantics(values=row.tolist()) for row in codes],
    )
    # Serialized TextData = its scalar fields followed by each sentence as a length-delimited
    # field 4, so encoding sentences separately and concatenating gives the same bytes.
    payload = sentence.SerializeToString()
    return _field_header(_SENTENCE_FIELD, len(payload)) + payload, int(codes.shape[1])


def _encode_chunk(items: Sequence[PackItem]) -> list[tuple[bytes, int] | Reject]:
    return [encode_item(item) for item in items]


def _field_header(number: int, length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _chunks(items: Sequence[PackItem], size: int) -> list[Sequence[PackItem]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def pack(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    text_extension: str = TEXT_EXTENSION,
    num_workers: int = 1,
    shard_size_mb: float = SHARD_SIZE_MB,
    filelist: str | os.PathLike | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> PackSummary:
    """Pack every speaker of ``inputs`` into shards in ``output``.

    Args:
        inputs: data folders (speaker sub-folders with ``<stem>{text_extension}`` + ``<stem>.npy``).
        output: shard folder; stale ``NNNNNNNN.protos`` left from an earlier, bigger pack are removed.
        filelist: read items from this filelist instead of scanning; needs exactly one input.
        on_progress: called with the number of items just finished.

    Raises:
        ValueError / FileNotFoundError: bad arguments (the CLI turns them into messages).
    """
    if not inputs:
        raise ValueError("give at least one input folder")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    # pack deletes stale shards in output: an input folder must never be that folder (OverlapError)
    refuse_overlap([("--input", root) for root in inputs], output, "--output")
    require_writable(output, create=False)  # NotWritableError names it before any work
    groups: list[SpeakerGroup] = []
    rejects: list[Reject] = []
    if filelist is not None:
        if len(inputs) != 1:
            raise ValueError("--filelist needs exactly one --input: the folder its paths are relative to")
        if not Path(inputs[0]).is_dir():
            raise FileNotFoundError(f"{inputs[0]} is not a folder")
        groups, rejects = parse_filelist(filelist, inputs[0])
    else:
        for root in inputs:
            found, nested = discover_folder(root, text_extension)
            groups.extend(found)
            rejects.extend(nested)

    _remove_interrupted_shards(Path(output))
    items = [item for group in groups for item in group.items]
    per_task = -(-len(items) // (4 * num_workers))
    chunks = _chunks(items, min(max(per_task, _MIN_ITEMS_PER_TASK), _MAX_ITEMS_PER_TASK))
    results: Iterable[list[tuple[bytes, int] | Reject]]
    executor = ProcessPoolExecutor(num_workers) if num_workers > 1 and len(chunks) > 1 else None
    try:
        results = executor.map(_encode_chunk, chunks) if executor else map(_encode_chunk, chunks)
        encoded = _flatten(results, on_progress)
        sentences = frames = speakers = 0
        with ShardWriter(output, shard_size_mb) as writer:
            for group in groups:
                parts = []
                for _ in group.items:
                    result = next(encoded)
                    if isinstance(result, Reject):
                        rejects.append(result)
                    else:
                        parts.append(result[0])
                        frames += result[1]
                if not parts:
                    continue  # a TextData without sentences is unreadable: skip the speaker
                header = TextData(source=group.source, name=group.name).SerializeToString()
                writer.write(frame_record(header + b"".join(parts)))
                speakers += 1
                sentences += len(parts)
    finally:
        if executor:
            executor.shutdown(cancel_futures=True)
    # Nothing written (everything rejected): leave an earlier pack in place.
    removed = _remove_stale_shards(Path(output), keep=writer.paths) if writer.paths else []
    return PackSummary(
        shards=writer.paths,
        speakers=speakers,
        sentences=sentences,
        frames=frames,
        bytes_written=writer.bytes_written,
        rejects=rejects,
        removed_stale=removed,
    )


def _flatten(results, on_progress):
    for chunk in results:
        if on_progress:
            on_progress(len(chunk))
        yield from chunk


def _remove_interrupted_shards(output: Path) -> None:
    """Delete the temp shards a killed pack left (hidden, never read: this frees their space)."""
    if output.is_dir():
        for path in output.iterdir():
            target = temporary_target(path)
            # is_abandoned: a concurrent pack into the same folder keeps its temps locked
            if target is not None and _SHARD_FILE.fullmatch(target.name) and path.is_file() and is_abandoned(path):
                path.unlink(missing_ok=True)


def _remove_stale_shards(output: Path, keep: list[Path]) -> list[Path]:
    if not output.is_dir():
        return []
    keep_names = {p.name for p in keep}
    stale = [p for p in sorted(output.iterdir()) if _SHARD_FILE.fullmatch(p.name) and p.name not in keep_names]
    for path in stale:
        path.unlink()
    return stale
