"""Tasks for the integration tests, registered on a module-level Lilota.

Tests make their own ``Lilota(db_url, registry=app.registry)``; its worker processes
import this module to find the tasks. Executions are recorded outside the task table:
each worker process appends to its own file in ``$LILOTA_TEST_MARKS``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lilota import Lilota, TaskProgress

app = Lilota(number_of_workers=0)


@dataclass
class AddInput:
    a: int
    b: int


@dataclass
class AddOutput:
    sum: int


def mark(value: object) -> None:
    directory = os.environ["LILOTA_TEST_MARKS"]
    with open(os.path.join(directory, f"{os.getpid()}.txt"), "a") as f:
        f.write(f"{value}\n")


def read_marks(directory: Path) -> list[str]:
    return [line for p in directory.glob("*.txt") for line in p.read_text().splitlines()]


def wait_for_file(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


@app.register("add", input_model=AddInput, output_model=AddOutput)
def add(data: AddInput) -> AddOutput:
    return AddOutput(sum=data.a + data.b)


@app.register("record")
def record(data: dict) -> None:
    mark(data["n"])


@app.register("fail")
def fail(data: dict) -> None:
    raise ValueError(f"boom {data['x']}")


@app.register("pid")
def pid() -> int:
    return os.getpid()


@app.register("wait-for-file")
def wait_for(data: dict) -> str:
    """Runs until the test creates the file named in the input."""
    mark(f"started {data['path']}")
    wait_for_file(Path(data["path"]))
    return "done"


@app.register("stepped-progress", task_progress=TaskProgress)
def stepped_progress(data: dict, task_progress: TaskProgress) -> None:
    """Sets 25, 50, 75, each time waiting for the test to see it (a file per step)."""
    for step in (25, 50, 75):
        task_progress.set(step)
        wait_for_file(Path(data["dir"]) / f"seen-{step}")


@app.register("bad-progress", task_progress=TaskProgress)
def bad_progress(task_progress: TaskProgress) -> None:
    task_progress.set(150)
