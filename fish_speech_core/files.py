"""Small file-system helpers shared by every stage: atomic writes, hashing, safe paths.

Every output fishtune writes goes through :func:`atomic_write` (or :func:`atomic_path`), so a
crash leaves either the old file or the complete new one, never a half-written file that a
rerun could take for finished work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from fish_speech_core.hashcache import local_file_hash

HASH_CHUNK = 1 << 20  # 1 MiB: streams large audio files without loading them whole


class PathEscapeError(ValueError):
    """A path taken from data resolves outside the root it must stay in."""


class UnresolvablePathError(PathEscapeError):
    """A path that cannot be resolved at all (a symlink loop): it cannot be shown to stay inside."""


# ENOSPC: the file system is full; EDQUOT: the user's quota is; EFBIG: the process's file size
# limit (ulimit -f / RLIMIT_FSIZE) stopped the write.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# EACCES/EPERM: permissions (or a file attribute) forbid it; EROFS: a read-only file system.
NOT_WRITABLE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


class NotWritableError(OSError):
    """A folder fishtune must write into is read-only; the message names the folder."""

    def __str__(self) -> str:
        return self.strerror


def not_writable(err: OSError, folder: str | os.PathLike) -> NotWritableError:
    reason = "the file system is read-only" if err.errno == errno.EROFS else "permission denied"
    return NotWritableError(
        err.errno, f"cannot write into {folder}: {reason}; make it writable or choose another output folder",
        str(folder),
    )


def require_writable(folder: str | os.PathLike, create: bool = True) -> Path:
    """Create ``folder`` if needed and prove a file can be made in it (then removed).

    Called before a stage starts, so a read-only output is one line naming it, not a failure per file.
    ``create=False`` creates nothing: it probes the folder, or its nearest existing parent.

    Raises:
        NotWritableError: naming the folder (or the first parent that could not be created).
    """
    folder = Path(folder)
    probe = folder.absolute()
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            while not probe.exists() and probe.parent != probe:
                probe = probe.parent
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        if err.errno in NOT_WRITABLE_ERRNOS:
            raise not_writable(err, folder) from None
        raise
    return folder


class DiskFullError(OSError):
    """An atomic write ran out of space; the message names the file and the bytes it needs.

    The destination is untouched (an earlier version of it stays intact) and the temporary
    file is removed. ``detail`` is the message without the advice, for callers that add their own.
    """

    def __init__(self, code: int, detail: str, advice: str, path: str) -> None:
        super().__init__(code, f"{detail}. Nothing was written under that name; {advice}", path)
        self.detail = detail
        self.advice = advice

    def __reduce__(self):  # OSError's would call __init__ with (errno, message, path)
        return type(self), (self.errno, self.detail, self.advice, self.filename)

    def __str__(self) -> str:
        return self.strerror  # the message already names the file


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.{1 if unit == 'KiB' else 2}f} {unit} ({n} bytes)"


def _disk_full(err: OSError, target: Path, needed: int, exact: bool) -> DiskFullError:
    try:
        free = f"{_size(shutil.disk_usage(target.parent).free)} free in {target.parent}"
    except OSError:
        free = ""
    # A streaming writer's total is unknown: what it had handed over when the write failed
    # is a lower bound.
    needs = f"it needs {'' if exact else 'at least '}{_size(needed)}" if needed else ""
    if err.errno == errno.EFBIG:
        reason, advice = "the file size limit (ulimit -f) was reached", "raise the limit and rerun"
    elif err.errno == errno.EDQUOT:
        reason, advice = "the disk quota is exceeded", "free some space and rerun"
    else:
        reason, advice = "no space left on the device", "free some space and rerun"
    facts = "; ".join(part for part in (needs, free) if part)
    detail = f"cannot write {target}: {reason}" + (f" ({facts})" if facts else "")
    return DiskFullError(err.errno, detail, advice, str(target))


class _CountingWriter:
    """A file handle that counts what is handed to ``write`` (bytes; text as UTF-8)."""

    def __init__(self, handle: IO) -> None:
        self._handle = handle
        self.count = 0

    def write(self, data) -> int:
        self.count += len(data.encode("utf-8")) if isinstance(data, str) else memoryview(data).nbytes
        return self._handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def sha256_file(path: str | os.PathLike, chunk_size: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in chunks.

    Memoized by the file's stamp (size, mtime, ctime, inode; :mod:`fish_speech_core.hashcache`),
    within the process and across processes: an unchanged file is read once.
    """
    def read(file: Path) -> str:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            while block := handle.read(chunk_size):
                digest.update(block)
        return digest.hexdigest()

    return local_file_hash(path, read)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


NAME_MAX = 255  # bytes in one file name on Linux/macOS file systems
_TEMPORARY_EXTRA = len(".") + len(".") + 8 + len(".tmp")  # what atomic_path adds to a name


def _temporary_prefix(target: Path) -> str:
    """``.<stem>.``, the stem cut (at a character boundary) so the temporary name fits NAME_MAX.

    A target name near the limit is legal; our temporary beside it must be too. A cut name still
    reads as a temporary (:func:`is_temporary`), only :func:`temporary_target` cannot map it back.
    """
    room = NAME_MAX - _TEMPORARY_EXTRA - len(os.fsencode(target.suffix))
    stem = target.stem
    while len(os.fsencode(stem)) > room and stem:
        stem = stem[:-1]
    return f".{stem}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``path`` on success.

    For writers that want a file name rather than a handle (soundfile, torch.save, numpy).
    The temporary name keeps the final suffix so format detection by extension still works.
    On any exception the temporary file is removed and ``path`` is left untouched.

    Args:
        size: bytes the caller is about to write, when known (only used in the error).

    Raises:
        DiskFullError: the disk, a quota or the file size limit ran out, naming ``path``
            and the space it needs.
    """
    target = Path(path)
    tmp: Path | None = None
    fd: int | None = None
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                dir=target.parent, prefix=_temporary_prefix(target), suffix=f".tmp{target.suffix}"
            )
        except OSError as err:  # only here: the caller's own reads may raise PermissionError too
            if err.errno in NOT_WRITABLE_ERRNOS:
                raise not_writable(err, target.parent) from None
            raise
        # Held until the rename: it tells another process's sweep this temp is in flight. The
        # kernel drops it when we die, so a killed writer's temp is sweepable (is_abandoned).
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; published files are readable like any other
        yield tmp
        with open(tmp, "rb+") as handle:  # make the bytes durable before the rename publishes them
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        written = 0
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = tmp.stat().st_size
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, DiskFullError) and err.errno in NO_SPACE_ERRNOS:
            raise _disk_full(err, target, written if size is None else size, exact=size is not None) from err
        raise
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", size: int | None = None) -> Iterator[IO]:
    """Open a temporary file for writing and rename it onto ``path`` when the block succeeds.

    ``size`` and the :class:`DiskFullError` on a full disk are as for :func:`atomic_path`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', not {mode!r}")
    counter: _CountingWriter | None = None
    try:
        with atomic_path(path, size) as tmp:
            encoding = None if "b" in mode else "utf-8"
            with open(tmp, mode, encoding=encoding) as handle:
                counter = _CountingWriter(handle)
                yield counter
    except DiskFullError as err:
        # Buffered writes often fail only at close, with nothing on disk yet: the bytes handed
        # to write() say better how much room the file needs.
        if size is None and counter is not None and counter.count > 0:
            raise _disk_full(err, Path(path), counter.count, exact=False) from err.__cause__
        raise


def is_abandoned(path: str | os.PathLike) -> bool:
    """True for an :func:`atomic_path` temporary whose writer is gone (no process holds its lock).

    Sweeps delete only these: another process writing into the same folder keeps its temp
    locked until it renames it, so a second run never deletes the first one's work in flight.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # gone already, a symlink, or unreadable: not ours to delete
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's lock at once


def is_temporary(path: Path) -> bool:
    """True for the leftovers of an interrupted :func:`atomic_path` (never real inputs)."""
    return path.name.startswith(".") and ".tmp" in path.name


# ".<stem>.<8 random chars from mkstemp>.tmp<suffix>", as atomic_path names its temp files
_TEMPORARY_RE = re.compile(r"^\.(?P<stem>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]*)?$")


def temporary_target(path: Path) -> Path | None:
    """The file an :func:`atomic_path` temporary would have become, or None for other files."""
    match = _TEMPORARY_RE.match(path.name)
    if match is None:
        return None
    return path.with_name(match["stem"] + (match["suffix"] or ""))


def remove_temporaries(targets: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete what killed writes of ``targets`` left behind (their temp files); return them.

    Only temporaries whose final name is one of ``targets`` are touched; each folder is listed once.
    """
    wanted: dict[Path, set[Path]] = {}
    for target in targets:
        target = Path(target)
        wanted.setdefault(target.parent, set()).add(target)
    removed = []
    for folder, names in wanted.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_file(follow_symlinks=False) and temporary_target(path) in names and is_abandoned(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def resolve_inside(root: str | os.PathLike, candidate: str | os.PathLike) -> Path:
    """Resolve ``candidate`` (relative to ``root`` unless absolute) and require it inside ``root``.

    Symlinks are followed, so a link whose target leaves the root is refused as well.

    Raises:
        PathEscapeError: naming the path and where it resolves to.
    """
    root_resolved = Path(root).resolve()
    path = Path(candidate)
    if not path.is_absolute():
        path = Path(root) / path
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError) as err:  # Python 3.11-3.12 raise RuntimeError for a loop
        raise UnresolvablePathError(f"{candidate} cannot be resolved (symlink loop): {err}") from None
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise PathEscapeError(f"{candidate} resolves to {resolved}, outside {root_resolved}")
    return resolved


class OverlapError(ValueError):
    """An output folder is, is inside, or contains one of the inputs: writing it could touch them."""


def refuse_overlap(
    inputs: Iterable[tuple[str, str | os.PathLike | None]], output: str | os.PathLike, output_label: str = "OUTPUT"
) -> None:
    """Refuse an output that equals, lies inside, or contains any input (inputs are never written).

    ``inputs`` are ``(label, path)`` pairs (folders or files; ``None`` paths are skipped); labels
    name the flag or argument in the message.
    Paths are compared resolved, so a symlinked output that lands in an input is refused too.

    Raises:
        OverlapError: one line naming both paths.
    """
    dst = Path(output).resolve()
    for label, path in inputs:
        if path is None:
            continue
        src = Path(path).resolve()
        if src == dst:
            kind = "file" if src.is_file() else "folder"
            problem = f"{output_label} {output} is the {label} {kind} {path}"
        elif src in dst.parents:
            problem = f"{output_label} {output} is inside {label} {path}"
        elif dst in src.parents:
            problem = f"{label} {path} is inside {output_label} {output}"
        else:
            continue
        raise OverlapError(f"{problem}; choose a separate folder (inputs are never modified)")


def has_control_characters(text: str) -> bool:
    """Newlines, tabs and other control characters never belong in a file or folder name."""
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically; the same object gives the same bytes anywhere.

    Given a file name, torch.save names the zip archive's records after it (here the temp file's
    random name), so two writes of equal tensors differ in bytes and in every hash keyed on them.
    Given an open stream it always writes the fixed record prefix ``archive``, streaming as before.
    """
    import torch  # lazily: the rest of this module serves torch-free callers

    with atomic_write(path) as handle:
        torch.save(obj, handle)
