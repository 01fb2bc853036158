"""Typed task handles at run time: what ``@lilota.register`` returns, ``TaskRef`` and
``Task.result()``, on every backend. Tasks run inline (lilota.inline) or in workers."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from lilota import (
    InvalidInput,
    Lilota,
    LilotaWorker,
    Task,
    TaskCancelled,
    TaskFailed,
    TaskNotFinished,
    TaskRef,
    TaskStatus,
)
from lilota.inline import eager, run_pending
from tests.integration.apps import tasks
from tests.integration.apps.tasks import AddInput, AddOutput


@dataclass
class ReportInput:
    month: str


@dataclass
class ReportOutput:
    month: str
    total: int


def report(data: ReportInput) -> ReportOutput:
    if data.month == "bad":
        raise ValueError(f"no data for {data.month}")
    return ReportOutput(month=data.month, total=len(data.month))


@pytest.fixture
def app(lilota_db_url: str) -> Iterator[Lilota]:
    lilota = Lilota(lilota_db_url, number_of_workers=0)
    lilota.start()
    yield lilota
    lilota.store.dispose()


@pytest.fixture
def handle(app: Lilota):  # type: ignore[no-untyped-def]
    return app.register("report", input_model=ReportInput, output_model=ReportOutput)(report)


def test_the_decorated_name_is_still_the_plain_function(app: Lilota, handle) -> None:  # type: ignore[no-untyped-def]
    assert handle is report  # called as before, found by name by a cpu_bound pool
    assert report(ReportInput(month="2026-01")) == ReportOutput(month="2026-01", total=7)
    assert report.task_name == "report"  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(tasks.add)) is tasks.add
    worker = LilotaWorker("sqlite://")
    plain = worker.register("plain")(report)  # a worker's register is untouched
    assert plain is report


def test_a_typed_handle_schedules_and_rebuilds_the_output(app: Lilota, handle) -> None:  # type: ignore[no-untyped-def]
    ref = handle.schedule(ReportInput(month="2026-01"), priority=3, unique_key="jan")
    assert isinstance(ref, TaskRef) and isinstance(ref, int) and ref.id == int(ref)
    assert type(pickle.loads(pickle.dumps(ref))) is int  # crossing processes: the id
    assert handle.schedule(ReportInput(month="2026-01"), unique_key="jan") == ref
    assert app.get_task_by_id(ref).priority == 3  # type: ignore[union-attr]
    with pytest.raises(TaskNotFinished, match=rf"task {ref} \(report\) is still pending"):
        ref.get().result()  # type: ignore[union-attr]
    run_pending(app)
    task = ref.wait(timeout=10)
    assert task.output == {"month": "2026-01", "total": 7}  # the stored JSON, as before
    assert task.result() == ReportOutput(month="2026-01", total=7)
    assert isinstance(task.created_at, datetime)


def test_schedule_by_reference_and_by_name(app: Lilota, handle) -> None:  # type: ignore[no-untyped-def]
    by_ref = app.schedule(handle, ReportInput(month="2026-02"))
    by_name = app.schedule("report", {"month": "2026-03"})
    assert type(by_ref) is TaskRef and type(by_name) is int
    refs = app.schedule_many(handle, [ReportInput(month="a"), ReportInput(month="bb")])
    many = handle.schedule_many([ReportInput(month="ccc")])
    assert [type(r) for r in refs + many] == [TaskRef] * 3
    assert type(app.schedule_many("report", [{"month": "d"}])[0]) is int
    run_pending(app)
    assert [r.wait(10).result().total for r in refs + many] == [1, 2, 3]
    assert app.wait(by_name).output == {"month": "2026-03", "total": 7}


def test_a_failed_task_raises_task_failed_with_the_remote_error(app: Lilota, handle) -> None:  # type: ignore[no-untyped-def]
    ref = handle.schedule(ReportInput(month="bad"))
    run_pending(app)
    task = ref.wait(10)
    with pytest.raises(
        TaskFailed, match=rf"task {ref} \(report\) failed: ValueError: no data"
    ) as e:
        task.result()
    assert (e.value.task_id, e.value.remote_type) == (ref, "ValueError")
    assert e.value.remote_message == "no data for bad"
    assert 'raise ValueError(f"no data for {data.month}")' in e.value.remote_traceback


def test_a_cancelled_task_raises_task_cancelled(app: Lilota, handle) -> None:  # type: ignore[no-untyped-def]
    ref = handle.schedule(ReportInput(month="2026-01"))
    app.cancel(ref)
    with pytest.raises(TaskCancelled, match=rf"task {ref} \(report\) was cancelled"):
        ref.wait(10).result()


def test_bad_input_through_a_handle_is_refused_as_by_name(app: Lilota, handle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidInput, match=r"input\.month"):
        handle.schedule({"total": 1})
    assert app.get_tasks() == []


def test_a_handle_schedules_in_the_callers_transaction(
    app: Lilota,
    handle,  # type: ignore[no-untyped-def]
    lilota_db_url: str,
) -> None:
    engine = sa.create_engine(lilota_db_url)
    try:
        with engine.connect() as conn:
            ref = handle.schedule(ReportInput(month="2026-01"), connection=conn)
            assert ref.get() is None
            conn.rollback()
        assert ref.get() is None
    finally:
        engine.dispose()


def test_eager_mode_runs_tasks_scheduled_through_a_handle(
    app: Lilota,
    handle,  # type: ignore[no-untyped-def]
    lilota_db_url: str,
) -> None:
    engine = sa.create_engine(lilota_db_url)
    try:
        with eager(app):
            ref = handle.schedule(ReportInput(month="2026-01"))
            assert ref.get().status is TaskStatus.COMPLETED  # type: ignore[union-attr]
            with engine.connect() as conn:  # not committed: not run (SQLite: no lock wait)
                later = handle.schedule(ReportInput(month="2026-02"), connection=conn)
                conn.commit()
            assert later.get().status is TaskStatus.PENDING  # type: ignore[union-attr]
    finally:
        engine.dispose()


def test_a_callable_that_takes_no_attributes_is_wrapped(app: Lilota) -> None:
    class Totals:
        def count(self, data: dict) -> int:  # type: ignore[type-arg]
            return len(data)

    handle = app.register("count")(Totals().count)
    assert handle({"a": 1}) == 1 and handle.task_name == "count"
    ref = handle.schedule({"a": 1, "b": 2})
    run_pending(app)
    assert ref.wait(10).result() == 2


def test_a_task_built_by_hand_has_a_creation_time() -> None:
    task: Task[int] = Task(id=1, name="t", status=TaskStatus.COMPLETED, output=3)
    assert task.created_at.tzinfo is not None
    assert task.result() == 3  # no output model: the stored value


@pytest.mark.containers
def test_a_worker_runs_a_task_scheduled_through_a_handle(lilota_db_url: str) -> None:
    lilota = Lilota(lilota_db_url, number_of_workers=1, registry=tasks.app.registry)
    lilota.start()
    try:
        # tasks.add was registered on tasks.app: scheduled by reference on this instance,
        # its ref waits here.
        ref = lilota.schedule(tasks.add, AddInput(a=2, b=3))
        assert ref.wait(timeout=60).result() == AddOutput(sum=5)
    finally:
        lilota.stop(timeout=30)
        lilota.store.dispose()


def test_a_function_registered_on_a_second_instance_schedules_there_saying_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def add(data: dict) -> int:
        return int(data["x"]) + 1

    first = Lilota(f"sqlite:///{tmp_path}/first.db", number_of_workers=0)
    second = Lilota(f"sqlite:///{tmp_path}/second.db", number_of_workers=0)
    try:
        handle = first.register("add")(add)
        handle.schedule({"x": 1})
        assert not caplog.records
        handle = second.register("add")(add)
        assert "registered on another Lilota instance too" in caplog.text
        assert "second.db" in caplog.text
        handle.schedule({"x": 2})  # the last registration's instance, as the log said
        assert [t.input for t in second.get_tasks()] == [{"x": 2}]
        first.schedule(handle, {"x": 3})  # an instance chooses
        assert sorted(t.input["x"] for t in first.get_tasks()) == [1, 3]
    finally:
        first.store.dispose()
        second.store.dispose()
