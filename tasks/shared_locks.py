"""Cache locks in Redis, shared by every host of a remote store, that a crashed holder cannot keep.

prefect-redis's ``RedisLockManager`` takes a hold timeout, but Prefect's transactions never pass
one (``ResultStore.acquire_lock`` hands over the acquire timeout only), so its locks live until
released: a SIGKILLed run would leave its stage locked for ever. Here every lock is taken with a
TTL of ``hold_seconds`` and a thread of the holding process renews it every third of that while
the stage runs, however long (training runs for hours). A holder that dies stops renewing and
its lock expires ``hold_seconds`` later; the waiting run then takes it over.

A run paused for longer than ``hold_seconds`` (a stopped process, a frozen VM) loses its lock:
the other run may then compute the same stage too, as without shared locks (``tasks.caching``
says what that costs). The loss is logged, and so is a release that finds the lock gone.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import anyio
from prefect_redis.locking import RedisLockManager

from fish_speech_core.storage import redact, redact_text
from fishtune.tasks.caching import REDIS_URL_ENV, LockServiceUnavailable

HOLD_SECONDS = 60.0  # how long a dead holder's lock outlives it
POLL_SECONDS = 0.1
CONNECT_SECONDS = 5.0  # an unreachable Redis fails in seconds, not after the OS's TCP timeout

log = logging.getLogger("fishtune.locks")


class RenewingRedisLockManager(RedisLockManager):
    """``RedisLockManager`` whose locks expire ``hold_seconds`` after their holder stops renewing them."""

    def __init__(self, connection_url: str, hold_seconds: float = HOLD_SECONDS) -> None:
        self.hold_seconds = hold_seconds
        self._renewer: threading.Thread | None = None
        self._guard = threading.Lock()
        super().__init__(connection_url=connection_url)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "hold_seconds": self.hold_seconds}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._renewer, self._guard = None, threading.Lock()
        super().__setstate__(state)

    def _init_clients(self) -> None:
        from prefect_redis.connection import redis_from_url

        # URL query options still win over these (redis-py's rule)
        options = {"socket_connect_timeout": CONNECT_SECONDS, "socket_timeout": 30.0}
        self.client = redis_from_url(self.connection_url, **options)
        self.async_client = redis_from_url(self.connection_url, asynchronous=True, **options)

    def check(self) -> None:
        """Raise :class:`LockServiceUnavailable` (one line, URL redacted) if Redis does not answer."""
        try:
            self.client.ping()
        except Exception as err:  # noqa: BLE001 - refused, timed out, auth, TLS: all mean no shared locks
            reason = redact_text(str(err).splitlines()[0]) if str(err) else type(err).__name__
            raise LockServiceUnavailable(
                f"cache locks: Redis at {redact(self.connection_url)} does not answer ({type(err).__name__}: "
                f"{reason}); start it or fix {REDIS_URL_ENV}, or unset it to lock per host"
            ) from None

    # -- holding --------------------------------------------------------------------------------

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.hold_seconds)
        if acquired:
            self._start_renewing()
        return acquired

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        # the sync lock, so the renewing thread (sync client) can extend it
        return await anyio.to_thread.run_sync(lambda: self.acquire_lock(key, holder, acquire_timeout, hold_timeout))

    def release_lock(self, key: str, holder: str) -> None:
        try:
            super().release_lock(key, holder)
        except ValueError as err:  # redis' LockNotOwnedError too: it expired while this process was paused
            self._locks.pop(self._lock_name_for_key(key), None)
            log.warning("cache lock %s expired before it was released (%s): another run may have computed "
                        "the same stage", key, err)

    def _start_renewing(self) -> None:
        with self._guard:
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew, name="fishtune-lock-renewal", daemon=True)
                self._renewer.start()

    def _renew(self) -> None:
        """Reset the TTL of every lock this process holds, every third of ``hold_seconds``, until none is held."""
        while True:
            time.sleep(self.hold_seconds / 3)
            for name, lock in list(self._locks.items()):
                try:
                    lock.reacquire()
                except ValueError:  # redis' LockNotOwnedError: expired or taken over; release will say so
                    log.warning("cache lock %s was lost: it expired before it could be renewed", name)
                    self._locks.pop(name, None)
                except Exception as err:  # noqa: BLE001 - a blip: retried next round, the TTL has time left
                    log.warning("could not renew cache lock %s: %s", name, redact_text(str(err)))
            with self._guard:
                if not self._locks:
                    self._renewer = None
                    return

    # -- waiting --------------------------------------------------------------------------------
    # prefect-redis waits by taking the lock (with no TTL) and releasing it: a crash in between
    # would leave a lock nobody can remove. Polling never holds it.

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await anyio.sleep(POLL_SECONDS)
        return True
