import hashlib
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fish_speech_core import storage
from fish_speech_core.storage import MARKER, RunManifest, StageRecord, Store

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"


def make_folder(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 5000, "sub/deeper/c.txt": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".fishtune").mkdir()
    (root / ".fishtune" / "state.json").write_text("{}")  # hidden bookkeeping is not content
    return files


def test_hash_url_streams_and_matches_sha256(tmp_path):
    files = make_folder(tmp_path)
    for rel, data in files.items():
        assert storage.hash_url(str(tmp_path / rel)) == hashlib.sha256(data).hexdigest()
    expected = storage.digest_listing({rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()})
    assert storage.hash_tree(str(tmp_path)) == expected == storage.hash_any(str(tmp_path))
    (tmp_path / "sub" / "deeper" / "c.txt").write_bytes(b"x")
    assert storage.hash_tree(str(tmp_path)) != expected


def test_artifact_key_depends_on_content_params_and_code():
    base = storage.artifact_key("normalize", {"data": "h1"}, {"loudness": -23.0}, "1.0")
    assert base == storage.artifact_key("normalize", {"data": "h1"}, {"loudness": -23.0}, "1.0")
    assert len(base) == 64
    others = {
        storage.artifact_key("normalize", {"data": "h2"}, {"loudness": -23.0}, "1.0"),
        storage.artifact_key("normalize", {"data": "h1"}, {"loudness": -20.0}, "1.0"),
        storage.artifact_key("normalize", {"data": "h1"}, {"loudness": -23.0}, "1.1"),
        storage.artifact_key("validate", {"data": "h1"}, {"loudness": -23.0}, "1.0"),
    }
    assert base not in others and len(others) == 4


def test_redact_hides_credentials_and_store_never_shows_them():
    assert storage.redact("s3://AKIA:secret@bucket/prefix?token=x") == "s3://***@bucket/prefix"
    assert storage.redact("/tmp/x") == "/tmp/x"
    # A store never holds credentials: a URL carrying them is refused, and the refusal hides them.
    with pytest.raises(storage.CredentialsInURLError) as refused:
        Store("s3://AKIA:secret@bucket/prefix")
    assert "secret" not in str(refused.value) and "AKIA" not in str(refused.value)
    assert "AWS_ACCESS_KEY_ID" in str(refused.value)


def test_retry_io_backs_off_and_gives_up(caplog):
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert storage.retry_io(flaky, attempts=4, backoff=0.1, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and 0.1 <= sleeps[0] < sleeps[1] <= 0.25
    with pytest.raises(ConnectionError):
        storage.retry_io(lambda: (_ for _ in ()).throw(ConnectionError("down")), attempts=2, sleep=sleeps.append)
    missing = []
    with pytest.raises(FileNotFoundError):  # never retried
        storage.retry_io(lambda: missing.append(1) or open("/nonexistent/x"), sleep=sleeps.append)
    assert missing == [1]
    with pytest.raises(ValueError):  # not I/O: not retried
        storage.retry_io(lambda: int("x"), sleep=sleeps.append)


def _publish_roundtrip(store: Store, source: Path) -> None:
    files = make_folder(source)
    key = storage.artifact_key("stage", {"src": storage.hash_tree(str(source))}, {}, "t")
    assert store.lookup("stage", key) is None
    art = store.publish("stage", key, source, metadata={"n": 3})
    assert art.url == store.artifact_url("stage", key) and art.url.endswith(f"stage/{key}")
    assert set(art.files) == set(files)  # hidden state is not published
    assert art.files["a.txt"] == hashlib.sha256(b"alpha").hexdigest()
    found = store.lookup("stage", key)
    assert found == art
    store.verify(found)
    listed = storage.list_files(art.url)
    assert set(listed) == set(files) | {MARKER}
    marker = json.loads(store.read_bytes(f"stage/{key}/{MARKER}"))
    assert marker["files"] == art.files and marker["metadata"] == {"n": 3}
    # the artifact hashes as its content: its marker (publish time) is left out, so the same
    # content published anywhere, at any time, gives the next stage the same input hash
    assert storage.hash_any(art.url) == storage.hash_tree(str(source)) == storage.digest_listing(art.files)
    # publishing the same key again keeps one complete artifact
    assert store.publish("stage", key, source) .files == art.files
    # a corrupted object is caught by verify
    store.write_bytes(f"stage/{key}/a.txt", b"tampered")
    with pytest.raises(storage.ArtifactError, match="a.txt"):
        store.verify(found)


def test_publish_lookup_verify_local(tmp_path):
    _publish_roundtrip(Store(str(tmp_path / "store")), tmp_path / "src")
    assert not [p for p in (tmp_path / "store" / "stage").iterdir() if p.name.startswith(".")]  # no staging left


def test_unfinished_artifact_is_not_a_hit_and_is_replaced_local(tmp_path):
    store = Store(str(tmp_path / "store"))
    make_folder(tmp_path / "src")
    half = tmp_path / "store" / "stage" / "k1"
    half.mkdir(parents=True)
    (half / "a.txt").write_text("half-written")  # crashed before the marker
    assert store.lookup("stage", "k1") is None
    art = store.publish("stage", "k1", tmp_path / "src")
    assert (half / "a.txt").read_bytes() == b"alpha" and store.lookup("stage", "k1") == art


def test_publish_lookup_verify_s3(s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    store = Store(f"{s3_bucket}/prefix")
    _publish_roundtrip(store, tmp_path / "src")
    # an unfinished remote artifact (objects, no marker) is not a hit
    store.write_bytes("stage/k2/a.txt", b"half")
    assert store.lookup("stage", "k2") is None
    assert "testing-secret-never-logged" not in caplog.text


def test_a_complete_remote_artifact_is_never_rewritten(s3_bucket, tmp_path):
    """A second host publishing the same key keeps the first one's objects: a reader on another
    host must never see a finished object replaced under it."""
    store = Store(f"{s3_bucket}/prefix")
    make_folder(tmp_path / "src")
    first = store.publish("stage", "k3", tmp_path / "src")
    marker = store.read_bytes("stage/k3/_COMPLETE.json")
    (tmp_path / "src" / "a.txt").write_text("another host's copy")
    again = store.publish("stage", "k3", tmp_path / "src")
    assert again == first and store.read_bytes("stage/k3/_COMPLETE.json") == marker
    assert store.read_bytes("stage/k3/a.txt") == b"alpha"


def test_sync_tree_from_s3_copies_only_changes(s3_bucket, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(DEMO / "alice"), f"{s3_bucket}/raw/alice", recursive=True)
    fs.put(str(DEMO / "bruno"), f"{s3_bucket}/raw/bruno", recursive=True)
    dest = tmp_path / "local"
    hashes = storage.sync_tree(f"{s3_bucket}/raw", dest, only=["alice"])
    assert sorted(hashes) == sorted(f"alice/{p.name}" for p in (DEMO / "alice").iterdir())
    for rel, sha in hashes.items():
        assert (dest / rel).read_bytes() == (DEMO / rel).read_bytes()
        assert sha == hashlib.sha256((DEMO / rel).read_bytes()).hexdigest()
    before = {rel: (dest / rel).stat().st_mtime_ns for rel in hashes}
    fs.pipe_file(f"{s3_bucket}/raw/alice/alice_000.lab", b"changed text")
    fs.rm_file(f"{s3_bucket}/raw/alice/alice_001.lab")
    again = storage.sync_tree(f"{s3_bucket}/raw", dest, only=["alice"])
    assert (dest / "alice/alice_000.lab").read_bytes() == b"changed text"
    assert not (dest / "alice/alice_001.lab").exists() and "alice/alice_001.lab" not in again
    unchanged = [rel for rel in again if rel != "alice/alice_000.lab"]
    assert all((dest / rel).stat().st_mtime_ns == before[rel] for rel in unchanged)
    assert storage.hash_tree(f"{s3_bucket}/raw/alice") == storage.hash_tree(str(dest / "alice"))


def test_s3_hashes_are_memoized_by_etag(s3_bucket, tmp_path, monkeypatch):
    import fsspec
    import s3fs

    from fish_speech_core import hashcache

    monkeypatch.setenv(hashcache.CACHE_ENV, str(tmp_path / "hashes.sqlite"))
    monkeypatch.setattr(hashcache, "_MEMOS", {})
    fs = fsspec.filesystem("s3")
    fs.put(str(DEMO / "alice"), f"{s3_bucket}/memo/alice", recursive=True)
    url = f"{s3_bucket}/memo/alice"
    first = storage.hash_tree(url)
    assert first == storage.hash_tree(str(DEMO / "alice"))
    one = f"{url}/alice_000.lab"
    assert storage.hash_url(one) == hashlib.sha256((DEMO / "alice" / "alice_000.lab").read_bytes()).hexdigest()
    opened: list[str] = []
    real_open = s3fs.S3FileSystem.open
    monkeypatch.setattr(s3fs.S3FileSystem, "open", lambda self, path, *a, **k: opened.append(path) or real_open(self, path, *a, **k))
    monkeypatch.setattr(hashcache, "_MEMOS", {})  # the next process
    assert storage.hash_tree(url) == first and storage.hash_url(one) == storage.hash_url(one)
    assert opened == []  # listing and HEAD only: no object was read
    fs.pipe_file(one, b"changed text")  # a new ETag
    assert storage.hash_url(one) == hashlib.sha256(b"changed text").hexdigest()
    assert storage.hash_tree(url) != first
    assert [p.rsplit("/", 1)[-1] for p in opened] == ["alice_000.lab"]  # read once, then memoized


def test_hash_url_and_download_from_s3(s3_bucket, tmp_path):
    import fsspec

    src = tmp_path / "x.bin"
    src.write_bytes(b"\x00\x01" * 1000)
    url = f"{s3_bucket}/files/x.bin"
    fsspec.filesystem("s3").put_file(str(src), url)
    assert storage.hash_url(url) == hashlib.sha256(src.read_bytes()).hexdigest()
    back = storage.download(url, tmp_path / "back" / "x.bin")
    assert back.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("remote", [False, True])
def test_run_manifest_json_parquet_and_report(remote, request, tmp_path):
    root = f"{request.getfixturevalue('s3_bucket')}/store" if remote else str(tmp_path / "store")
    store = Store(root)
    manifest = RunManifest("run-1", "finetune", {"project": "demo"}, versions=storage.versions())
    manifest.stages.append(StageRecord("validate", "k" * 64, store.url("validate", "k" * 64), False, 1.5,
                                       {"data": "abc"}, {"manifest": "u"}, {"accepted": 3}))
    manifest.stages.append(StageRecord("normalize", "n" * 64, store.url("normalize", "n" * 64), True, 0.1))
    written = storage.write_manifest(store, manifest, "# report\n")
    assert set(written) == {"manifest", "stages", "report"}
    back = storage.read_manifest(store, "run-1")
    assert back["parameters"] == {"project": "demo"} and back["stages"][0]["summary"] == {"accepted": 3}
    assert back["versions"]["fishtune"] == storage.code_version()
    fs, path = storage.filesystem(written["stages"])
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    assert table.column("stage").to_pylist() == ["validate", "normalize"]
    assert table.column("cached").to_pylist() == [False, True]
    assert store.read_bytes("runs/run-1/report.md") == b"# report\n"


@pytest.mark.slow
def test_s3_down_is_a_clear_transient_error(moto_s3, s3_bucket):
    """A stopped S3 endpoint: the endpoint error (retried as transient); after a restart it works again."""
    store = Store(f"{s3_bucket}/store", io_attempts=1)  # one attempt: retry_io is the only retry layer
    moto_s3.stop()
    try:
        with pytest.raises(Exception, match=r"Could not connect to the endpoint URL: .*127\.0\.0\.1") as info:
            store.lookup("stage", "k")
        assert storage.is_transient(info.value)  # retry_io retries it
        assert "testing-secret-never-logged" not in str(info.value)
    finally:
        moto_s3.start()  # moto keeps buckets in memory: the restarted server is empty
    import boto3

    boto3.client("s3", endpoint_url=moto_s3.endpoint).create_bucket(Bucket=s3_bucket[5:])
    assert store.lookup("stage", "k") is None


def test_failing_s3_endpoint_gets_bounded_retries_with_backoff(monkeypatch):
    """An endpoint that cuts every connection: 4 retry_io attempts x 1 botocore attempt, then a clean error."""
    import socket
    import threading
    import time

    import s3fs

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted: list[float] = []
    stop = threading.Event()

    def cut_every_connection() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(time.monotonic())
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # RST: "connection reset", what a crashing proxy does

    thread = threading.Thread(target=cut_every_connection, daemon=True)
    thread.start()
    for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-never-logged")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        store = Store("s3://unreachable/store")  # default io_attempts
        started = time.monotonic()
        with pytest.raises(Exception) as info:
            store.read_bytes("runs/x/report.md")
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        s3fs.S3FileSystem.clear_instance_cache()
    assert storage.is_transient(info.value)
    assert "testing-secret-never-logged" not in str(info.value)
    print(f"{len(accepted)} connections in {elapsed:.1f} s: {type(info.value).__name__}: {info.value}",
          [round(t - accepted[0], 2) for t in accepted])
    # retry_io is the one retry layer: one botocore attempt per call, no layer multiplies it (the HTTP
    # stack sometimes opens a second connection within one attempt: at most two each)
    assert storage.BOTOCORE_RETRIES["total_max_attempts"] == 1
    assert store.io_attempts <= len(accepted) <= 2 * store.io_attempts
    assert elapsed < 15
    # fishtune's backoff: the gaps between its attempts grow (0.5 s, 1 s, 2 s, + jitter)
    gaps = [b - a for a, b in zip(accepted, accepted[1:])]
    assert max(gaps) >= 1.5
