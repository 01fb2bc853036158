"""Every code example of the user's documents (seeds 000, 001, 002) runs as written.

Each example runs in its own Python process from a fresh directory, the way a user runs
it; only the database URL is replaced. Then the test reads the task table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lilota.models import TaskStatus
from lilota.store import TaskStore

EXAMPLES = Path(__file__).parent / "seed_examples"
SEED_URL = "postgresql+psycopg://postgres:postgres@localhost:5432/lilota_sample"


def example(name: str, db_url: str) -> str:
    text = (EXAMPLES / name).read_text()
    assert SEED_URL in text
    return text.replace(SEED_URL, db_url)


def run_python(
    directory: Path, main: str, timeout: float = 120, *, task_fails: str | None = None
) -> str:
    """Run ``main`` as a user would; its stderr has no traceback but, with
    ``task_fails``, the one the worker logs under that task's final failure line."""
    (directory / "main.py").write_text(main)
    done = subprocess.run(
        [sys.executable, "main.py"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    err = done.stderr
    if task_fails is not None:  # the task log's ERROR line, then the task's traceback
        lines = err.splitlines()
        at = lines.index("Traceback (most recent call last):")
        assert re.search(r" ERROR worker-\d+\[", lines[at - 1]), err
        assert task_fails in lines[at - 1], err
        end = next(i for i in range(at + 1, len(lines)) if not lines[i].startswith(" "))
        err = "\n".join(lines[: at - 1] + lines[end + 1 :])  # the exception's line too
    assert "Traceback" not in err, done.stderr
    return done.stdout


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "sample").mkdir()
    return tmp_path


def only_task(db_url: str):  # type: ignore[no-untyped-def]
    (task,) = TaskStore(db_url).list_tasks()
    return task


def test_seed002_single_file_example_prints_the_sum(workdir: Path, lilota_db_url: str) -> None:
    out = run_python(workdir, example("seed002_single_file.py", lilota_db_url))
    assert out.strip() == "2 + 3 = 5"
    task = only_task(lilota_db_url)
    assert task.status is TaskStatus.COMPLETED
    assert task.output == {"sum": 5}
    assert task.input == {"a": 2, "b": 3}
    assert task.progress_percentage == 100
    assert task.pid is not None and task.start_date_time and task.end_date_time


def test_seed001_script_example_prints_the_output_after_one_second(
    workdir: Path, lilota_db_url: str
) -> None:
    (workdir / "sample" / "myscript.py").write_text(example("seed001_myscript.py", lilota_db_url))
    out = run_python(workdir, example("seed001_main.py", lilota_db_url))
    assert out.splitlines() == ["We add the numbers 2 and 3: ", "{'sum': 5}"]
    assert only_task(lilota_db_url).status is TaskStatus.COMPLETED


def test_seed000_basic_task_runs_from_a_script_that_only_registers(
    workdir: Path, lilota_db_url: str
) -> None:
    # The seed's myscript.py registers hello-world but never calls worker.start().
    (workdir / "sample" / "myscript.py").write_text(
        example("seed000_basic_myscript.py", lilota_db_url)
    )
    fragment = example("seed000_basic_main_fragment.py", lilota_db_url)
    main = (
        "from lilota.core import Lilota\n"
        + fragment
        + textwrap.dedent(
            """
        lilota.stop()
        print(lilota.get_task_by_id(task_id).status)
        """
        )
    )
    out = run_python(workdir, main)
    assert out.splitlines() == ["Hello World", "completed"]


def test_seed000_add_example_with_models(workdir: Path, lilota_db_url: str) -> None:
    (workdir / "sample" / "myscript.py").write_text(
        example("seed000_add_myscript.py", lilota_db_url)
    )
    main = textwrap.dedent(
        f"""
        from dataclasses import dataclass
        from lilota.core import Lilota


        @dataclass
        class AddInput:
          a: int
          b: int


        @dataclass
        class AddOutput:
          sum: int


        lilota = Lilota(db_url={lilota_db_url!r}, script_path="sample/myscript.py", number_of_workers=2)
        lilota.start()
        task_id = lilota.schedule("add", AddInput(a=2, b=3))
        lilota.stop()
        task = lilota.get_task_by_id(task_id)
        add_output = AddOutput(**task.output)
        print(add_output.sum)
        """
    )
    assert run_python(workdir, main).strip() == "5"


def test_seed000_manual_progress_example_reaches_100(workdir: Path, lilota_db_url: str) -> None:
    (workdir / "sample" / "myscript.py").write_text(
        example("seed000_progress_myscript.py", lilota_db_url)
    )
    main = textwrap.dedent(
        f"""
        from lilota.core import Lilota

        lilota = Lilota(db_url={lilota_db_url!r}, script_path="sample/myscript.py", number_of_workers=1)
        lilota.start()
        task_id = lilota.schedule("do-something")
        lilota.stop()
        task = lilota.get_task_by_id(task_id)
        print(task.status, task.progress_percentage)
        """
    )
    assert run_python(workdir, main).strip() == "completed 100"


def test_seed002_shape_with_a_raising_task_fails_at_once_with_the_exception(
    workdir: Path, lilota_db_url: str
) -> None:
    # Issue 14 item 3: the seed user's program (schedule, stop(), read) with a task that
    # raises finds it failed with the exception, as the earlier release did: not pending
    # for a retry.
    main = example("seed002_single_file.py", lilota_db_url)
    main = main.replace(
        "  return AddOutput(sum=data.a + data.b)",
        "  raise ValueError(f'cannot add {data.a} and {data.b}')",
    )
    main = main.replace(
        '  add_output = AddOutput(**task.output)\n  print(f"{number1} + {number2} = {add_output.sum} ") # 2 + 3 = 5',
        "  print(task.status.value, task.attempts, task.exception.type, task.exception.message)",
    )
    out = run_python(
        workdir,
        main,
        task_fails="lilota.tasks: task 1 add attempt 1/1 failed in ",
    )
    assert out.splitlines() == ["failed 1 ValueError cannot add 2 and 3"]
    task = only_task(lilota_db_url)
    assert task.status is TaskStatus.FAILED and task.max_attempts == 1
    assert task.exception is not None and "raise ValueError" in task.exception.traceback
