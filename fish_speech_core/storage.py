"""Artifact storage on one root URL (a local folder or ``s3://bucket/prefix``) through fsspec.

Layout: ``<root>/<stage>/<key>/...`` where ``key`` is the sha256 of the stage's input content,
its parameters and the code version, so equal inputs always name the same artifact. A stage
writes its files first and a ``_COMPLETE.json`` marker (file list + sha256 of each) last: an
artifact without the marker is unfinished and never used. Run manifests live under
``<root>/runs/<run_id>/``.

Credentials and endpoints never pass through here: s3fs reads them from the standard AWS
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, IAM roles).
No Prefect import: this module is plain fsspec.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import posixpath
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from fish_speech_core import hashcache
from fish_speech_core.files import HASH_CHUNK, PathEscapeError, atomic_path, atomic_write, resolve_inside, sha256_file

DEFAULT_ROOT = "./fishtune-store"
MARKER = "_COMPLETE.json"
RUNS = "runs"
T = TypeVar("T")


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or does not match its marker."""


# ---------------------------------------------------------------- retries (I/O only)

# The one per-call retry layer of storage I/O (docs/orchestration.md, Retries): botocore makes a
# single attempt (BOTOCORE_RETRIES) and no Prefect task retries a storage call on top.
IO_ATTEMPTS = 4
IO_BACKOFF = 0.5  # seconds before the 2nd attempt; doubled each time, plus up to 25 % jitter
# Transient I/O failures worth retrying. Not ValueError/KeyError: those are our bugs or bad data.
RETRYABLE: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)
# Network errors of the S3 stack that are not OSError subclasses, matched by class name so this
# module needs neither botocore nor aiohttp installed.
TRANSIENT_NAMES = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError", "ServerDisconnectedError"}
)
_log = logging.getLogger(__name__)


def is_transient(exc: BaseException, retry_on: tuple[type[BaseException], ...] = RETRYABLE) -> bool:
    if isinstance(exc, FileNotFoundError):
        return False  # a missing object does not appear by waiting
    return isinstance(exc, retry_on) or any(cls.__name__ in TRANSIENT_NAMES for cls in type(exc).__mro__)


def retry_io(
    fn: Callable[[], T],
    attempts: int = IO_ATTEMPTS,
    backoff: float = IO_BACKOFF,
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, at most ``attempts`` times, sleeping ``backoff * 2**i`` (+ jitter).

    For storage calls only: never wrap training or other compute in this.
    ``FileNotFoundError`` is never retried (a missing object does not appear by waiting); the last
    error is raised as it is.
    """
    import tenacity

    def note(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        _log.warning("storage call failed (%s: %s); attempt %d of %d in %.1f s", type(error).__name__,
                     redact_text(str(error)), state.attempt_number + 1, attempts, state.upcoming_sleep)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=backoff, exp_base=2) + tenacity.wait_random(0, 0.25 * backoff),
        retry=tenacity.retry_if_exception(lambda exc: is_transient(exc, retry_on)),
        sleep=sleep, before_sleep=note, reraise=True,
    )
    return retrying(fn)


# ---------------------------------------------------------------- URLs


def redact(url: str) -> str:
    """``url`` without user info (``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``) or query string."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # plain local path (or a Windows drive letter)
        return url
    # A secret holding '/' ends the netloc early (s3://KEY:SE/CRET@bucket): the text rule sees it.
    parts = urlsplit(redact_text(url))
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# scheme://user[:password]@ inside any text (an exception message, a log line): the user info goes,
# up to the token's last '@' (secrets may hold '/'; redacting too much is the safe side).
_USERINFO_IN_TEXT = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^\s'\"]+@)")


def redact_text(text: str) -> str:
    """``text`` with the user info of every URL in it replaced by ``***`` (errors echo URLs)."""
    return _USERINFO_IN_TEXT.sub(lambda m: m.group("scheme") + "***@", str(text))


class CredentialsInURLError(ValueError):
    """A URL carries credentials (user info, or a secret in its query string)."""


# Query parameters that carry secrets (presigned URLs, "?access_key=..."): any name containing one.
_SECRET_QUERY = re.compile(r"(key|secret|token|signature|password|credential)", re.IGNORECASE)
CREDENTIALS_ADVICE = (
    "credentials never go in a URL (they would end up in logs and run records): set them in the standard "
    "AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or use a profile (AWS_PROFILE)"
)


def refuse_credentials(url: str, flag: str = "") -> str:
    """``url`` unchanged, or :class:`CredentialsInURLError` when it carries credentials.

    The message shows the URL redacted, never the secret. ``flag`` names the option that took it.
    """
    url = str(url)
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1 or parts.scheme == "file":
        return url  # a local path: an '@' in it is part of a folder name
    query_names = [pair.split("=", 1)[0] for pair in parts.query.split("&") if pair]
    before_at = url.split("://", 1)[-1].rpartition("@")[0]
    # user info ends at the last '@'; a secret may hold '/', so "KEY:SE/CRET@" counts too, while an
    # object key with an '@' in it (s3://bucket/take@2/) does not
    userinfo = bool(before_at) and ("/" not in before_at or ":" in before_at)
    if userinfo or any(_SECRET_QUERY.search(name) for name in query_names):
        where = f"{flag} " if flag else ""
        part = "" if userinfo else " in its query string"
        raise CredentialsInURLError(f"{where}{redact(url)} carries credentials{part}; {CREDENTIALS_ADVICE}")
    return url


def is_local(url: str) -> bool:
    scheme = urlsplit(str(url)).scheme
    return scheme in ("", "file") or len(scheme) == 1


def local_path(url: str) -> Path:
    """The filesystem path of a local URL (``file://`` or a plain path)."""
    if not is_local(url):
        raise ValueError(f"{redact(url)} is not a local path")
    return Path(url[len("file://"):] if str(url).startswith("file://") else url).expanduser().absolute()


def normalize_url(url: str) -> str:
    """Local paths become absolute; remote URLs lose a trailing slash."""
    url = str(url)
    return str(local_path(url)) if is_local(url) else url.rstrip("/")


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *(p.strip("/") for p in parts))


# botocore's default (legacy mode, 5 attempts) takes ~9 s to give up on one call to a dead endpoint,
# and retry_io would retry that call again. retry_io is the one retry layer, so botocore makes one
# attempt per call, unless the user configured botocore's retries in the environment (then those
# rule, and retry_io still wraps each call). s3fs keeps its own narrow retry of failures in the
# middle of a transfer (read timeouts, dropped bodies, SlowDown); it cannot be set per instance
# without also changing the instance Prefect's result storage shares, see docs/orchestration.md.
BOTOCORE_RETRIES = {"mode": "standard", "total_max_attempts": 1}


def s3_options() -> dict:
    """fsspec options for s3 URLs (never credentials: those stay in the AWS environment)."""
    if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return {}
    return {"config_kwargs": {"retries": dict(BOTOCORE_RETRIES)}}


def filesystem(url: str):
    """``(fs, path)`` for a URL; remote credentials come from the environment only."""
    import fsspec

    refuse_credentials(url)  # every remote read and write passes here
    options = s3_options() if str(url).startswith(("s3://", "s3a://")) else {}
    return fsspec.core.url_to_fs(url, **options)


# ---------------------------------------------------------------- hashing


def hash_stream(handle, chunk_size: int = HASH_CHUNK) -> str:
    digest = hashlib.sha256()
    while block := handle.read(chunk_size):
        digest.update(block)
    return digest.hexdigest()


def hash_url(url: str) -> str:
    """sha256 of one file's bytes (local paths and s3:// alike), read once per content.

    Memoized by the file's stamp (local: size, mtime, ctime, inode; remote: size and ETag), so
    an unchanged file is not read again by this process or the next (:mod:`fish_speech_core.hashcache`).
    """
    if is_local(url):
        return retry_io(lambda: sha256_file(local_path(url)))
    fs, path = filesystem(url)

    def read() -> str:
        fs.invalidate_cache(path)  # a cached listing could hold an old ETag
        info = fs.info(path)
        return _hash_remote(fs, path, _remote_key(url), _remote_stamp(info))[0]

    return retry_io(read)


def _remote_key(url: str) -> str:
    # The endpoint is part of the key: two S3-compatible services may hold one bucket name.
    return f"url:{os.environ.get('AWS_ENDPOINT_URL', '')}|{normalize_url(url)}"


def _remote_stamp(info: Mapping[str, Any] | None) -> str | None:
    """size + ETag (S3 gives every write a new ETag), or None when the store reports no ETag."""
    info = info or {}
    etag, size = info.get("ETag") or info.get("etag"), info.get("size")
    return f"{size}:{etag}" if etag and size is not None else None


def _hash_remote(fs, path: str, key: str, stamp: str | None) -> tuple[str, str | None]:
    """``(sha256, stamp of the bytes read)`` of one remote object; memoized when ``stamp`` is known."""
    memo = hashcache.memo()
    if stamp is not None and (hit := memo.get(key, stamp)) is not None:
        return hit, stamp
    with fs.open(path, "rb") as handle:
        sha = hash_stream(handle)
        # s3fs reads with IfMatch on the ETag it opened with: these details describe these bytes.
        read_stamp = _remote_stamp(getattr(handle, "details", None))
    if read_stamp is not None:
        memo.put(key, read_stamp, sha)
    return sha, read_stamp


def _walk_local(root: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Files under a local folder: ``(listed, other links)``, hidden entries skipped.

    A file symlink whose target stays inside ``root`` is listed like a regular file, described by
    its target (so its content is what gets hashed and mirrored); fsspec would skip it. Links
    that leave the root, dangle, loop or point at folders are never data (discovery refuses or
    ignores them): they come back separately as relative path -> link text, for keys only.
    """
    listed: dict[str, dict] = {}
    links: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        folder = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in [*filenames, *(d for d in dirnames if (folder / d).is_symlink())]:
            path = folder / name
            if name.startswith("."):
                continue
            rel = path.relative_to(root).as_posix()
            try:
                is_link = path.is_symlink()
                if is_link:
                    target = resolve_inside(root, path)
                    if not target.is_file():
                        raise PathEscapeError(f"{path} is not a file")
                else:
                    target = path
                st = target.stat()
                if not stat.S_ISREG(st.st_mode):
                    continue  # FIFOs, sockets, devices: not content
                link = path.lstat()
                mtime = max(st.st_mtime, link.st_mtime)  # a re-pointed link is a change
            except (PathEscapeError, OSError, RuntimeError):  # RuntimeError: a symlink loop
                with contextlib.suppress(OSError):
                    links[rel] = os.readlink(path)
                continue
            listed[rel] = {"name": str(path), "size": st.st_size, "type": "file", "mtime": mtime,
                           # what hash_tree's memo compares; None while the file is racy
                           "stamp": None if hashcache.is_racy(st) else hashcache.local_stamp(st)}
            if is_link:
                listed[rel]["destination"] = str(target)
                if listed[rel]["stamp"] is not None:
                    listed[rel]["stamp"] += f":{link.st_ino}:{link.st_mtime_ns}"
    return dict(sorted(listed.items())), dict(sorted(links.items()))


def list_files(url: str) -> dict[str, dict]:
    """Relative POSIX path -> fsspec info of every file under a folder URL (hidden files skipped).

    Locally, file symlinks that stay inside the folder count as the files they point to.
    """
    if is_local(url):
        return _walk_local(local_path(url))[0]
    fs, root = filesystem(url)
    root = root.rstrip("/")
    # Other writers change the data (new clips land, transcripts get fixed): a listing cached by an
    # earlier call would hand out stale ETags, and reading those files fails with FileExpired.
    fs.invalidate_cache()
    found = retry_io(lambda: fs.find(root, detail=True))
    files = {}
    for path, info in found.items():
        if info.get("type") != "file":
            continue
        rel = posixpath.relpath(path, root)
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # our own state folders and temporaries are not content
        files[rel] = info
    return dict(sorted(files.items()))


def hash_tree(url: str) -> str:
    """sha256 over the sorted ``(relative path, sha256 of content)`` pairs of a folder.

    A symlink counts as the content it points to (re-pointing it changes the key); a link that is
    not data (outside the folder, dangling) counts by its link text, so changing it changes the key too.
    Memoized twice: the whole folder by the listing of its files' stamps (one lookup for an
    unchanged tree), and each file by its own stamp (only changed files are read).

    A completion marker (``MARKER``) at the top is left out: it is the store's record of the
    publish (it holds the publish time), so with it the same artifact published in two stores,
    or twice, hashed differently and every later stage's key with it.
    """
    if is_local(url):
        root = local_path(url)
        listed, links = _walk_local(root)
        listed.pop(MARKER, None)  # a published artifact's completion marker is not its content
        stamps = {rel: [info.get("destination", info["name"]), info["stamp"]] for rel, info in listed.items()}

        def compute() -> str:
            entries = {rel: sha256_file(Path(info.get("destination", info["name"]))) for rel, info in listed.items()}
            entries.update({rel: f"link:{text}" for rel, text in links.items()})
            return digest_listing(entries)

        racy = any(stamp is None for _, stamp in stamps.values())
        return hashcache.remembered(f"tree:{root}", None if racy else _tree_stamp(stamps, links), compute)
    listed = list_files(url)
    listed.pop(MARKER, None)  # a published artifact's completion marker is not its content
    stamps = {rel: _remote_stamp(info) for rel, info in listed.items()}
    key, tree_stamp = f"tree:{_remote_key(url)}", None
    if all(stamp is not None for stamp in stamps.values()):
        tree_stamp = _tree_stamp(stamps, {})
        if (hit := hashcache.memo().get(key, tree_stamp)) is not None:
            return hit
    fs, root = filesystem(url)
    root = root.rstrip("/")
    entries, consistent = {}, True
    for rel in listed:
        file_key = _remote_key(join(url, rel))
        sha, read_stamp = retry_io(lambda rel=rel, file_key=file_key: _hash_remote(fs, f"{root}/{rel}", file_key, stamps[rel]))
        entries[rel] = sha
        consistent = consistent and read_stamp == stamps[rel]
    sha = digest_listing(entries)
    if tree_stamp is not None and consistent:  # an object rewritten since the listing: not this stamp's hash
        hashcache.memo().put(key, tree_stamp, sha)
    return sha


def file_hashes(url: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under a folder URL (hidden files skipped).

    A published artifact's completion marker already records them (artifacts are never
    rewritten), so that is one read; any other folder is hashed now.
    """
    fs, path = filesystem(join(url, MARKER))
    try:
        return dict(sorted(json.loads(retry_io(lambda: fs.cat_file(path)))["files"].items()))
    except FileNotFoundError:
        pass
    return {rel: hash_url(join(url, rel)) for rel in list_files(url)}


def _tree_stamp(stamps: Mapping[str, Any], links: Mapping[str, str]) -> str:
    """A folder's stamp: the sorted listing of its files' stamps (and its other links' texts)."""
    return hashlib.sha256(canonical_json({"files": dict(stamps), "links": dict(links)}).encode()).hexdigest()


def hash_any(url: str) -> str:
    """Content hash of a file or a folder URL."""
    if is_local(url):
        return hash_tree(url) if local_path(url).is_dir() else hash_url(url)
    fs, path = filesystem(url)
    fs.invalidate_cache()  # see list_files: never trust a listing made before this call
    if retry_io(lambda: fs.isdir(path)):
        return hash_tree(url)
    return hash_url(url)


def digest_listing(entries: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(entries.items())), separators=(",", ":")).encode()).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(stage: str, inputs: Mapping[str, str], params: Mapping[str, Any], code_version: str) -> str:
    """sha256 of a stage's input content hashes, its parameters and the code version."""
    blob = canonical_json({"stage": stage, "inputs": dict(inputs), "params": dict(params), "code": code_version})
    return hashlib.sha256(blob.encode()).hexdigest()


def code_version() -> str:
    """The installed fishtune version (part of every key, so a release invalidates old artifacts)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fishtune")
    except PackageNotFoundError:
        return "0.0.0+source"


# ---------------------------------------------------------------- the store


@dataclass(frozen=True)
class Artifact:
    """A published artifact: where it is and what it holds."""

    stage: str
    key: str
    url: str
    files: dict[str, str]  # relative path -> sha256

    def file_url(self, rel: str) -> str:
        return join(self.url, rel)


@dataclass(frozen=True)
class Store:
    """One storage root. Holds only the URL: never credentials (they stay in the environment)."""

    root: str = DEFAULT_ROOT
    io_attempts: int = IO_ATTEMPTS  # per storage call (retry_io); botocore makes one attempt each

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", normalize_url(refuse_credentials(self.root, "storage root")))

    def __repr__(self) -> str:
        return f"Store({redact(self.root)!r})"

    __str__ = __repr__

    @property
    def local(self) -> bool:
        return is_local(self.root)

    def url(self, *parts: str) -> str:
        return join(self.root, *parts)

    def artifact_url(self, stage: str, key: str) -> str:
        return self.url(stage, key)

    # -- reading

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The complete artifact for ``key``, or None (also when it was never finished)."""
        url = self.artifact_url(stage, key)
        fs, path = filesystem(join(url, MARKER))
        try:
            raw = retry_io(lambda: fs.cat_file(path), self.io_attempts)
        except FileNotFoundError:
            return None
        marker = json.loads(raw)
        return Artifact(stage, key, url, dict(marker["files"]))

    def verify(self, artifact: Artifact) -> None:
        """Re-hash every file of an artifact against its marker (memoized by stamp: a file written
        since it was last hashed is read again).

        Raises:
            ArtifactError: naming the first file that is missing or differs.
        """
        for rel, expected in artifact.files.items():
            try:
                actual = hash_url(artifact.file_url(rel))
            except FileNotFoundError:
                raise ArtifactError(f"{redact(artifact.file_url(rel))} is listed in the marker but missing") from None
            if actual != expected:
                raise ArtifactError(f"{redact(artifact.file_url(rel))}: sha256 {actual} != marker {expected}")

    # -- writing

    def publish(
        self,
        stage: str,
        key: str,
        source: str | os.PathLike | Mapping[str, str | os.PathLike],
        metadata: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Copy a local folder (or a ``{relative path: local file}`` mapping) into
        ``<root>/<stage>/<key>/`` and write the marker last.

        Locally the folder is assembled under a temporary name and renamed into place, so a
        reader never sees a partial folder. Remotely the objects are uploaded first and the
        marker after them; a crash leaves objects without a marker, which :meth:`lookup`
        treats as absent and the next publish overwrites. A complete artifact is never
        overwritten, locally or remotely: the first one of a key is returned.
        """
        if isinstance(source, Mapping):
            files = {rel: Path(p) for rel, p in sorted(source.items())}
        else:
            folder = Path(source)
            files = {
                p.relative_to(folder).as_posix(): p
                for p in sorted(folder.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            }
        if MARKER in files:
            raise ValueError(f"{MARKER} is reserved for the completion marker")
        hashes = {rel: sha256_file(p) for rel, p in files.items()}
        marker = {
            "stage": stage,
            "key": key,
            "files": hashes,
            "metadata": dict(metadata or {}),
            "created": datetime.now(timezone.utc).isoformat(),
            "code_version": code_version(),
        }
        url = self.artifact_url(stage, key)
        if self.local:
            final = local_path(url)
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                for rel, p in files.items():
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, target)
                with atomic_write(staging / MARKER, "w") as handle:
                    json.dump(marker, handle, indent=2)
                if final.exists():  # an unfinished earlier attempt (no marker) or a concurrent twin
                    if (final / MARKER).is_file():
                        shutil.rmtree(staging)
                        return self.lookup(stage, key)  # type: ignore[return-value]
                    shutil.rmtree(final)
                os.replace(staging, final)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        else:
            # A complete artifact of this key is never rewritten: another host may be reading it, and
            # an overwrite of a finished object makes its readers fail mid-read (S3 precondition /
            # expired-file errors). Same key = same content, so the one already there is kept.
            existing = self.lookup(stage, key)
            if existing is not None:
                return existing
            fs, _ = filesystem(url)
            for rel, p in files.items():
                _, remote = filesystem(join(url, rel))
                retry_io(lambda p=p, remote=remote: fs.put_file(str(p), remote), self.io_attempts)
            _, marker_path = filesystem(join(url, MARKER))
            body = json.dumps(marker, indent=2).encode()
            retry_io(lambda: fs.pipe_file(marker_path, body), self.io_attempts)
        return Artifact(stage, key, url, hashes)

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write one object (atomically when local); returns its URL."""
        url = self.url(rel)
        if self.local:
            with atomic_write(local_path(url), "wb") as handle:
                handle.write(data)
        else:
            fs, path = filesystem(url)
            retry_io(lambda: fs.pipe_file(path, data), self.io_attempts)
        return url

    def read_bytes(self, rel: str) -> bytes:
        fs, path = filesystem(self.url(rel))
        return retry_io(lambda: fs.cat_file(path), self.io_attempts)


# ---------------------------------------------------------------- transfer helpers


def download(url: str, dest: str | os.PathLike) -> Path:
    """Copy one remote (or local) file to a local path atomically."""
    fs, path = filesystem(url)
    dest = Path(dest)

    def get() -> None:
        with atomic_path(dest) as tmp:
            fs.get_file(path, str(tmp))

    retry_io(get)
    return dest


def local_file(url: str, cache: str | os.PathLike) -> Path:
    """A local path for a file URL: itself when local, else downloaded once per content into ``cache``."""
    if is_local(url):
        return local_path(url)
    target = Path(cache) / hash_url(url) / Path(url).name
    if not target.is_file():
        download(url, target)
    return target


def local_tree(url: str, cache: str | os.PathLike) -> Path:
    """A local folder for a folder URL: itself when local, else a mirror under ``cache`` synced now."""
    if is_local(url):
        return local_path(url)
    target = Path(cache) / digest_listing({"url": normalize_url(url)})[:16]
    sync_tree(url, target)
    return target


def sync_tree(
    url: str, dest: str | os.PathLike, only: Iterable[str] | None = None, keep_suffixes: tuple[str, ...] = (),
    files: Iterable[str] | None = None,
) -> dict[str, str]:
    """Mirror the files under ``url`` (optionally only the top-level folders ``only``, or only the
    relative paths ``files``) into ``dest``.

    Each file is streamed once: hashed while copied, and written only when its content differs
    from the local copy, so unchanged files keep their bytes and times. A remote file whose
    stamp (size + ETag) has a memoized hash equal to the local copy's is not downloaded at all.
    Local files that are no longer in the source are removed, except those ending in
    ``keep_suffixes`` (files derived locally, e.g. extracted codes). Returns relative path -> sha256.
    """
    dest = Path(dest)
    wanted = set(only) if only is not None else None
    chosen = set(files) if files is not None else None
    listing = {
        rel: info for rel, info in list_files(url).items()
        if (wanted is None or rel.split("/", 1)[0] in wanted) and (chosen is None or rel in chosen)
    }
    hashes: dict[str, str] = {}
    fs, root = filesystem(url)
    root = root.rstrip("/")
    memo = hashcache.memo()
    for rel, info in listing.items():
        target = dest / rel
        key, stamp = _remote_key(join(url, rel)), (None if is_local(url) else _remote_stamp(info))
        known = memo.get(key, stamp) if stamp is not None else None
        if known is not None and target.is_file() and sha256_file(target) == known:
            hashes[rel] = known  # the source's bytes are what the local copy holds
            continue

        def copy(rel: str = rel, target: Path = target, key: str = key) -> str:
            digest = hashlib.sha256()
            with atomic_path(target) as tmp:
                with fs.open(posixpath.join(root, rel), "rb") as src, open(tmp, "wb") as out:
                    while block := src.read(HASH_CHUNK):
                        digest.update(block)
                        out.write(block)
                    read_stamp = None if is_local(url) else _remote_stamp(getattr(src, "details", None))
                sha = digest.hexdigest()
                if read_stamp is not None:
                    memo.put(key, read_stamp, sha)
                if target.is_file() and sha256_file(target) == sha:
                    raise _Unchanged(sha)
            return sha

        try:
            hashes[rel] = retry_io(copy)
        except _Unchanged as same:
            hashes[rel] = same.sha
    if dest.exists():
        for p in sorted(dest.rglob("*"), reverse=True):
            rel = p.relative_to(dest).as_posix()
            if p.is_file() and rel not in hashes and not rel.startswith(".") and not rel.endswith(keep_suffixes or ("\0",)):
                p.unlink()
    return hashes


class _Unchanged(Exception):
    def __init__(self, sha: str):
        self.sha = sha


# ---------------------------------------------------------------- run manifests


@dataclass
class StageRecord:
    """One stage of a run: what it read, what it wrote, whether it came from cache."""

    stage: str
    key: str = ""
    url: str = ""
    cached: bool = False
    seconds: float = 0.0
    inputs: dict[str, str] = field(default_factory=dict)  # name -> sha256 (or URL#sha256)
    outputs: dict[str, str] = field(default_factory=dict)  # name -> URL
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunManifest:
    """Everything needed to trace a run's outputs (up to a merged model) back to its data."""

    run_id: str
    flow: str
    parameters: dict[str, Any]
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    finished: str = ""
    status: str = "running"
    versions: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)  # run inputs (data, base model) -> content sha256
    stages: list[StageRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def versions() -> dict[str, str]:
    """Versions that decide what a run produces (recorded in every manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"fishtune": code_version(), "python": platform.python_version()}
    for name in ("torch", "torchaudio", "prefect", "fsspec", "s3fs", "pyloudnorm", "soundfile"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def write_manifest(store: Store, manifest: RunManifest, report_markdown: str | None = None) -> dict[str, str]:
    """Write ``manifest.json`` + ``stages.parquet`` (+ ``report.md``) under ``<root>/runs/<run_id>/``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = f"{RUNS}/{manifest.run_id}"
    written = {"manifest": store.write_bytes(f"{base}/manifest.json", json.dumps(manifest.to_dict(), indent=2, default=str).encode())}
    rows = [
        {
            "stage": s.stage,
            "key": s.key,
            "url": s.url,
            "cached": s.cached,
            "seconds": s.seconds,
            "inputs": canonical_json(s.inputs),
            "outputs": canonical_json(s.outputs),
        }
        for s in manifest.stages
    ]
    schema = pa.schema(
        [("stage", pa.string()), ("key", pa.string()), ("url", pa.string()), ("cached", pa.bool_()),
         ("seconds", pa.float64()), ("inputs", pa.string()), ("outputs", pa.string())],
        metadata={"run_id": manifest.run_id, "flow": manifest.flow},
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "stages.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), local)
        written["stages"] = store.write_bytes(f"{base}/stages.parquet", local.read_bytes())
    if report_markdown is not None:
        written["report"] = store.write_bytes(f"{base}/report.md", report_markdown.encode())
    return written


def read_manifest(store: Store, run_id: str) -> dict:
    return json.loads(store.read_bytes(f"{RUNS}/{run_id}/manifest.json"))
