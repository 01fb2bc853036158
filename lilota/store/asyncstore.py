"""The store's calls for asyncio callers: scheduling and reading without blocking the loop.

On PostgreSQL they run on psycopg's async connection (SQLAlchemy's asyncio engine, one
per event loop): the insert is :mod:`lilota.store.inserts`' own, run through
``run_sync`` on the async connection, so no thread is used. Where the backend has no
async driver (SQLite) each call runs the :class:`~lilota.store.TaskStore` method in a
thread. An application's ``AsyncConnection`` or ``AsyncSession`` (``connection=``) gets
the insert in its transaction on every backend, as a sync one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc

from lilota import serialization
from lilota.dialects.transactions import retry_after
from lilota.errors import InvalidArgument, TaskNotFound
from lilota.models import NewTask, Task
from lilota.store import inserts

# Waiting on LISTEN, a task is read again at least this often all the same (a notification
# lost with a dropped connection costs at most this much).
SAFETY_READ = 1.0

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncEngine

    from lilota.dialects.aio import FinishWatch
    from lilota.store import TaskStore


class AsyncStore:
    """Asyncio access to one :class:`~lilota.store.TaskStore`'s database."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self._engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine] = (
            weakref.WeakKeyDictionary()
        )
        self._watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FinishWatch | None] = (
            weakref.WeakKeyDictionary()
        )

    def _engine(self) -> AsyncEngine | None:
        """The async engine of the running loop (its connections belong to that loop)."""
        loop = asyncio.get_running_loop()
        engine = self._engines.get(loop)
        if engine is None:
            engine = self.store.dialect.create_async_engine()
            if engine is None:
                return None
            self._engines[loop] = engine
        return engine

    async def add_many(self, tasks: Sequence[NewTask], connection: object = None) -> list[int]:
        """Insert ``tasks`` (one: with its unique key rules) and wake idle workers; their
        ids. With ``connection``, in the caller's transaction (async or not)."""
        if connection is not None and _is_async(connection):
            return await _in_async_transaction(self.store, connection, tasks)
        engine = self._engine()
        if engine is None or connection is not None:
            return await asyncio.to_thread(self._add_in_thread, tasks, connection)
        if not self.store._schema_ready:  # once per store: create or check the tables
            await asyncio.to_thread(self.store.ensure_schema)
        ids: list[int] = await self._retried(engine, lambda conn: self._insert(conn, tasks))
        return ids

    def _add_in_thread(self, tasks: Sequence[NewTask], connection: object) -> list[int]:
        if len(tasks) == 1:
            return [self.store.add(tasks[0], connection=connection)]
        return self.store.add_many(tasks, connection=connection)

    def _insert(self, conn: Connection, tasks: Sequence[NewTask]) -> list[int]:
        dialect, now = self.store.dialect, self.store.clock()
        if len(tasks) == 1:
            return [inserts.insert_task(dialect, conn, tasks[0], now)]
        return inserts.insert_tasks(dialect, conn, tasks, now) if tasks else []

    async def _retried(self, engine: AsyncEngine, fn: Any) -> Any:
        """``fn(sync connection)`` in one transaction on ``engine``; retried as the
        store's transactions are (lilota.dialects.transactions), errors as lilota's."""
        for attempt in itertools.count(1):
            with inserts.translated(self.store):
                try:
                    async with engine.begin() as conn:
                        return await conn.run_sync(fn)
                except exc.DBAPIError as e:
                    delay = retry_after(self.store.dialect, attempt, e)
                    if delay is None:
                        raise
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def get(self, task_id: int) -> Task | None:
        """The task with ``task_id`` as stored now, or None."""
        engine = self._engine()
        if engine is None:
            return await asyncio.to_thread(self.store.get, task_id)
        if not self.store._schema_ready:
            await asyncio.to_thread(self.store.ensure_schema)
        query = self.store.sql["get"]
        rows = await self._retried(engine, lambda conn: conn.execute(query, {"id": task_id}).all())
        return Task.from_row(rows[0]._mapping, serialization.loads) if rows else None

    async def wait(self, task_id: int, timeout: float | None) -> Task:
        """Until the task is completed, failed or cancelled: it, without blocking the loop.
        On PostgreSQL it is read again when the store says attempts ended (LISTEN,
        :mod:`lilota.dialects.aio`), and every :data:`SAFETY_READ` seconds in
        case a notification was lost; elsewhere at growing intervals (2 ms to 50 ms).
        TimeoutError after ``timeout`` seconds, TaskNotFound for an unknown id."""
        deadline = None if timeout is None else time.monotonic() + timeout
        watch = self._watch()
        pause = 0.002
        while True:
            signal = None if watch is None else await watch.signal()
            task = await self.get(task_id)
            if task is None:
                raise TaskNotFound(f"no task with id {task_id}")
            if task.is_final:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"task {task_id} ({task.name}) is still {task.status} at "
                    f"{task.progress_percentage}% after {timeout} s"
                )
            if signal is None:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            left = SAFETY_READ if deadline is None else deadline - time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(signal.wait(), max(0.0, min(left, SAFETY_READ)))

    def _watch(self) -> FinishWatch | None:
        loop = asyncio.get_running_loop()
        if loop not in self._watches:
            self._watches[loop] = self.store.dialect.finish_watch()
        return self._watches[loop]

    async def dispose(self) -> None:
        """Close the running loop's pooled async connections and LISTEN connection."""
        watch = self._watches.pop(asyncio.get_running_loop(), None)
        if watch is not None:
            await watch.close()
        engine = self._engines.pop(asyncio.get_running_loop(), None)
        if engine is not None:
            await engine.dispose()


def _is_async(connection: object) -> bool:
    return type(connection).__module__.startswith("sqlalchemy.ext.asyncio")


async def _in_async_transaction(
    store: TaskStore, connection: Any, tasks: Sequence[NewTask]
) -> list[int]:
    """The insert in an application's ``AsyncConnection`` or ``AsyncSession``: the sync
    rules of :func:`lilota.store.inserts.add_in_caller_transaction`, through ``run_sync``."""
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    if isinstance(connection, async_scoped_session):
        connection = connection()
    if not isinstance(connection, (AsyncConnection, AsyncSession)):
        inserts.caller_connection(connection)  # raises, naming what it got
    if isinstance(connection, AsyncConnection) and connection.closed:
        raise InvalidArgument("connection is closed; pass an open Connection or Session")

    def insert(sync: Any) -> list[int]:
        return inserts.add_in_caller_transaction(store, sync, tasks)

    result: list[int] = await connection.run_sync(insert)
    return result
