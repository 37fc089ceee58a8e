"""Finding the items of a dataset: speaker folders of audio + transcript, or a filelist.

Two layouts are accepted, as in Fish Speech:

* folders: ``DATA/<speaker>/<stem>.<wav|flac|mp3|ogg>`` with ``<stem>.lab`` beside it. The
  speaker is the audio file's parent folder name, and that folder must sit directly under DATA:
  ``DATA/alice/s1/x.wav`` is rejected (``nested-speaker-folder``), never guessed or merged
  with ``DATA/bob/s1/``. Files directly in DATA belong to a speaker named after DATA.
* a VITS-style filelist: ``path|speaker|language|text`` lines, paths relative to DATA.

Discovery never decodes audio and never opens anything but a regular file (a FIFO named
``x.lab`` would block forever); it pairs files and refuses paths that leave the root, broken
or looping symlinks and names that are not valid UTF-8. Everything it cannot use comes back
as a :class:`Rejection` with a reason code.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from fish_speech_core.audio import AUDIO_EXTENSIONS, UNSUPPORTED_AUDIO_EXTENSIONS
from fish_speech_core.defaults import TEXT_EXTENSION
from fish_speech_core.files import (
    PathEscapeError,
    UnresolvablePathError,
    has_control_characters,
    is_temporary,
    resolve_inside,
)
from fish_speech_core.formats.text import clean_transcript

# Reason codes. They are stable strings: reports, tests and users grep for them.
MISSING_TRANSCRIPT = "missing-transcript"
EMPTY_TRANSCRIPT = "empty-transcript"
TRANSCRIPT_NOT_UTF8 = "transcript-not-utf8"
UNREADABLE_TRANSCRIPT = "unreadable-transcript"
ORPHAN_TRANSCRIPT = "orphan-transcript"
UNREADABLE_AUDIO = "unreadable-audio"
ZERO_LENGTH = "zero-length-audio"
TOO_SHORT = "too-short"
TOO_LONG = "too-long"
SILENT = "silent-audio"
NON_FINITE = "non-finite-samples"
AMBIGUOUS = "ambiguous-stem"
PATH_ESCAPES = "path-escapes-root"
BAD_NAME = "bad-file-name"
MISSING_AUDIO = "missing-audio"
MALFORMED_FILELIST_LINE = "malformed-filelist-line"
TRANSCRIPT_TOO_LONG = "transcript-too-long"
BROKEN_SYMLINK = "broken-symlink"
NOT_REGULAR_FILE = "not-a-regular-file"
UNSUPPORTED_AUDIO = "unsupported-audio-format"
NESTED_FOLDER = "nested-speaker-folder"
FILELIST_NOT_UTF8 = "filelist-line-not-utf8"
SAMPLE_RATE_TOO_LOW = "sample-rate-too-low"
TOO_MANY_CHANNELS = "too-many-channels"
NO_SPEECH_BAND = "no-speech-band-content"

REASONS: dict[str, str] = {
    MISSING_TRANSCRIPT: "audio without a transcript file of the same stem",
    EMPTY_TRANSCRIPT: "transcript is empty, or has no letters or digits after cleaning",
    TRANSCRIPT_NOT_UTF8: "transcript is not valid UTF-8",
    UNREADABLE_TRANSCRIPT: "transcript cannot be read (permissions, or replaced by a non-file)",
    ORPHAN_TRANSCRIPT: "transcript without an audio file of the same stem",
    UNREADABLE_AUDIO: "audio cannot be decoded (corrupt or unsupported)",
    ZERO_LENGTH: "audio has no samples",
    TOO_SHORT: "audio shorter than the loudness block",
    TOO_LONG: "audio longer than --max-seconds",
    SILENT: "audio is silent (integrated loudness is -inf)",
    NON_FINITE: "audio contains NaN or infinite samples",
    AMBIGUOUS: "the same stem exists with several audio extensions, or several transcripts (w.lab, w.LAB)",
    PATH_ESCAPES: "path (or symlink target) is outside the data root",
    BAD_NAME: "file or folder name contains control characters",
    MISSING_AUDIO: "filelist names an audio file that does not exist",
    MALFORMED_FILELIST_LINE: "filelist line is not path|speaker|language|text",
    TRANSCRIPT_TOO_LONG: "transcript has more characters than the audio could hold",
    BROKEN_SYMLINK: "symlink whose target does not exist, or a symlink loop",
    NOT_REGULAR_FILE: "a FIFO, socket or device named like data (never opened)",
    UNSUPPORTED_AUDIO: "audio in a format fishtune does not read (.opus, .m4a, .aiff, ...): convert it",
    NESTED_FOLDER: "audio deeper than DATA/<speaker>/: speakers are the folders directly under DATA",
    FILELIST_NOT_UTF8: "filelist line is not valid UTF-8",
    SAMPLE_RATE_TOO_LOW: "sample rate below 8 kHz: too low for speech",
    TOO_MANY_CHANNELS: "more channels than BS.1770 loudness measures (5): downmix it",
    NO_SPEECH_BAND: "almost no energy between 80 Hz and 4 kHz (DC, rumble or ultrasound only)",
}


@dataclass(frozen=True)
class Item:
    """One audio file with its transcript, before any audio check."""

    audio_path: Path  # absolute
    rel_path: str  # relative to the root, '/'-separated: the stable identity of the item
    speaker: str
    text_path: Path | None  # folder layout: the transcript file
    text: str | None = None  # filelist layout: the transcript inline
    language: str | None = None


@dataclass(frozen=True)
class Rejection:
    rel_path: str
    reason: str  # one of the reason codes above
    detail: str = ""
    speaker: str = ""

    def __post_init__(self) -> None:
        # A detail may quote a name from the file system (a link target, a resolved path): keep
        # every field writable by the UTF-8 reports, however the name was spelled.
        for name in ("rel_path", "detail", "speaker"):
            value = getattr(self, name)
            if not _is_utf8(value):
                object.__setattr__(self, name, printable(value))

    def describe(self) -> str:
        return f"{self.rel_path}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def printable(name: str) -> str:
    """A file name as reports show it: bytes that are not UTF-8 as ``\\xe9``, controls as ``\\n``.

    Names from the file system carry undecodable bytes as lone surrogates, which no UTF-8
    writer (Parquet, JSON, the terminal) accepts; every report names files this way.
    """
    shown = os.fsencode(name).decode("utf-8", "backslashreplace")
    return repr(shown)[1:-1] if has_control_characters(shown) else shown


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_name(root: Path, path: Path) -> Rejection | None:
    rel = _rel(root, path)
    if not _is_utf8(rel):
        return Rejection(printable(rel), BAD_NAME, "the name is not valid UTF-8; rename it")
    if has_control_characters(rel):
        return Rejection(printable(rel), BAD_NAME, "rename it without newlines or control characters")
    try:
        resolve_inside(root, path)
    except UnresolvablePathError:
        return Rejection(rel, BROKEN_SYMLINK, "symlink loop")
    except PathEscapeError as exc:
        return Rejection(rel, PATH_ESCAPES, str(exc))
    return None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def check_regular_file(path: Path, rel: str) -> Rejection | None:
    """None if ``path`` (links followed) is a regular file; else why not. Never opens it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        target = os.readlink(path) if path.is_symlink() else ""
        detail = f"points to {printable(target)}, which does not exist" if target else "vanished"
        return Rejection(rel, BROKEN_SYMLINK, detail)
    except OSError as exc:
        reason = BROKEN_SYMLINK if exc.errno == errno.ELOOP else NOT_REGULAR_FILE
        return Rejection(rel, reason, exc.strerror or str(exc))
    if not stat.S_ISREG(mode):
        return Rejection(rel, NOT_REGULAR_FILE, f"{_file_kind(mode)}; only regular files are read")
    return None


def read_regular_bytes(path: Path) -> bytes:
    """The bytes of a regular file, refusing anything else without blocking on it.

    ``O_NONBLOCK`` makes opening a FIFO return at once; ``fstat`` on the open handle then checks
    what was opened (not what the name pointed to a moment earlier).

    Raises:
        OSError: unreadable, or not a regular file (``EINVAL``, naming what it is).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{_file_kind(mode)}, not a regular file", str(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def discover(root: str | os.PathLike, text_extension: str = TEXT_EXTENSION) -> tuple[list[Item], list[Rejection]]:
    """Pair audio files with transcripts under ``root`` (folder layout).

    Hidden files and folders (and fishtune's own temporary files) are skipped; other non-audio,
    non-transcript files (``.npy`` codes, notes) are not data and are ignored, except audio in
    a format fishtune cannot read, which is reported. Folder symlinks are not followed; one
    that points outside the root is reported. Extensions are compared case-insensitively.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist or is not a folder")
    text_extension = text_extension.lower()
    groups: dict[tuple[Path, str], dict[str, list[Path]]] = defaultdict(lambda: {"audio": [], "text": []})
    rejections: list[Rejection] = []
    rejected_audio: set[tuple[Path, str]] = set()  # their transcripts are not orphans
    nested_texts: list[Path] = []

    def reject(problem: Rejection, folder: Path, stem: str, kind: str) -> None:
        if not problem.speaker:  # the speaker folder it sits in, so per-speaker counts add up
            parts = folder.relative_to(root).parts
            problem = replace(problem, speaker=printable(parts[0] if parts else root.name))
        rejections.append(problem)
        if kind == "audio":
            rejected_audio.add((folder, stem))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        folder = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            sub = folder / name
            if sub.is_symlink():
                problem = _check_name(root, sub)
                if problem:
                    rejections.append(problem)
                continue  # inside-root links would only duplicate folders we already walk
            kept.append(name)
        dirnames[:] = kept
        nested = len(folder.relative_to(root).parts) > 1
        for name in sorted(filenames):
            path = folder / name
            if name.startswith(".") or is_temporary(path):
                continue
            suffix = path.suffix.lower()
            if suffix in AUDIO_EXTENSIONS:
                kind = "audio"
            elif suffix == text_extension:
                kind = "text"
            elif suffix in UNSUPPORTED_AUDIO_EXTENSIONS:
                kind = "unsupported"
            else:
                continue
            rel = _rel(root, path)
            problem = _check_name(root, path) or check_regular_file(path, rel)
            if problem is None and kind == "unsupported":
                problem = Rejection(rel, UNSUPPORTED_AUDIO, f"{path.suffix} is not read; convert it to "
                                    ".wav or .flac", folder.name)
            if problem is None and nested:
                if kind == "text":  # reported with its audio, or below when it has none
                    nested_texts.append(path)
                    continue
                top = folder.relative_to(root).parts[0]
                problem = Rejection(rel, NESTED_FOLDER, f"in {_rel(root, folder)}/: speaker folders must sit "
                                    "directly under the data root (move it up, or make it a speaker folder)", top)
            if problem:
                reject(problem, folder, path.stem, "audio" if kind == "unsupported" else kind)
                continue
            groups[(folder, path.stem)][kind].append(path)
    for path in nested_texts:
        if (path.parent, path.stem) not in rejected_audio:
            top = path.parent.relative_to(root).parts[0]
            rejections.append(Rejection(_rel(root, path), NESTED_FOLDER, f"in {_rel(root, path.parent)}/: "
                                        "speaker folders must sit directly under the data root", top))

    items: list[Item] = []
    for (folder, stem), files in sorted(groups.items()):
        audio, texts = sorted(files["audio"]), sorted(files["text"])
        speaker = folder.name
        if not audio:
            if (folder, stem) in rejected_audio:
                continue
            for text in texts:
                rejections.append(Rejection(_rel(root, text), ORPHAN_TRANSCRIPT, REASONS[ORPHAN_TRANSCRIPT], speaker))
            continue
        if len(audio) > 1:
            names = ", ".join(p.name for p in audio)
            for path in audio:
                rejections.append(Rejection(_rel(root, path), AMBIGUOUS, f"{names}: keep one", speaker))
            continue
        if len(texts) > 1:  # w.lab beside w.LAB: which one is the transcript is a guess
            names = ", ".join(p.name for p in texts)
            rejections.append(Rejection(_rel(root, audio[0]), AMBIGUOUS, f"transcripts {names}: keep one", speaker))
            continue
        if not texts:
            rejections.append(
                Rejection(_rel(root, audio[0]), MISSING_TRANSCRIPT, f"expected {stem}{text_extension}", speaker)
            )
            continue
        items.append(Item(audio[0], _rel(root, audio[0]), speaker, texts[0]))
    return items, sorted(rejections, key=lambda r: r.rel_path)


def _filelist_lines(filelist: Path) -> list[tuple[int, str | None, str]]:
    """``(line number, text or None if not UTF-8, why not)`` for each line of a filelist.

    Lines are split on the bytes (``\\n``, ``\\r\\n``, ``\\r``) so numbers match an editor's, and
    decoded one by one: in a Latin-1 file the ASCII lines (the same in both) stay usable.
    """
    lines = []
    for number, raw in enumerate(read_regular_bytes(filelist).splitlines(), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            lines.append((number, raw.decode("utf-8"), ""))
        except UnicodeDecodeError as exc:
            lines.append((number, None, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}; save the "
                          "filelist as UTF-8"))
    return lines


def read_filelist(
    filelist: str | os.PathLike, root: str | os.PathLike, require_audio: bool = True
) -> tuple[list[Item], list[Rejection]]:
    """Parse ``path|speaker|language|text`` lines; audio paths are relative to ``root``.

    The text after the third ``|`` is the transcript (it may itself contain ``|``).
    ``require_audio=False`` is for stages that only need files derived from the audio
    (pack reads ``<stem>.npy``): a listed audio file that no longer exists is then kept.
    A line that is not valid UTF-8 is rejected (``filelist-line-not-utf8``, named
    ``<filelist>:<line>``); the other lines are used.

    Raises:
        ValueError: the filelist itself cannot be read (or is not a regular file), naming it.
    """
    root = Path(root).absolute()
    items: list[Item] = []
    rejections: list[Rejection] = []
    seen: set[str] = set()
    try:
        lines = _filelist_lines(Path(filelist))
    except OSError as exc:
        raise ValueError(f"cannot read filelist {printable(str(filelist))}: {exc.strerror or exc}") from None
    for number, line, why in lines:
        where = f"{printable(Path(filelist).name)}:{number}"
        if line is None:
            rejections.append(Rejection(where, FILELIST_NOT_UTF8, why))
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("|", 3)
        if len(parts) != 4:
            rejections.append(Rejection(where, MALFORMED_FILELIST_LINE, f"{len(parts)} fields in {line[:80]!r}"))
            continue
        path_text, speaker, language, text = (p.strip() for p in parts)
        if has_control_characters(path_text) or has_control_characters(speaker):
            rejections.append(Rejection(where, BAD_NAME, "control characters in path or speaker"))
            continue
        candidate = Path(path_text)
        try:
            resolve_inside(root, candidate)
        except UnresolvablePathError:
            rejections.append(Rejection(path_text, BROKEN_SYMLINK, f"symlink loop (line {number})", speaker))
            continue
        except PathEscapeError as exc:
            rejections.append(Rejection(path_text, PATH_ESCAPES, str(exc), speaker))
            continue
        # keep the un-resolved location so a symlink inside the root stays addressable by its name
        absolute = candidate if candidate.is_absolute() else root / candidate
        rel = _rel(root, absolute)
        if require_audio:
            if absolute.suffix.lower() in UNSUPPORTED_AUDIO_EXTENSIONS:
                rejections.append(Rejection(rel, UNSUPPORTED_AUDIO, f"{absolute.suffix} is not read; convert it to "
                                            f".wav or .flac (line {number})", speaker))
                continue
            if not os.path.lexists(absolute):
                rejections.append(Rejection(rel, MISSING_AUDIO, f"line {number}", speaker))
                continue
            problem = check_regular_file(absolute, rel)
            if problem:
                rejections.append(Rejection(rel, problem.reason, f"{problem.detail} (line {number})", speaker))
                continue
        if rel in seen:
            rejections.append(Rejection(rel, AMBIGUOUS, f"listed twice (line {number})", speaker))
            continue
        seen.add(rel)
        if not clean_transcript(text).strip():
            rejections.append(Rejection(rel, EMPTY_TRANSCRIPT, f"line {number}", speaker))
            continue
        items.append(Item(absolute, rel, speaker or absolute.parent.name, None, text, language or None))
    return items, rejections


def read_transcript(item: Item) -> str:
    """The item's transcript, cleaned by :func:`clean_transcript` (the one cleaning every stage uses).

    Raises:
        UnicodeDecodeError: the file is not UTF-8.
        OSError: unreadable, or not a regular file (never blocks on a FIFO).
    """
    if item.text is not None:
        return clean_transcript(item.text)
    assert item.text_path is not None
    return clean_transcript(read_regular_bytes(item.text_path).decode("utf-8"))
