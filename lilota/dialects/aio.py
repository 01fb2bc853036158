"""What asyncio callers use of PostgreSQL: the async engine, and hearing that tasks ended.

:func:`async_engine` is SQLAlchemy's asyncio engine on psycopg's async connection (its
asyncio extension and greenlet loaded on first use). :class:`FinishWatch` is ``LISTEN``
for ``await_task``: the store sends ``NOTIFY lilota_finished`` in every transaction that ends attempts (a
worker's finish, a recovery, a cancel), so an asyncio caller waiting for a task reads it
again when something ended, instead of at intervals. One :class:`FinishWatch` per event
loop holds one LISTEN connection (psycopg's async connection) for all its waiters; a
waiter takes :meth:`FinishWatch.signal` *before* reading the task, so an end between the
read and the wait is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine.url import URL

from lilota.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

FINISHED_CHANNEL = "lilota_finished"

# How long a first waiter waits for the first attempt at the LISTEN connection before
# reading at intervals; while the connection cannot be had, later waiters do not wait.
CONNECT_TIMEOUT = 5.0


def async_engine(url: URL, connect_args: dict[str, Any]) -> AsyncEngine:
    """The asyncio engine of ``url`` (a small pool: one per event loop)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    if importlib.util.find_spec("greenlet") is None:  # SQLAlchemy's asyncio runs on it
        raise ConfigurationError(
            "aschedule()/await_task() on PostgreSQL need SQLAlchemy's asyncio support: "
            "pip install 'lilota[asyncio]'"
        )
    return create_async_engine(
        url, pool_size=2, max_overflow=10, pool_recycle=1800, connect_args=connect_args
    )


class FinishWatch:
    """One LISTEN connection on ``conninfo`` (psycopg ``connect_args``), started by the
    first :meth:`signal` on the running loop and reconnected when lost."""

    def __init__(self, conninfo: str, connect_args: dict[str, Any]) -> None:
        self._conninfo, self._connect_args = conninfo, connect_args
        self._event = asyncio.Event()  # set by the next notification
        self._ready = asyncio.Event()  # LISTEN is in effect
        self._tried = asyncio.Event()  # the first attempt to connect ended, either way
        self._runner: asyncio.Task[None] | None = None

    async def signal(self) -> asyncio.Event | None:
        """An event the next notification sets (take it before reading the task); None
        while the LISTEN connection cannot be had (the caller reads at intervals)."""
        if self._runner is None or self._runner.done():
            self._ready.clear()
            self._tried.clear()
            self._runner = asyncio.create_task(self._run(), name="lilota-finish-watch")
        if not self._ready.is_set() and not self._tried.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._tried.wait(), CONNECT_TIMEOUT)
        return self._event if self._ready.is_set() else None

    async def _run(self) -> None:
        import psycopg

        failing = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, **self._connect_args
                )
            except psycopg.Error as e:
                if not failing:  # one warning per outage, not one per second
                    log.warning("cannot LISTEN for finished tasks (%s); reading at intervals", e)
                failing = True
                self._tried.set()
                await asyncio.sleep(1.0)
                continue
            failing = False
            try:
                await conn.execute(f"LISTEN {FINISHED_CHANNEL}")
                self._ready.set()
                self._tried.set()
                self._wake()  # what ended while there was no connection
                async for _ in conn.notifies():
                    self._wake()
            except psycopg.Error as e:
                log.warning("lost the LISTEN connection for finished tasks (%s)", e)
            finally:
                self._ready.clear()
                with contextlib.suppress(Exception):
                    await conn.close()

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
