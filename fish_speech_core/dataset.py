"""Finding the items of a dataset: speaker folders of audio + transcript, or a filelist.

Two layouts are accepted, as in Fish Speech:

* folders: ``DATA/<speaker>/<stem>.<wav|flac|mp3|ogg>`` with ``<stem>.lab`` beside it. The
  speaker is the audio file's parent folder name.
* a VITS-style filelist: ``path|speaker|language|text`` lines, paths relative to DATA.

Discovery never decodes audio; it pairs files and refuses paths that leave the root.
Everything it cannot use comes back as a :class:`Rejection` with a reason code.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from fish_speech_core.audio import AUDIO_EXTENSIONS
from fish_speech_core.files import PathEscapeError, has_control_characters, is_temporary, resolve_inside

# Reason codes. They are stable strings: reports, tests and users grep for them.
MISSING_TRANSCRIPT = "missing-transcript"
EMPTY_TRANSCRIPT = "empty-transcript"
TRANSCRIPT_NOT_UTF8 = "transcript-not-utf8"
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

REASONS: dict[str, str] = {
    MISSING_TRANSCRIPT: "audio without a transcript file of the same stem",
    EMPTY_TRANSCRIPT: "transcript is empty, or has no letters or digits after cleaning",
    TRANSCRIPT_NOT_UTF8: "transcript is not valid UTF-8",
    ORPHAN_TRANSCRIPT: "transcript without an audio file of the same stem",
    UNREADABLE_AUDIO: "audio cannot be decoded (corrupt or unsupported)",
    ZERO_LENGTH: "audio has no samples",
    TOO_SHORT: "audio shorter than the loudness block",
    TOO_LONG: "audio longer than --max-seconds",
    SILENT: "audio is silent (integrated loudness is -inf)",
    NON_FINITE: "audio contains NaN or infinite samples",
    AMBIGUOUS: "the same stem exists with several audio extensions",
    PATH_ESCAPES: "path (or symlink target) is outside the data root",
    BAD_NAME: "file or folder name contains control characters",
    MISSING_AUDIO: "filelist names an audio file that does not exist",
    MALFORMED_FILELIST_LINE: "filelist line is not path|speaker|language|text",
    TRANSCRIPT_TOO_LONG: "transcript has more characters than the audio could hold",
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

    def describe(self) -> str:
        return f"{self.rel_path}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _check_name(root: Path, path: Path) -> Rejection | None:
    rel = _rel(root, path)
    if has_control_characters(rel):
        return Rejection(repr(rel)[1:-1], BAD_NAME, "rename it without newlines or control characters")
    try:
        resolve_inside(root, path)
    except PathEscapeError as exc:
        return Rejection(rel, PATH_ESCAPES, str(exc))
    return None


def discover(root: str | os.PathLike, text_extension: str = ".lab") -> tuple[list[Item], list[Rejection]]:
    """Pair audio files with transcripts under ``root`` (folder layout).

    Hidden files and folders (and fishtune's own temporary files) are skipped; other non-audio,
    non-transcript files (``.npy`` codes, notes) are not data and are ignored. Folder symlinks
    are not followed; one that points outside the root is reported.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist or is not a folder")
    text_extension = text_extension.lower()
    groups: dict[tuple[Path, str], dict[str, list[Path]]] = defaultdict(lambda: {"audio": [], "text": []})
    rejections: list[Rejection] = []
    rejected_audio: set[tuple[Path, str]] = set()  # their transcripts are not orphans

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
        for name in sorted(filenames):
            path = folder / name
            if name.startswith(".") or is_temporary(path):
                continue
            suffix = path.suffix.lower()
            kind = "audio" if suffix in AUDIO_EXTENSIONS else "text" if suffix == text_extension else None
            if kind is None:
                continue
            problem = _check_name(root, path)
            if problem:
                rejections.append(problem)
                if kind == "audio":
                    rejected_audio.add((folder, path.stem))
                continue
            groups[(folder, path.stem)][kind].append(path)

    items: list[Item] = []
    for (folder, stem), files in sorted(groups.items()):
        audio, texts = sorted(files["audio"]), files["text"]
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
        if not texts:
            rejections.append(
                Rejection(_rel(root, audio[0]), MISSING_TRANSCRIPT, f"expected {stem}{text_extension}", speaker)
            )
            continue
        items.append(Item(audio[0], _rel(root, audio[0]), speaker, texts[0]))
    return items, sorted(rejections, key=lambda r: r.rel_path)


def read_filelist(
    filelist: str | os.PathLike, root: str | os.PathLike, require_audio: bool = True
) -> tuple[list[Item], list[Rejection]]:
    """Parse ``path|speaker|language|text`` lines; audio paths are relative to ``root``.

    The text after the third ``|`` is the transcript (it may itself contain ``|``).
    ``require_audio=False`` is for stages that only need files derived from the audio
    (pack reads ``<stem>.npy``): a listed audio file that no longer exists is then kept.
    """
    root = Path(root).absolute()
    items: list[Item] = []
    rejections: list[Rejection] = []
    seen: set[str] = set()
    raw = Path(filelist).read_bytes()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"filelist {filelist} is not UTF-8 ({exc})") from None
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{Path(filelist).name}:{number}"
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
            resolved = resolve_inside(root, candidate)
        except PathEscapeError as exc:
            rejections.append(Rejection(path_text, PATH_ESCAPES, str(exc), speaker))
            continue
        # keep the un-resolved location so a symlink inside the root stays addressable by its name
        absolute = candidate if candidate.is_absolute() else root / candidate
        rel = _rel(root, absolute)
        if require_audio and not resolved.is_file():
            rejections.append(Rejection(rel, MISSING_AUDIO, f"line {number}", speaker))
            continue
        if rel in seen:
            rejections.append(Rejection(rel, AMBIGUOUS, f"listed twice (line {number})", speaker))
            continue
        seen.add(rel)
        if not text:
            rejections.append(Rejection(rel, EMPTY_TRANSCRIPT, f"line {number}", speaker))
            continue
        items.append(Item(absolute, rel, speaker or absolute.parent.name, None, text, language or None))
    return items, rejections


def read_transcript(item: Item) -> str:
    """The item's transcript. Raises UnicodeDecodeError for a non-UTF-8 file."""
    if item.text is not None:
        return item.text
    assert item.text_path is not None
    return item.text_path.read_bytes().decode("utf-8-sig")
