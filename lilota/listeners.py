"""What an idle worker waits on until tasks may have arrived, one kind per backend.

A PostgreSQL worker LISTENs on :data:`NOTIFY_CHANNEL`, on which scheduling sends one
NOTIFY per statement; a worker on a SQLite file watches ``PRAGMA data_version``, which
changes whenever another connection commits. :mod:`lilota.dialects` picks the kind (the
:meth:`~lilota.dialects.Dialect.listener`); these classes use the drivers directly, on a
connection of their own, so that a wait never holds a pooled connection.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "lilota_task"

# How often an idle SQLite worker looks at PRAGMA data_version. The pragma reads shared
# memory (no disk, no lock), so 5 ms costs well under 1 % of a core and keeps the start
# latency of a new task near 3 ms; 50 ms would cost the same latency in every task.
SQLITE_WATCH_INTERVAL = 0.005


class Listener:
    """Waits for a sign that tasks were scheduled. ``wait`` may return early (spuriously).

    ``wake()`` may be called from any thread or a signal handler: the current or next
    ``wait`` returns within a quarter of a second. This base class only waits for
    ``wake()`` (an in-memory database: nothing outside this process can schedule).
    """

    # Longest uninterrupted block inside wait(): how quickly wake() takes effect.
    _SLICE = 0.25

    def __init__(self, *, poll: float | None = None) -> None:
        self._woken = threading.Event()
        # Without a sign of new tasks (behind a transaction pooler, say), ``wait`` returns
        # after at most ``poll`` seconds, so that the caller looks again.
        self._poll = poll

    def wake(self) -> None:
        self._woken.set()

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if woken by a sign of new tasks."""
        if self._poll is not None and timeout > self._poll:
            timeout = self._poll
        deadline = time.monotonic() + timeout
        while not self._woken.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._wait_once(min(left, self._SLICE)):
                return True
        return True

    def _wait_once(self, timeout: float) -> bool:
        self._woken.wait(timeout)
        return False

    def close(self) -> None:
        pass


class SQLiteListener(Listener):
    """Watches ``PRAGMA data_version`` of the database file at ``path`` on its own
    connection: it changes exactly when another connection commits."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._version = self._read()

    def _read(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _wait_once(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            version = self._read()
            if version != self._version:
                self._version = version
                return True
            left = deadline - time.monotonic()
            if left <= 0 or self._woken.is_set():
                return False
            time.sleep(min(SQLITE_WATCH_INTERVAL, left))

    def close(self) -> None:
        self._conn.close()


class PostgresListener(Listener):
    """A dedicated psycopg connection that LISTENs on the task channel.

    ``conninfo`` and ``connect_args`` are passed to :func:`psycopg.connect`; ``safe_url``
    (no password) names the database in log records. A lost connection is reconnected.
    """

    def __init__(self, conninfo: str, safe_url: str, connect_args: dict[str, Any]) -> None:
        super().__init__()
        self._conninfo, self._safe_url, self._connect_args = conninfo, safe_url, connect_args
        self._conn: Any = None
        self._broken = False  # the connection was lost and is not back yet
        import psycopg

        try:
            self._connect()
        except psycopg.Error as e:  # the database is down: wait() connects when it is back
            self._lost(e)

    def _connect(self) -> None:
        import psycopg

        self._conn = psycopg.connect(self._conninfo, autocommit=True, **self._connect_args)
        self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        if self._broken:
            self._broken = False
            log.info("LISTEN connection to %s is back", self._safe_url)

    def _lost(self, error: Exception) -> None:
        # One warning per outage, not one per reconnection attempt.
        if not self._broken:
            log.warning("lost the LISTEN connection (%s); reconnecting", error)
        self._broken = True
        self.close()

    def _wait_once(self, timeout: float) -> bool:
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._connect()
            woken = False
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                woken = True
            if woken:  # drain what else arrived, so one burst costs one wake-up
                for _ in self._conn.notifies(timeout=0.0):
                    pass
            return woken
        except psycopg.Error as e:
            self._lost(e)
            self._woken.wait(min(timeout, 1.0))
            return True  # look for work anyway: notifications may have been missed

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
