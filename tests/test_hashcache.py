"""Memoized content hashes (fish_speech_core.hashcache): the same values as hashing the bytes,
an unchanged file read once per process and not again by the next one, a changed file re-read."""

from __future__ import annotations

import builtins
import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from fish_speech_core import hashcache, storage
from fish_speech_core.files import sha256_file

PAST = 1_600_000_000  # an mtime far from "now": not racy


@pytest.fixture
def memo_file(tmp_path, monkeypatch) -> Path:
    """A fresh memo file for this test; ``new_process()`` forgets everything held in memory."""
    path = tmp_path / "cache" / "hashes.sqlite"
    monkeypatch.setenv(hashcache.CACHE_ENV, str(path))
    monkeypatch.setattr(hashcache, "_MEMOS", {})
    return path


def new_process(monkeypatch) -> None:
    monkeypatch.setattr(hashcache, "_MEMOS", {})


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Names of the files opened for reading under tmp_path (wraps builtins.open)."""
    names: list[str] = []
    real = builtins.open

    def counting(file, mode="r", *args, **kwargs):
        if "r" in mode and isinstance(file, (str, os.PathLike)) and not str(file).endswith((".sqlite", "-journal")):
            names.append(Path(file).name)
        return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    return names


def write(path: Path, data: bytes, mtime: int = PAST) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def test_a_file_is_read_once_per_content_and_not_again_by_the_next_process(tmp_path, memo_file, opened, monkeypatch):
    f = write(tmp_path / "model.pth", b"A" * 1000)
    want = hashlib.sha256(b"A" * 1000).hexdigest()
    assert [sha256_file(f) for _ in range(3)] == [want] * 3 and storage.hash_url(str(f)) == want
    assert opened == ["model.pth"]
    new_process(monkeypatch)
    assert sha256_file(f) == want and opened == ["model.pth"]  # from the memo file
    write(f, b"B" * 1000, mtime=PAST + 1)  # same size, other bytes, other mtime
    assert sha256_file(f) == hashlib.sha256(b"B" * 1000).hexdigest() and opened == ["model.pth"] * 2


def test_a_rewrite_that_keeps_size_and_mtime_is_still_seen(tmp_path, memo_file, opened):
    f = write(tmp_path / "a.bin", b"old!")
    assert sha256_file(f) == hashlib.sha256(b"old!").hexdigest()
    write(f, b"new!")  # mtime put back: the ctime (and for an os.replace, the inode) still moved
    assert sha256_file(f) == hashlib.sha256(b"new!").hexdigest()
    replaced = write(tmp_path / "b.bin", b"new?")
    os.replace(replaced, f)
    assert sha256_file(f) == hashlib.sha256(b"new?").hexdigest() and len(opened) == 3


def test_a_file_written_just_now_is_read_every_time(tmp_path, memo_file, opened):
    f = tmp_path / "fresh.txt"
    f.write_bytes(b"x")  # mtime now: a same-size rewrite in this clock tick would keep the stamp
    assert sha256_file(f) == sha256_file(f) == hashlib.sha256(b"x").hexdigest()
    assert opened == ["fresh.txt"] * 2


def test_a_damaged_memo_file_is_rebuilt_and_a_tampered_row_never_trusted(tmp_path, memo_file, opened, monkeypatch):
    f = write(tmp_path / "a.bin", b"content")
    want = hashlib.sha256(b"content").hexdigest()
    assert sha256_file(f) == want
    with sqlite3.connect(memo_file) as db:
        db.execute("UPDATE hashes SET sha256 = ?", ("0" * 64,))  # a wrong hash, seal unchanged
    new_process(monkeypatch)
    assert sha256_file(f) == want and opened == ["a.bin"] * 2
    memo_file.write_bytes(b"\x00not a database" * 100)
    new_process(monkeypatch)
    assert sha256_file(f) == want  # read again, remembered in a rebuilt file
    new_process(monkeypatch)
    assert sha256_file(f) == want and opened == ["a.bin"] * 3
    with sqlite3.connect(memo_file) as db:
        assert db.execute("SELECT count(*) FROM hashes").fetchone()[0] == 1


def test_memo_off_keeps_nothing_on_disk(tmp_path, monkeypatch, opened):
    monkeypatch.setenv(hashcache.CACHE_ENV, "off")
    monkeypatch.setattr(hashcache, "_MEMOS", {})
    f = write(tmp_path / "a.bin", b"x")
    assert sha256_file(f) == sha256_file(f) and opened == ["a.bin"]  # still memoized in the process
    new_process(monkeypatch)
    sha256_file(f)
    assert opened == ["a.bin"] * 2 and not list(tmp_path.rglob("*.sqlite"))


def test_hash_tree_reads_only_what_changed_and_keeps_its_values(tmp_path, memo_file, opened, monkeypatch):
    files = {"spk/a.wav": b"a" * 300, "spk/a.lab": b"hello", "spk/b.wav": b"b" * 300}
    for rel, data in files.items():
        write(tmp_path / "data" / rel, data)
    (tmp_path / "data" / "spk" / "link.wav").symlink_to(tmp_path / "data" / "spk" / "a.wav")
    files["spk/link.wav"] = files["spk/a.wav"]
    url = str(tmp_path / "data")
    want = storage.digest_listing({rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()})
    assert storage.hash_tree(url) == want == storage.hash_any(url)
    assert sorted(opened) == ["a.lab", "a.wav", "b.wav"]  # the link's target was read once
    new_process(monkeypatch)
    opened.clear()
    assert storage.hash_tree(url) == want and opened == []  # one lookup for the whole tree
    write(tmp_path / "data" / "spk" / "b.wav", b"c" * 300, mtime=PAST + 5)
    files["spk/b.wav"] = b"c" * 300
    assert storage.hash_tree(url) == storage.digest_listing({rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()})
    assert opened == ["b.wav"]
