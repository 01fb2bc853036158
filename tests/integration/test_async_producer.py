"""aschedule / aschedule_many / await_task and the handles' async methods, on every
backend: the same checks and errors as the sync calls, and no thread per call on
PostgreSQL (psycopg's async connection)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from lilota import (
    InvalidArgument,
    InvalidArgumentType,
    InvalidInput,
    Lilota,
    TaskNotFound,
    TaskRef,
    TaskStatus,
)
from lilota.inline import run_pending

T = TypeVar("T")


@dataclass
class SumInput:
    values: list[int]


@dataclass
class SumOutput:
    total: int


def total(data: SumInput) -> SumOutput:
    return SumOutput(total=sum(data.values))


@pytest.fixture
def app(lilota_db_url: str) -> Iterator[Lilota]:
    lilota = Lilota(lilota_db_url, number_of_workers=0)
    lilota.register("total", input_model=SumInput, output_model=SumOutput)(total)
    lilota.start()
    yield lilota
    lilota.store.dispose()


def run(app: Lilota, main: Callable[[], Awaitable[T]]) -> T:
    """``main()`` on a new event loop; the loop's pooled async connections closed after."""

    async def wrapped() -> T:
        try:
            return await main()
        finally:
            await app.astore.dispose()

    return asyncio.run(wrapped())


def test_aschedule_and_await_task_by_name_and_by_handle(app: Lilota) -> None:
    async def main() -> list[Any]:
        by_name = await app.aschedule("total", {"values": [1, 2]}, priority=2)
        by_ref = await app.aschedule(total, SumInput(values=[3]))
        via_handle = await total.aschedule(SumInput(values=[4, 5]), unique_key="k")  # type: ignore[attr-defined]
        again = await total.aschedule(SumInput(values=[4, 5]), unique_key="k")  # type: ignore[attr-defined]
        many = await app.aschedule_many(total, [SumInput(values=[6]), SumInput(values=[7])])
        assert again == via_handle
        assert (
            type(by_name) is int and [type(r) for r in (by_ref, via_handle, *many)] == [TaskRef] * 4
        )
        await asyncio.to_thread(run_pending, app)
        plain = await app.await_task(by_name, timeout=10)
        typed = [await r.await_task(timeout=10) for r in (by_ref, via_handle, *many)]
        return [plain.output, plain.priority] + [t.result().total for t in typed]

    assert run(app, main) == [{"total": 3}, 2, 3, 9, 6, 7]


def test_bad_arguments_get_the_errors_of_the_sync_calls(app: Lilota) -> None:
    async def main() -> None:
        with pytest.raises(InvalidInput, match=r"input\.values"):
            await app.aschedule("total", {"values": "x"})
        with pytest.raises(InvalidArgumentType, match="priority must be an int"):
            await app.aschedule("total", {"values": []}, priority="high")  # type: ignore[call-overload]
        with pytest.raises(InvalidArgument, match="pass run_at or delay, not both"):
            await app.aschedule_many("total", [], run_at=datetime.now(), delay=timedelta(1))
        with pytest.raises(InvalidArgumentType, match="inputs"):
            await app.aschedule_many("total", 5)  # type: ignore[call-overload]
        with pytest.raises(InvalidArgumentType, match="task_id must be an int"):
            await app.await_task("1")  # type: ignore[arg-type]
        with pytest.raises(TaskNotFound, match="no task with id 12345"):
            await app.await_task(12345)
        with pytest.raises(TaskNotFound):
            await app.await_task(2**70)
        with pytest.raises(InvalidArgumentType, match="connection must be a SQLAlchemy"):
            await app.aschedule("total", {"values": []}, connection="conn")
        task_id = await app.aschedule("total", {"values": []})
        with pytest.raises(TimeoutError, match=rf"task {task_id} \(total\) is still pending"):
            await app.await_task(task_id, timeout=0)

    run(app, main)
    assert app.store.count_by_status()["pending"] == 1  # only the last, good call wrote


@pytest.mark.lilota_backends(
    "postgres"
)  # SQLite has no async driver here: its calls run in a thread
def test_postgres_schedules_and_reads_without_a_thread(
    app: Lilota, monkeypatch: pytest.MonkeyPatch
) -> None:

    def no_thread(*args: object, **kwargs: object) -> object:
        raise AssertionError("a thread was used")

    async def main() -> int:
        monkeypatch.setattr(asyncio, "to_thread", no_thread)
        task_id = await app.aschedule("total", {"values": [1]})
        ids = await app.aschedule_many("total", [{"values": [2]}])
        task = await app.astore.get(task_id)
        assert task is not None and task.status is TaskStatus.PENDING
        return len(ids)

    assert run(app, main) == 1


@pytest.mark.lilota_backends(
    "postgres"
)  # no async SQLite driver is installed; a sync Connection works (below)
def test_an_async_connection_schedules_in_its_transaction(app: Lilota, lilota_db_url: str) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def main() -> tuple[Any, ...]:
        engine = create_async_engine(lilota_db_url)
        try:
            async with engine.connect() as conn:
                kept = await app.aschedule("total", {"values": [1]}, connection=conn)
                assert await app.astore.get(kept) is None  # not committed yet
                await conn.commit()
            async with engine.connect() as conn:
                dropped = await app.aschedule_many(total, [SumInput(values=[2])], connection=conn)
                await conn.rollback()
            async with AsyncSession(engine) as session:
                in_session = await app.aschedule("total", {"values": [3]}, connection=session)
                await session.commit()
            closed = engine.connect()
            await closed.start()
            await closed.close()
            with pytest.raises(InvalidArgument, match="connection is closed"):
                await app.aschedule("total", {"values": [4]}, connection=closed)
            return (await app.astore.get(kept), await app.astore.get(dropped[0]), in_session)
        finally:
            await engine.dispose()

    kept, dropped, in_session = run(app, main)
    assert kept is not None and dropped is None
    assert app.get_task_by_id(in_session) is not None


def test_a_sync_connection_works_with_aschedule_on_every_backend(
    app: Lilota, lilota_db_url: str
) -> None:
    engine = sa.create_engine(lilota_db_url)

    async def main() -> int:
        with engine.connect() as conn:
            task_id = await app.aschedule("total", {"values": [1]}, connection=conn)
            conn.commit()
        with engine.connect() as conn:
            await app.aschedule("total", {"values": [2]}, connection=conn)
            conn.rollback()
        return task_id

    try:
        task_id = run(app, main)
    finally:
        engine.dispose()
    assert app.store.count_by_status()["pending"] == 1
    assert app.get_task_by_id(task_id) is not None


@pytest.mark.lilota_backends(
    "postgres"
)  # SQLite has no notification: await_task reads at intervals there
def test_await_task_is_woken_by_the_end_of_the_task_on_postgres(
    app: Lilota, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lilota.store import asyncstore

    # Between two reads, only a notification wakes the waiter (within the test's time).
    monkeypatch.setattr(asyncstore, "SAFETY_READ", 3600.0)
    reads: list[Any] = []
    real_get = app.astore.get

    async def counted_get(task_id: int) -> Any:
        task = await real_get(task_id)
        reads.append(task.status if task else None)
        return task

    monkeypatch.setattr(app.astore, "get", counted_get)

    async def main() -> Any:
        task_id = await app.aschedule("total", {"values": [2, 2]})
        waiter = asyncio.create_task(app.await_task(task_id, timeout=120))
        while not reads:  # the waiter read the task once: pending, now it waits
            await asyncio.sleep(0.001)
        assert reads == [TaskStatus.PENDING]
        await asyncio.to_thread(run_pending, app)
        task = await waiter
        return task.output, reads[-1]

    assert run(app, main) == ({"total": 4}, TaskStatus.COMPLETED)


def test_await_task_of_a_task_cancelled_while_waiting(app: Lilota) -> None:
    async def main() -> Any:
        task_id = await app.aschedule("total", {"values": [1]})
        waiter = asyncio.create_task(app.await_task(task_id, timeout=120))
        await asyncio.sleep(0)
        await asyncio.to_thread(app.cancel, task_id)
        return (await waiter).status

    assert run(app, main) is TaskStatus.CANCELLED


@pytest.mark.lilota_backends("postgres")  # SQLite reads at intervals anyway
def test_await_task_reads_at_intervals_when_it_cannot_listen(
    app: Lilota, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lilota.dialects import aio

    # A LISTEN connection to a port nothing listens on (loopback): it never comes. Each
    # read does not wait for it again (with the hour below, one that did would hang).
    monkeypatch.setattr(aio, "CONNECT_TIMEOUT", 3600)
    monkeypatch.setattr(
        app.store.dialect,
        "finish_watch",
        lambda: aio.FinishWatch("host=127.0.0.1 port=1 connect_timeout=1", {}),
    )

    async def main() -> Any:
        task_id = await app.aschedule("total", {"values": [5]})
        waiter = asyncio.create_task(app.await_task(task_id, timeout=120))
        await asyncio.to_thread(run_pending, app)
        return (await asyncio.wait_for(waiter, 120)).output

    assert run(app, main) == {"total": 5}
