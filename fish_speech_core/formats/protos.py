"""Read and write ``.protos`` shards: a stream of length-prefixed ``text_data.TextData`` records.

Stream format (fixtures README section 6): each record is a 4-byte little-endian unsigned length
followed by that many bytes of one serialized ``TextData``; no header, no trailer. The packer
writes shards ``00000000.protos``, ``00000001.protos``... and starts a new one once the current
shard has grown past ``shard_size_mb`` MiB (the record that crosses the limit stays in it).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from fish_speech_core.files import atomic_path, is_temporary
from fish_speech_core.formats.text_data_pb2 import Semantics, Sentence, TextData

LENGTH_PREFIX = struct.Struct("<I")
PROTO_SUFFIXES = (".proto", ".protos")
SHARD_NAME = "{index:08d}.protos"
BYTES_PER_MB = 1024 * 1024
MAX_RECORD_BYTES = 2**32 - 1


class ProtoStreamError(ValueError):
    """A shard is empty, truncated or holds something that is not a TextData record."""


def encode_record(message: TextData) -> bytes:
    """One stream record: the little-endian length prefix, then the serialized message."""
    return frame_record(message.SerializeToString())


def frame_record(payload: bytes) -> bytes:
    """Prefix an already serialized TextData with its length."""
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(
            f"a record of {len(payload)} bytes does not fit the 4-byte length prefix; "
            "split the speaker into several folders"
        )
    return LENGTH_PREFIX.pack(len(payload)) + payload


def make_text_data(name: str, sentences: Iterable[tuple[str, Iterable[Iterable[int]]]],
                   source: str = "folder") -> TextData:
    """Build a TextData from ``(text, codes)`` pairs; ``codes`` is (num_codebooks, frames)."""
    return TextData(
        source=source,
        name=name,
        sentences=[
            Sentence(texts=[text], semantics=[Semantics(values=row) for row in codes])
            for text, codes in sentences
        ],
    )


def find_proto_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (searched recursively for ``*.proto``/``*.protos``) in sorted order.

    Raises:
        FileNotFoundError: a path does not exist, or the paths hold no shard at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(
                p for p in sorted(path.rglob("*"))
                if p.suffix in PROTO_SUFFIXES and p.is_file() and not is_temporary(p)
            )
        else:
            raise FileNotFoundError(f"{path} does not exist (expected a .protos file or a folder)")
    if not found:
        shown = ", ".join(str(p) for p in map(Path, paths)) or "(no paths)"
        raise FileNotFoundError(
            f"no *.proto or *.protos shards in {shown}; run `fishtune pack` to create them"
        )
    return found


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield ``(byte offset of the record, payload bytes)`` for each record of one shard.

    Raises:
        ProtoStreamError: for an empty file, a truncated length prefix, or a length prefix
            larger than the rest of the file, naming the file and byte offset.
    """
    data = Path(path).read_bytes()
    if not data:
        raise ProtoStreamError(f"{path}: empty shard (0 bytes); delete it or re-run the pack")
    offset = 0
    while offset < len(data):
        remaining = len(data) - offset
        if remaining < LENGTH_PREFIX.size:
            raise ProtoStreamError(
                f"{path}: truncated record at byte offset {offset}: {remaining} byte(s) left, "
                f"a length prefix needs {LENGTH_PREFIX.size}; the shard was cut short, re-run the pack"
            )
        (length,) = LENGTH_PREFIX.unpack_from(data, offset)
        start = offset + LENGTH_PREFIX.size
        if length > len(data) - start:
            raise ProtoStreamError(
                f"{path}: record at byte offset {offset} claims {length} bytes but only "
                f"{len(data) - start} remain; the shard is truncated or not a .protos stream"
            )
        yield offset, data[start:start + length]
        offset = start + length


def parse_text_data(payload: bytes, where: str) -> TextData:
    """Parse one record, refusing bytes that parse but are clearly not a TextData.

    Protobuf parsing is lenient (a ``Sentence`` or ``Semantics`` message parses as a TextData
    with its fields misread), so we also require: no unknown fields and at least one sentence.
    """
    message = TextData()
    try:
        message.ParseFromString(payload)
    except DecodeError as err:
        raise ProtoStreamError(f"{where}: not a TextData message ({err})") from None
    unknown = [f.field_number for f in UnknownFieldSet(message)]
    for sentence in message.sentences:
        unknown += [f.field_number for f in UnknownFieldSet(sentence)]
    if unknown:
        raise ProtoStreamError(
            f"{where}: not a TextData message (unknown field numbers {sorted(set(unknown))})"
        )
    if not message.sentences:
        raise ProtoStreamError(f"{where}: TextData {message.name!r} holds no sentences")
    for index, sentence in enumerate(message.sentences):
        problem = _sentence_problem(sentence)
        if problem:
            raise ProtoStreamError(f"{where}: TextData {message.name!r} sentence {index}: {problem}; "
                                   "re-run `fishtune pack` on the data")
    return message


def _sentence_problem(sentence) -> str | None:
    """Why a sentence cannot be trained on: no text, no codes, or code rows of unequal length."""
    if not any(text.strip() for text in sentence.texts):
        return "has no text"
    lengths = {len(row.values) for row in sentence.semantics}
    if not lengths or lengths == {0}:
        return "has no semantic codes"
    if len(lengths) > 1:
        return f"codebook rows have different lengths {sorted(lengths)}"
    return None


def iter_text_data(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[TextData]:
    """Every TextData record in a shard, a folder of shards, or a list of either, in sorted order.

    Raises:
        FileNotFoundError: no shard found.
        ProtoStreamError: a damaged shard, naming the file and byte offset.
    """
    for path in find_proto_files(paths):
        for offset, payload in iter_records(path):
            yield parse_text_data(payload, f"{path}: record at byte offset {offset}")


class ShardWriter:
    """Write records into numbered shards; all shards appear (atomically renamed) on ``close``.

    Until ``close`` the shards are hidden temporary files, so an interrupted pack never leaves a
    partial set of shards that training could mistake for the whole dataset. Use as a context
    manager: leaving the block with an exception removes every temporary file.
    """

    def __init__(self, output_dir: str | os.PathLike, shard_size_mb: float = 10.0) -> None:
        if shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be > 0, got {shard_size_mb}")
        self.output_dir = Path(output_dir)
        self.shard_limit = shard_size_mb * BYTES_PER_MB
        self.paths: list[Path] = []
        self.bytes_written = 0
        self.records_written = 0
        self._stack = contextlib.ExitStack()
        self._handle = None
        self._shard_bytes = 0

    def __enter__(self) -> "ShardWriter":
        self._stack.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._close_handle()
        self._stack.__exit__(*exc_info)  # renames on success, deletes temporaries on error

    def write(self, message: TextData | bytes) -> None:
        """Append one record (a TextData, or an already encoded record from :func:`encode_record`)."""
        record = message if isinstance(message, bytes) else encode_record(message)
        if self._handle is None or self._shard_bytes > self.shard_limit:
            self._open_next()
        self._handle.write(record)
        self._shard_bytes += len(record)
        self.bytes_written += len(record)
        self.records_written += 1

    def close(self) -> list[Path]:
        self.__exit__(None, None, None)
        return self.paths

    def _open_next(self) -> None:
        self._close_handle()
        path = self.output_dir / SHARD_NAME.format(index=len(self.paths))
        tmp = self._stack.enter_context(atomic_path(path))
        self._handle = open(tmp, "wb")
        self._shard_bytes = 0
        self.paths.append(path)

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
