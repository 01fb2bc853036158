"""What mypy --strict sees of typed task handles; checked by tests/unit/test_typing_probe.py.

Never run, only type-checked. A comment "R" followed by a type is the type mypy must
reveal on that line; "E" followed by an error code, an error mypy must report there. Every
other line must check cleanly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from typing_extensions import reveal_type

from lilota import Lilota, TaskProgress

lilota = Lilota("sqlite:///probe.db")


@dataclass
class ReportInput:
    month: str


@dataclass
class ReportOutput:
    total: int


@lilota.register("report", input_model=ReportInput, output_model=ReportOutput)
def report(data: ReportInput) -> ReportOutput:
    return ReportOutput(total=len(data.month))


@lilota.register("async-report", input_model=ReportInput, output_model=ReportOutput, max_attempts=3)
async def async_report(data: ReportInput) -> ReportOutput:
    return ReportOutput(total=len(data.month))


@lilota.register("ping")
def ping() -> str:
    return "pong"


@lilota.register("progress", None, None, TaskProgress)
def with_progress(data: dict[str, int], task_progress: TaskProgress) -> None:
    task_progress.set(50)


def typed_style() -> None:
    reveal_type(report(ReportInput(month="2026-01")))  # R: ReportOutput
    ref = report.schedule(ReportInput(month="2026-01"), delay=timedelta(seconds=5), priority=2)
    reveal_type(ref)  # R: TaskRef[ReportOutput]
    task = ref.wait(10)
    reveal_type(task)  # R: Task[ReportOutput]
    reveal_type(task.result())  # R: ReportOutput
    reveal_type(task.output)  # R: Any
    reveal_type(task.created_at)  # R: datetime
    task_id: int = ref  # a TaskRef is the task's id
    print(task_id, task.status, task.progress_percentage, task.exception, task.attempts)
    reveal_type(lilota.schedule(report, ReportInput(month="2026-01")))  # R: TaskRef[ReportOutput]
    refs = lilota.schedule_many(report, [ReportInput(month="2026-01")], priority=1)
    reveal_type(refs)  # R: list[TaskRef[ReportOutput]]
    more = report.schedule_many([ReportInput(month="2026-02")])
    reveal_type(more)  # R: list[TaskRef[ReportOutput]]
    done = async_report.schedule(ReportInput(month="2026-01")).wait()
    reveal_type(done.result())  # R: ReportOutput
    reveal_type(ping())  # R: str
    reveal_type(ping.schedule())  # R: TaskRef[Any]
    reveal_type(report.task_name)  # R: str
    with_progress.schedule({"a": 1}, unique_key="k", run_at=None, connection=None)


def seed_style() -> None:
    reveal_type(lilota.schedule("report", {"month": "2026-01"}))  # R: int
    reveal_type(lilota.schedule_many("report", [{"month": "2026-01"}]))  # R: list[int]
    reveal_type(lilota.wait(1))  # R: Task[Any]
    reveal_type(lilota.get_task_by_id(1))  # R: Task[Any] | None


def rejected() -> None:
    report.schedule({"month": "2026-01"})  # E: arg-type
    report.schedule(ReportOutput(total=1))  # E: arg-type
    report.schedule(ReportInput(month="2026-01"), priorty=1)  # E: call-arg
    report.schedule(ReportInput(month="2026-01"), delay=5)  # E: arg-type
    report(ReportOutput(total=1))  # E: arg-type
    lilota.schedule(report, ReportOutput(total=1))  # E: misc
    lilota.schedule("report", {}, priorty=1)  # E: call-overload
    total: str = report.schedule(ReportInput(month="x")).wait().result().total  # E: assignment
    print(total)
