"""A SQLite file that cannot be used as it is fails at once, as what it is; a file deleted
or replaced under a worker ends that worker.

A permanent error (read-only, not a database, other tables, directory gone) is raised as a
:class:`DatabaseFileError` naming the file and the cause, without the retries (and their
sleeps) that a locked database gets. Reads of a read-only file work. Read-only cases run
as an unprivileged user: root writes any file, so as root they run in a child process
that drops to ``nobody``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc

from lilota import Lilota
from lilota.dialects.sqlitefile import permanent_error
from lilota.errors import (
    DatabaseCorrupt,
    DatabaseError,
    DatabaseFileError,
    DatabaseReadOnly,
    DatabaseReplaced,
    DatabaseSchemaMismatch,
    DatabaseUnavailable,
    SchemaVersionError,
    WorkerExit,
)
from lilota.ledger import LeaseKeeper, Ledger
from lilota.store import NewTask, TaskStore

NOBODY = 65534


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retry sleeps of store transactions (a permanent error must take none)."""
    taken: list[float] = []
    monkeypatch.setattr("lilota.dialects.transactions.time.sleep", taken.append)
    return taken


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can enter (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="lilota-ro-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_reader(check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``check()`` run by a user who may not write files it does not own: this process
    if it is not root, else a child that becomes ``nobody``. Returns its result dict."""
    if os.geteuid() != 0:
        return check()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 0
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = check()
        except BaseException:
            result, code = {"crashed": traceback.format_exc()}, 1
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(result))
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        result = json.loads(answer.read() or '{"crashed": "no answer"}')
    os.waitpid(pid, 0)
    assert "crashed" not in result, result["crashed"]
    return result


def _outcome(call: Callable[[], Any]) -> str:
    """What ``call`` did: ``ok <repr>`` or ``<error class>: <message>``."""
    try:
        return f"ok {call()!r}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _made_read_only(directory: Path, *, directory_writable: bool) -> tuple[Path, int]:
    """A database with one task in ``directory``, then made read-only (the file, and the
    directory unless ``directory_writable``, in which case the reader owns it)."""
    path = directory / "tasks.db"
    store = TaskStore(f"sqlite:///{path}")
    task_id = store.add(NewTask(name="job", input='{"n": 1}'))
    store.dispose()  # the last connection closing removes the -wal and -shm files
    path.chmod(0o444)
    if directory_writable and os.geteuid() == 0:
        os.chown(directory, NOBODY, -1)
    elif not directory_writable:
        directory.chmod(0o555)
    return path, task_id


def _read_and_write(path: Path, task_id: int, sleeps: list[float]) -> Callable[[], dict[str, Any]]:
    def check() -> dict[str, Any]:
        store = TaskStore(f"sqlite:///{path}")
        app = Lilota(f"sqlite:///{path}", number_of_workers=0)
        return {
            "read_only": store.dialect.read_only,
            "get_task_by_id": _outcome(lambda: app.get_task_by_id(task_id).input),  # type: ignore[union-attr]
            "get": _outcome(lambda: store.get(task_id).input),  # type: ignore[union-attr]
            "list": _outcome(lambda: [t.id for t in store.list_tasks()]),
            "counts": _outcome(lambda: store.count_by_status()["pending"]),
            "add": _outcome(lambda: store.add(NewTask(name="job"))),
            "cancel": _outcome(lambda: store.cancel(task_id)),
            "sleeps": list(sleeps),
        }

    return check


@pytest.mark.parametrize("directory_writable", [True, False], ids=["dir-writable", "dir-read-only"])
def test_a_read_only_file_is_read_and_refuses_writes_at_once(
    shared_dir: Path, sleeps: list[float], directory_writable: bool
) -> None:
    path, task_id = _made_read_only(shared_dir, directory_writable=directory_writable)

    result = _as_reader(_read_and_write(path, task_id, sleeps))

    assert result["read_only"] is True
    assert result["get"] == result["get_task_by_id"] == "ok {'n': 1}"
    assert result["list"] == f"ok [{task_id}]"
    assert result["counts"] == "ok 1"
    for write in ("add", "cancel"):
        assert result[write].startswith(f"DatabaseReadOnly: the SQLite database {path} ")
        assert "reads work, writes do not" in result[write]
    assert result["sleeps"] == []  # raised at once, not retried


def test_a_read_only_file_without_lilota_tables_says_so(shared_dir: Path) -> None:
    path = shared_dir / "empty.db"
    sqlite3.connect(path).close()
    path.chmod(0o444)
    if os.geteuid() == 0:
        os.chown(shared_dir, NOBODY, -1)

    result = _as_reader(lambda: {"get": _outcome(lambda: TaskStore(f"sqlite:///{path}").get(1))})

    assert result["get"] == f"DatabaseReadOnly: {path} is read-only; no lilota tables"


def test_a_file_that_is_not_a_database_raises_database_corrupt_at_once(
    tmp_path: Path, sleeps: list[float]
) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database" * 200)
    store = TaskStore(f"sqlite:///{path}")

    with pytest.raises(DatabaseCorrupt) as raised:
        store.get(1)

    assert str(raised.value).startswith(f"the SQLite database {path} is damaged or not a SQLite")
    assert "file is not a database" in str(raised.value)
    assert raised.value.path == str(path)
    assert sleeps == []
    assert path.read_bytes().startswith(b"these are my notes")  # nothing written


def test_a_task_table_of_other_columns_raises_schema_mismatch_naming_the_file(
    tmp_path: Path, sleeps: list[float]
) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE lilota_task (id INTEGER PRIMARY KEY, title TEXT)")
        conn.commit()
    store = TaskStore(f"sqlite:///{path}")

    # The schema check finds it before any statement runs (lilota.store.schema).
    for call in (lambda: store.get(1), store.list_tasks, lambda: store.add(NewTask(name="j"))):
        with pytest.raises(SchemaVersionError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith(f"the database sqlite:///{path} has a lilota_task table")
        assert "lilota did not create" in message and "missing columns: attempts" in message
    assert sleeps == []


def test_a_statement_on_a_table_of_other_columns_raises_schema_mismatch(
    tmp_path: Path, sleeps: list[float]
) -> None:
    # The tables were checked, then changed under the store: the driver's error is
    # classified, naming the file.
    path = tmp_path / "changed.db"
    store = TaskStore(f"sqlite:///{path}")
    store.ensure_schema()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("ALTER TABLE lilota_task DROP COLUMN description")
        conn.commit()
    with pytest.raises(DatabaseSchemaMismatch) as raised:
        store.get(1)
    message = str(raised.value)
    assert message.startswith(f"the SQLite database {path} does not have the tables")
    assert "no such column" in message
    assert sleeps == []


def test_a_directory_removed_after_start_raises_an_error_naming_it_at_once(
    tmp_path: Path, sleeps: list[float]
) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    store = TaskStore(f"sqlite:///{directory / 'tasks.db'}")  # the directory exists here
    directory.rmdir()

    with pytest.raises(DatabaseFileError) as raised:
        store.add(NewTask(name="job"))

    assert not isinstance(raised.value, DatabaseUnavailable)
    assert str(raised.value) == (
        f"the SQLite database {directory / 'tasks.db'} cannot be opened: "
        f"its directory {directory} does not exist"
    )
    assert sleeps == []
    assert not directory.exists()


def _driver_error(message: str) -> exc.DBAPIError:
    return exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError(message))


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("attempt to write a readonly database", DatabaseReadOnly),
        ("file is not a database", DatabaseCorrupt),
        ("database disk image is malformed", DatabaseCorrupt),
        ("no such table: lilota_task", DatabaseSchemaMismatch),
        ("table lilota_task has no column named run_at", DatabaseSchemaMismatch),
    ],
)
def test_permanent_driver_errors_are_classified(message: str, kind: type[DatabaseError]) -> None:
    error = permanent_error(_driver_error(message), "/data/tasks.db")
    assert type(error) is kind
    assert str(error).startswith("the SQLite database /data/tasks.db ")
    assert message in str(error)


@pytest.mark.parametrize("message", ["database is locked", "disk I/O error"])
def test_transient_driver_errors_are_left_to_the_retries(tmp_path: Path, message: str) -> None:
    assert permanent_error(_driver_error(message), str(tmp_path / "tasks.db")) is None


def test_unable_to_open_with_nothing_wrong_on_disk_is_left_to_the_retries(tmp_path: Path) -> None:
    # e.g. out of file descriptors: nothing about the file to name, may pass.
    error = _driver_error("unable to open database file")
    assert permanent_error(error, str(tmp_path / "tasks.db")) is None


# ----------------------------------------------------------------- deleted or replaced


def _file_store(tmp_path: Path) -> tuple[TaskStore, Path]:
    path = tmp_path / "tasks.db"
    store = TaskStore(f"sqlite:///{path}")
    store.ensure_schema()
    return store, path


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_the_file_a_store_opened_is_checked_until_it_is_deleted(tmp_path: Path) -> None:
    store, path = _file_store(tmp_path)
    store.check_file()  # unchanged: nothing raised

    _remove(path)

    with pytest.raises(DatabaseReplaced) as raised:
        store.check_file()
    assert str(raised.value).startswith(f"the SQLite database {path} was deleted while this")


def test_a_file_replaced_by_another_is_noticed(tmp_path: Path) -> None:
    store, path = _file_store(tmp_path)
    (tmp_path / "backup").mkdir()
    backup, backup_path = _file_store(tmp_path / "backup")
    backup.dispose()

    os.replace(backup_path, path)  # a restore from a backup

    with pytest.raises(DatabaseReplaced, match="was replaced by another file"):
        store.check_file()


def test_memory_and_postgres_stores_have_no_file_to_check() -> None:
    TaskStore("sqlite://").check_file()


def test_the_keeper_ends_the_worker_loudly_when_its_file_is_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, path = _file_store(tmp_path)
    ended: list[WorkerExit] = []
    keeper = LeaseKeeper(
        store,
        Ledger(),
        worker_id="w1",
        lease=timedelta(seconds=30),
        heartbeat=timedelta(seconds=1),
        cancel_grace=timedelta(seconds=10),
        end_process=ended.append,
    )
    assert keeper.renew() is True
    assert ended == []

    _remove(path)
    with caplog.at_level(logging.CRITICAL, logger="lilota.ledger"):
        assert keeper.renew() is False

    assert ended == [WorkerExit.DATABASE_REPLACED]
    [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert f"the SQLite database {path} was deleted" in record.getMessage()
    assert "ending this worker" in record.getMessage()
    assert not path.exists()  # the check itself creates no new file
