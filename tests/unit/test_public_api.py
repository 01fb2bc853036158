"""The public API is what the README documents, and the seeds' import paths work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lilota

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_public_name_is_documented_in_the_readme() -> None:
    blocks = re.findall(r"```.*?```", README, flags=re.DOTALL)
    prose = re.sub(r"```.*?```", "", README, flags=re.DOTALL)
    spans = blocks + re.findall(r"`([^`\n]+)`", prose)
    documented = {name for span in spans for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}
    missing = sorted(set(lilota.__all__) - documented - {"__version__"})
    assert missing == [], f"in lilota.__all__ but not in README.md: {missing}"


def test_public_names_import_from_the_package_root() -> None:
    for name in lilota.__all__:
        assert getattr(lilota, name) is not None


def test_seed_import_paths() -> None:
    from lilota.core import Lilota
    from lilota.models import ModelProtocol, Task, TaskProgress, TaskStatus
    from lilota.worker import LilotaWorker

    assert Lilota is lilota.Lilota
    assert LilotaWorker is lilota.LilotaWorker
    assert (Task, TaskStatus, TaskProgress, ModelProtocol) == (
        lilota.Task,
        lilota.TaskStatus,
        lilota.TaskProgress,
        lilota.ModelProtocol,
    )


def test_task_context_imports_from_the_root_and_from_models_as_in_the_earlier_release() -> None:
    import lilota.models
    from lilota.context import TaskContext
    from lilota.models import TaskContext as FromModels

    assert lilota.TaskContext is TaskContext is FromModels is lilota.models.TaskContext
    assert "TaskContext" in lilota.__all__


def test_task_error_is_a_read_only_alias_of_exception() -> None:
    import dataclasses

    error = lilota.TaskError(type="ValueError", message="bad", traceback="...")
    task = lilota.Task(id=1, name="t", status=lilota.TaskStatus.FAILED, exception=error)
    assert task.error is error
    assert lilota.Task(id=2, name="t", status=lilota.TaskStatus.PENDING).error is None
    with pytest.raises(AttributeError):
        task.error = None  # type: ignore[misc]
    assert "error" not in task.to_json()  # the JSON form keeps its one "exception" key
    assert "error" not in {f.name for f in dataclasses.fields(task)}


def test_db_url_defaults_to_the_environment_then_sqlite(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("LILOTA_DB_URL", raising=False)
    assert lilota.Lilota().db_url == "sqlite:///lilota.db"
    assert lilota.LilotaWorker().db_url == "sqlite:///lilota.db"
    monkeypatch.setenv("LILOTA_DB_URL", "sqlite:///from-env.db")
    assert lilota.Lilota().db_url == "sqlite:///from-env.db"
    assert lilota.LilotaWorker().db_url == "sqlite:///from-env.db"
    assert lilota.Lilota("sqlite:///explicit.db").db_url == "sqlite:///explicit.db"


def test_scheduler_with_tasks_and_no_workers_starts_without_processes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def make() -> lilota.Lilota:  # not a module-level instance: it must not be looked for
        app = lilota.Lilota(f"sqlite:///{tmp_path}/x.db", number_of_workers=0)
        app.register("noop")(lambda: None)
        return app

    app = make()
    app.start()
    assert app.worker_pids == []
    assert app.schedule("noop") == 1
    app.stop()
