"""The asyncio producer API of :class:`~lilota.core.Lilota`: ``aschedule``,
``aschedule_many`` and ``await_task``, which never block the event loop.

The checks are those of the sync calls (:func:`lilota.registry.new_task`, before any
I/O); the writes and reads are :class:`lilota.store.asyncstore.AsyncStore`'s (psycopg's
async connection on PostgreSQL, a thread on SQLite).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, overload

from typing_extensions import Unpack

from lilota import validation
from lilota.errors import TaskNotFound
from lilota.handles import (
    In,
    Out,
    ScheduleManyOptions,
    ScheduleOptions,
    TaskHandle,
    TaskRef,
    new_batch,
)
from lilota.models import Task
from lilota.registry import Registry

if TYPE_CHECKING:
    from lilota.store import TaskStore
    from lilota.store.asyncstore import AsyncStore


class AsyncProducer:
    """``aschedule``/``aschedule_many``/``await_task`` on top of what Lilota has."""

    registry: Registry
    _async_store: AsyncStore | None

    # Lilota's (lilota.core).
    if TYPE_CHECKING:

        @property
        def store(self) -> TaskStore: ...

    _check_open: Callable[[], None]
    _known_names: Callable[[], Collection[str] | None]
    _clock: Callable[[], datetime]
    _remember: Callable[[Sequence[int]], None]

    @property
    def astore(self) -> AsyncStore:
        """The store's asyncio calls (made on first use)."""
        if self._async_store is None:
            from lilota.store.asyncstore import AsyncStore

            self._async_store = AsyncStore(self.store)
        return self._async_store

    @overload
    async def aschedule(
        self, name: TaskHandle[..., Any, In, Out], input: In, **o: Unpack[ScheduleOptions]
    ) -> TaskRef[Out]: ...
    @overload
    async def aschedule(
        self, name: str, input: Any = None, **o: Unpack[ScheduleOptions]
    ) -> int: ...

    async def aschedule(
        self,
        name: str | TaskHandle[..., Any, Any, Any],
        input: Any = None,
        *,
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        priority: int = 0,
        unique_key: str | None = None,
        description: str | None = None,
        max_attempts: int | None = None,
        connection: object = None,
    ) -> int:
        """:meth:`~lilota.core.Lilota.schedule` for asyncio code: the same arguments,
        checks and errors, without blocking the event loop. ``connection`` may also be an
        ``AsyncConnection`` or ``AsyncSession`` (the task is written in its transaction)."""
        options: dict[str, Any] = {"run_at": run_at, "delay": delay, "priority": priority}
        options |= {"unique_key": unique_key, "description": description}
        with new_batch(self, name, input, many=False, max_attempts=max_attempts, **options) as b:  # type: ignore[arg-type]
            b.ids = await self.astore.add_many(b.tasks, connection)
        return b.result()[0]  # type: ignore[no-any-return]

    @overload
    async def aschedule_many(
        self,
        name: TaskHandle[..., Any, In, Out],
        inputs: Iterable[In],
        **o: Unpack[ScheduleManyOptions],
    ) -> list[TaskRef[Out]]: ...
    @overload
    async def aschedule_many(
        self, name: str, inputs: Iterable[Any], **o: Unpack[ScheduleManyOptions]
    ) -> list[int]: ...

    async def aschedule_many(
        self,
        name: str | TaskHandle[..., Any, Any, Any],
        inputs: Iterable[Any],
        *,
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        connection: object = None,
    ) -> list[int] | list[TaskRef[Any]]:
        """:meth:`~lilota.core.Lilota.schedule_many` for asyncio code (one statement, as
        there; the same checks and errors)."""
        options: dict[str, Any] = {"run_at": run_at, "delay": delay, "priority": priority}
        with new_batch(self, name, inputs, many=True, max_attempts=max_attempts, **options) as b:  # type: ignore[arg-type]
            if b.tasks or connection is not None:  # nothing to store, no transaction to join
                b.ids = await self.astore.add_many(b.tasks, connection)
        return b.result()

    async def aclose(self) -> None:
        """Close the pooled async connections (and LISTEN connection) of the running event
        loop: at the end of an app's lifespan (the rest closes with the loop anyway)."""
        if self._async_store is not None:
            await self._async_store.dispose()

    async def await_task(self, task_id: int, timeout: float | None = None) -> Task:
        """:meth:`~lilota.core.Lilota.wait` for asyncio code: the task once it is
        completed, failed or cancelled, without blocking the event loop. Raises as
        ``wait`` does (TimeoutError, TaskNotFound, InvalidArgumentType/InvalidArgument)."""
        found = validation.task_id(task_id)
        timeout = validation.seconds(timeout, "timeout")
        if found is None:  # no task can have it: what the store says of a missing id
            raise TaskNotFound(f"no task with id {task_id}")
        return await self.astore.wait(found, timeout)
