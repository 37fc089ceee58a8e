"""S3 goes away in the middle of a finetune run, comes back, and the rerun resumes from cache.

moto keeps its objects in memory, so restarting moto would lose the finished stages. Instead a
small TCP proxy (stdlib sockets, 127.0.0.1) sits between s3fs and the session's moto server;
stopping the proxy is the outage (connections refused, open ones dropped), restarting it on the
same port is the recovery, and moto keeps every object in between.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from fishtune.flows.config import FinetuneConfig

from tests.flows.conftest import free_port

DEMO = Path(__file__).parents[2] / "examples" / "demo-data"


class TcpProxy:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<target>; ``stop`` refuses new and drops open connections.

    Every thread is a daemon bounded by ``lifetime`` seconds, so a failing test cannot leave it running.
    """

    def __init__(self, target_port: int, lifetime: float = 120.0):
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.deadline = time.monotonic() + lifetime
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._acceptor: threading.Thread | None = None

    def start(self) -> None:
        self._stopped.clear()
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: same port again
        self._listener.settimeout(0.1)
        self._acceptor = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        self._acceptor.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        if self._listener is not None:
            self._listener.close()  # new connections are refused from here on
            self._listener = None
        with self._lock:
            for sock in self._open:  # and the pooled keep-alive ones are cut
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def _running(self) -> bool:
        return not self._stopped.is_set() and time.monotonic() < self.deadline

    def _accept(self, listener: socket.socket) -> None:
        while self._running():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self._running() and (chunk := src.recv(65536)):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _fresh_s3_clients() -> None:
    """fsspec caches S3FileSystem instances (with their endpoint): make the next use read the env again."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def _watch_and_cut(moto_endpoint: str, bucket: str, proxy: TcpProxy, fired: threading.Event, timeout: float) -> None:
    """Stop the proxy once normalize is published and its cache record is written (read from moto directly)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    deadline = time.monotonic() + timeout

    def keys(prefix: str) -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]

    while time.monotonic() < deadline:
        normalized = any(k.endswith("/_COMPLETE.json") for k in keys("store/normalize/"))
        # validate's and normalize's cache records: both stages are fully finished (a Cached hit on rerun)
        if normalized and len(keys("store/prefect-results/")) >= 2:
            proxy.stop()
            fired.set()
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_s3_outage_mid_run_fails_clearly_and_the_rerun_resumes(prefect_env, moto_s3, s3_bucket, tmp_path, monkeypatch):
    from fish_speech_core.codec import init_codec, save_codec
    from fish_speech_core.codec.config import FireflyConfig
    from fishtune.flows.finetune import finetune

    data = tmp_path / "data"
    shutil.copytree(DEMO / "bruno", data / "bruno")
    codec = tmp_path / "codec-tiny.pth"
    save_codec(init_codec(FireflyConfig.from_name("tiny"), seed=0), codec)
    config = FinetuneConfig(data=str(data), storage=f"{s3_bucket}/store", work_dir=str(tmp_path / "work"),
                            project="s3-outage", codec=str(codec))

    proxy = TcpProxy(moto_s3.port)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # s3fs (store + Prefect results) goes through the proxy
    # fishtune's own retry settings are under test: retry_io 4 attempts with backoff x botocore 1 attempt
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    _fresh_s3_clients()
    try:
        fired = threading.Event()
        watcher = threading.Thread(target=_watch_and_cut, args=(moto_s3.endpoint, s3_bucket[5:], proxy, fired, 60.0),
                                   daemon=True)
        watcher.start()
        started = time.perf_counter()
        state = finetune(config, return_state=True)
        outage_seconds = time.perf_counter() - started
        watcher.join(timeout=1)
        assert fired.is_set(), "the proxy was never stopped: normalize did not publish"
        assert state.is_failed()
        with pytest.raises(Exception, match=rf"Could not connect to the endpoint URL: .*127\.0\.0\.1:{proxy.port}") as info:
            state.result()
        assert "testing-secret-never-logged" not in str(info.value)
        assert outage_seconds < 40  # bounded retries, not a hang

        proxy.start()  # S3 is back (moto kept every object)
        _fresh_s3_clients()
        result = finetune(config)
        stages = {s["stage"]: s for s in result["stages"]}
        assert [s["stage"] for s in result["stages"]] == ["validate", "normalize", "extract", "pack"]
        assert stages["validate"]["cached"] and stages["normalize"]["cached"]  # finished before the outage
        assert not stages["extract"]["cached"] and not stages["pack"]["cached"]
        assert stages["extract"]["summary"]["extracted"] + stages["extract"]["summary"]["skipped"] == 10
        assert result["status"] == "completed"
        print(f"outage run {outage_seconds:.1f} s")
    finally:
        proxy.stop()
        monkeypatch.undo()
        _fresh_s3_clients()
