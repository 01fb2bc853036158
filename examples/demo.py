"""lilota demo: background tasks with progress, on the embedded default database (SQLite).

Run it with ``python examples/demo.py``. It starts two worker processes, schedules a few
"report" tasks that take a couple of seconds each and report their progress, one task
that fails on purpose, and a quick sum; then it shows their progress until all are
done and prints each result. The tasks live in ``lilota.db`` in the current directory.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

from lilota import Lilota, Task, TaskProgress

# db_url defaults to sqlite:///lilota.db. The workers' per-task INFO lines would mix with
# the progress bars below: log WARNING and up only (a failure still shows; README: Logging).
lilota = Lilota(number_of_workers=2, log_level="warning")


@dataclass
class ReportInput:
    customer: str
    rows: int


@dataclass
class ReportOutput:
    customer: str
    total: int


@dataclass
class AddInput:
    a: int
    b: int


@dataclass
class AddOutput:
    sum: int


@lilota.register(
    "report", input_model=ReportInput, output_model=ReportOutput, task_progress=TaskProgress
)
def build_report(data: ReportInput, task_progress: TaskProgress) -> ReportOutput:
    """A slow task: "reads" its rows in ten steps and reports progress after each."""
    if data.rows < 0:
        raise ValueError(f"a report needs rows >= 0, got {data.rows}")
    total = 0
    for step in range(1, 11):
        time.sleep(random.uniform(0.1, 0.3))
        total += data.rows // 10
        task_progress.set(step * 10)
    return ReportOutput(customer=data.customer, total=total)


@lilota.register("add", input_model=AddInput, output_model=AddOutput)
def add(data: AddInput) -> AddOutput:
    return AddOutput(sum=data.a + data.b)


def bar(percentage: int, width: int = 20) -> str:
    filled = width * percentage // 100
    return "#" * filled + "." * (width - filled)


def show(tasks: list[Task]) -> None:
    for task in tasks:
        print(
            f"  task {task.id:>4}  {task.name:<7} [{bar(task.progress_percentage)}] {task.progress_percentage:>3}%  {task.status}"
        )


def main() -> None:
    print("Starting 2 worker processes on sqlite:///lilota.db ...")
    lilota.start()
    ids = [
        lilota.schedule("report", ReportInput(customer=name, rows=rows))
        for name, rows in [("ACME", 1000), ("Globex", 2500), ("Initech", 700)]
    ]
    ids.append(lilota.schedule("report", ReportInput(customer="Broken Inc", rows=-1)))
    ids.append(lilota.schedule("add", AddInput(a=2, b=3)))
    print(f"Scheduled tasks {ids}; schedule() returned at once.\n")

    while True:
        tasks = [lilota.get_task_by_id(i) for i in ids]
        print(time.strftime("%H:%M:%S"))
        show([t for t in tasks if t is not None])
        if all(t is not None and t.is_final for t in tasks):
            break
        time.sleep(0.5)

    print("\nResults:")
    for task_id in ids:
        task = lilota.get_task_by_id(task_id)
        assert task is not None
        if task.exception is not None:
            print(f"  task {task.id}: {task.status}: {task.exception}")
        else:
            print(f"  task {task.id}: {task.status}: {task.output}")
    lilota.stop()
    print("\nStopped. Look at the tasks again with: lilota tasks  (or lilota show ID)")


if __name__ == "__main__":
    sys.exit(main())
