"""Fixtures for the storage and Prefect tests: a real S3 (moto_server over HTTP) and a Prefect harness.

Both are session-scoped and started only by the tests that ask for them, so the rest of the
suite pays nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
            time.sleep(0.1)


class MotoServer:
    """A moto S3 server on 127.0.0.1 that a test may stop and restart on the same port."""

    def __init__(self, port: int, log: Path):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_http(self.endpoint + "/moto-api/")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A real S3 endpoint (moto_server, HTTP) with the standard AWS env pointing at it."""
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": server.endpoint,
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(moto_s3) -> str:
    """A fresh bucket per test; returns ``s3://<bucket>``."""
    import boto3
    import fsspec

    name = f"fishtune-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3.endpoint).create_bucket(Bucket=name)
    fsspec.filesystem("s3").invalidate_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Debian's redis-server on 127.0.0.1 (no persistence); yields its URL. Idle, it costs nothing."""
    import redis

    port, folder = free_port(), tmp_path_factory.mktemp("redis")
    with open(folder / "redis.log", "ab") as log:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder)], stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(folder / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.05)
    try:
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server for the whole session (about 10 s to start on 2 cores).

    Analytics off (no outbound calls, no 'database is locked' noise) and a 90 s startup timeout
    for loaded CI runners. Not autouse: only the flow tests pay for it.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DO_NOT_TRACK", "1")
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=90):
            yield


@pytest.fixture
def prefect_env(prefect_harness, tmp_path):
    """Per-test result folder: cache records are files, so they must not leak between tests."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        yield


@contextlib.contextmanager
def api_in_process(api: str, results: Path):
    """This test process talks to the server at ``api`` (results under ``results``) for a while.

    Prefect's events and API-log workers are process-wide services keyed without the API URL:
    one started earlier (say by the session harness) would go on sending this block's task-run
    events to the old server, where they are lost. Drain them on the way in and out, so the
    next event starts a worker for the server that is current then."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    _drain_prefect_services()
    try:
        with temporary_settings({PREFECT_API_URL: api, PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}):
            yield
            _drain_prefect_services()
    finally:
        _drain_prefect_services()


def _drain_prefect_services() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:  # on Prefect's own loop: drain() returns awaitables inside a loop
        for result in (APILogWorker.drain_all(timeout=30), EventsWorker.drain_all(timeout=30)):
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())


def _sigint_default() -> None:
    # A child of a background shell job inherits SIGINT as *ignored*; Prefect's SIGTERM handler
    # re-sends SIGINT, so such a worker would ignore SIGTERM. Reset it so terminate() works.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 plus process workers, all stoppable with SIGTERM."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.settings = {
            "PREFECT_HOME": str(root / "home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # fast pickup, without keeping SQLite busy
            "PREFECT_WORKER_PREFETCH_SECONDS": "2",
            # how soon a worker that stopped heartbeating is marked OFFLINE (default every 15 s)
            "PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS": "3",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(root / "results"),  # parent and children read the same results
        }

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process talking to this server: the test process's as it is now
        (the server lives for the session, so a later module's moto endpoint is in it) plus ours."""
        return {**os.environ, **self.settings}

    def spawn(self, *args: str, log: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.root / log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", *args], env={**self.env, **(env or {})}, stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=_sigint_default, cwd=cwd,
            )
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self.spawn("server", "start", "--host", "127.0.0.1", "--port", str(self.port), log="server.log")
        wait_http(self.api + "/health", timeout=120)

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "prefect", *args], env=self.env, capture_output=True, text=True, check=check)

    def stop(self, since: int = 0) -> None:
        """Stop the processes started from the ``since``-th on (0: the server too), newest first."""
        procs, self.procs = self.procs[since:], self.procs[:since]
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def _prefect_server_process(tmp_path_factory):
    """The one ``prefect server start`` of the session (20-30 s to start on 2 cores: paid once, not
    per module); idle, it costs little. Only ``prefect_server`` hands it out."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prefect_server(_prefect_server_process):
    """A real Prefect server on 127.0.0.1 (SQLite in a temp folder) and the workers its tests start.

    The server is the session's; the workers (and any other process spawned through it) are the
    module's: they stop when the module ends, so polling workers do not load the rest of the suite.
    What a module leaves on the server (runs, deployments) stays: tests select their own runs by
    deployment, project or name, never by counting everything there.
    """
    server = _prefect_server_process
    started = len(server.procs)
    try:
        yield server
    finally:
        server.stop(since=started)


@pytest.fixture(autouse=True)
def _prefect_console_on_a_live_stream():
    """CliRunner closes the stream it swapped in for stderr; Prefect's console handlers created while
    a command ran in it outlive it, and the next flow's first log line then fails recursively
    (RecursionError in rich). Point any such handler back at the real stderr after each test."""
    yield
    if "prefect.logging.handlers" not in sys.modules:
        return
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one
                handler.console.file = sys.stderr
