"""A SQLite file deleted under running workers: each worker notices at its next lease
renewal, says so loudly and exits; its supervisor starts a new one, which works on the
file now at that path (instead of old workers holding the unlinked file while new tasks
wait for ever)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from lilota import Lilota, TaskStatus
from lilota.store import NewTask, TaskStore
from tests.integration.apps import reliability_tasks


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.05)
    return result


def test_a_worker_whose_file_is_deleted_exits_and_its_replacement_uses_the_new_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tasks.db"
    url = f"sqlite:///{path}"
    lilota = Lilota(
        url,
        number_of_workers=1,
        registry=reliability_tasks.app.registry,
        lease=timedelta(seconds=1.5),  # idle, a worker renews (and checks) every 0.5-1 s
    )
    lilota.start()
    try:
        first = lilota.wait(lilota.schedule("pid"), timeout=30)
        assert first.status is TaskStatus.COMPLETED
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)

        with caplog.at_level(logging.INFO, logger="lilota.supervisor"):
            fresh = TaskStore(url)  # another process's view: a new, empty file at the path
            task_id = fresh.add(NewTask(name="pid"))
            done = wait_until(
                lambda: (task := fresh.get(task_id)) is not None and task.status.is_final and task,
                "the task on the new file to be run",
            )
    finally:
        lilota.stop(timeout=30)

    assert done.status is TaskStatus.COMPLETED
    assert done.output != first.output  # another worker process ran it
    logged = capsys.readouterr().err
    # "deleted", or "replaced by another file" if the new file was there by then.
    assert re.search(
        f"the SQLite database {re.escape(str(path))} was (deleted|replaced by another file) "
        "while this process had it open",
        logged,
    )
    assert "ending this worker" in logged
    assert f"worker pid {first.output} replaced after database_replaced" in caplog.text
