"""Databases made by earlier releases, on both backends: lilota 2's schema versions 1
and 2 (upgraded in place), lilota 1.x (refused until moved over with ``--from-1x``), and tables
lilota did not make (refused, never stamped).

The fixtures were made by the code of those releases (scripts/make-schema-fixtures.sh,
scripts/make-1x-fixtures.sh with lilota 1.4.0 from PyPI).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from lilota.errors import InvalidArgumentType, SchemaVersionError
from lilota.models import TaskStatus
from lilota.store import SCHEMA_VERSION, NewTask, Outcome, TaskStore

FIXTURES = Path(__file__).parent.parent / "fixtures"
LEASE = timedelta(minutes=5)


def load(url: str, fixture: str) -> None:
    """Put the database ``fixture`` (a name under tests/fixtures, without suffix) at ``url``."""
    if url.startswith("sqlite"):
        shutil.copy(FIXTURES / f"{fixture}.sqlite", url.removeprefix("sqlite:///"))
        return
    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute((FIXTURES / f"{fixture}.postgres.sql").read_text())  # type: ignore[arg-type]


def columns_and_versions(url: str) -> tuple[dict[str, Any], list[int], list[Any]]:
    """The task table's columns, the schema versions recorded, and every trace_context."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            columns = {c["name"]: c for c in sa.inspect(conn).get_columns("lilota_task")}
            versions = conn.execute(sa.text("SELECT version FROM lilota_schema ORDER BY 1"))
            stored = conn.execute(sa.text("SELECT trace_context FROM lilota_task"))
            return columns, [v for (v,) in versions], [s for (s,) in stored]
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


# ----------------------------------------------------------------- lilota 2, version 1


def test_a_version_1_database_is_upgraded_in_place_keeping_every_task(lilota_db_url: str) -> None:
    load(lilota_db_url, "schema/v1")
    store = TaskStore(lilota_db_url)
    assert store.schema_version() == 1
    store.ensure_schema()
    assert store.schema_version() == SCHEMA_VERSION == 3
    tasks = {t.id: t for t in store.list_tasks(limit=10)}
    statuses = {i: t.status.value for i, t in tasks.items()}
    assert statuses == {1: "completed", 2: "failed", 3: "running", 4: "cancelled", 5: "pending"}
    assert tasks[1].output == {"sum": 2} and tasks[1].input == {"a": 0, "b": 2}
    assert tasks[2].exception is not None and tasks[2].exception.message == "bad"
    assert tasks[3].progress_percentage == 40 and tasks[3].worker_id == "old-worker"
    # The fence starts at the attempt count: the attempt running during the upgrade can
    # still record its end.
    assert [t.fence for t in tasks.values()] == [t.attempts for t in tasks.values()]
    assert all(t.recoveries == 0 and t.max_recoveries == 3 for t in tasks.values())
    assert store.finish([Outcome(id=3, fence=1, status="completed", output='"late"')]) == 1
    # New tasks run as usual, and ids go on from the highest.
    new_id = store.add(NewTask(name="add", input='{"a": 9, "b": 9}'))
    assert new_id == 6
    (claim,) = store.claim(worker_id="w", names=["add"], limit=1, lease=LEASE)
    assert (claim.id, claim.fence) == (5, 1)
    store.dispose()


def test_after_the_upgrade_deleted_ids_are_never_given_again(lilota_db_url: str) -> None:
    load(lilota_db_url, "schema/v1")
    store = TaskStore(lilota_db_url)
    newest = store.add(NewTask(name="add"))
    store.cancel(newest)
    assert store.cleanup(timedelta(0)) >= 1  # deletes the newest id, among others
    assert store.get(newest) is None
    assert store.add(NewTask(name="add")) == newest + 1
    store.dispose()


def test_a_second_process_opening_an_upgraded_database_changes_nothing(lilota_db_url: str) -> None:
    load(lilota_db_url, "schema/v1")
    first = TaskStore(lilota_db_url)
    first.ensure_schema()
    second = TaskStore(lilota_db_url)
    second.ensure_schema()
    assert second.schema_version() == SCHEMA_VERSION
    assert len(second.list_tasks(limit=10)) == 5
    first.dispose()
    second.dispose()


# ----------------------------------------------------------------- lilota 2, version 2


def test_a_version_2_database_gains_the_trace_context_column_keeping_every_task(
    lilota_db_url: str,
) -> None:
    load(lilota_db_url, "schema/v2")
    store = TaskStore(lilota_db_url)
    assert store.schema_version() == 2
    store.ensure_schema()
    assert store.schema_version() == SCHEMA_VERSION == 3
    columns, versions, stored = columns_and_versions(lilota_db_url)
    assert columns["trace_context"]["nullable"]
    assert versions == [2, 3]
    assert stored == [None] * 5  # no row is changed
    tasks = {t.id: t for t in store.list_tasks(limit=10)}
    statuses = {i: t.status.value for i, t in tasks.items()}
    assert statuses == {1: "completed", 2: "failed", 3: "running", 4: "cancelled", 5: "pending"}
    assert tasks[1].output == {"sum": 2} and tasks[3].progress_percentage == 40
    # The attempt running during the upgrade records its end; the pending task is claimed
    # with no trace context, and a new one keeps the context it is given.
    assert store.finish([Outcome(id=3, fence=1, status="completed", output='"late"')]) == 1
    (claim,) = store.claim(worker_id="w", names=["add"], limit=1, lease=LEASE)
    assert (claim.id, claim.trace_context) == (5, None)
    context = '{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}'
    assert store.add(NewTask(name="later", trace_context=context)) == 6
    (claim,) = store.claim(worker_id="w", names=["later"], limit=1, lease=LEASE)
    assert claim.trace_context == context
    store.dispose()


def test_a_version_1_database_is_upgraded_through_version_2_to_3(lilota_db_url: str) -> None:
    load(lilota_db_url, "schema/v1")
    store = TaskStore(lilota_db_url)
    store.ensure_schema()
    columns, versions, _ = columns_and_versions(lilota_db_url)
    assert versions == [1, 2, 3] and "trace_context" in columns
    store.dispose()


# ----------------------------------------------------------------- lilota 1.x


def test_a_lilota_1x_database_is_refused_with_the_command_that_moves_it(lilota_db_url: str) -> None:
    load(lilota_db_url, "lilota1x/lilota-1.4.0")
    before = tables(lilota_db_url)
    store = TaskStore(lilota_db_url)
    with pytest.raises(SchemaVersionError, match=r"lilota 1\.x") as raised:
        store.add(NewTask(name="add"))
    assert "lilota migrate --from-1x" in str(raised.value)
    with pytest.raises(SchemaVersionError, match=r"lilota 1\.x"):
        store.list_tasks()
    store.dispose()
    assert tables(lilota_db_url) == before  # nothing created, nothing stamped


def test_a_1x_database_an_earlier_lilota_2_stamped_is_still_recognised(lilota_db_url: str) -> None:
    # The earlier lilota 2 added lilota_schema (version 1) and lilota_worker to a 1.x
    # database before failing on every call.
    load(lilota_db_url, "lilota1x/lilota-1.4.0")
    engine = sa.create_engine(lilota_db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE lilota_schema (version INTEGER, applied_at TIMESTAMP)"))
        conn.execute(sa.text("INSERT INTO lilota_schema VALUES (1, CURRENT_TIMESTAMP)"))
        conn.execute(sa.text("CREATE TABLE lilota_worker (id VARCHAR(120))"))
    engine.dispose()
    store = TaskStore(lilota_db_url)
    with pytest.raises(SchemaVersionError, match="--from-1x"):
        store.ensure_schema()
    assert store.move_from_1x() == 5
    assert store.schema_version() == SCHEMA_VERSION
    store.dispose()


def test_moving_from_1x_keeps_every_task_and_the_old_tables(lilota_db_url: str) -> None:
    load(lilota_db_url, "lilota1x/lilota-1.4.0")
    store = TaskStore(lilota_db_url)
    assert store.move_from_1x() == 5
    assert store.schema_version() == SCHEMA_VERSION
    assert {"lilota_1x_task", "lilota_1x_node", "lilota_1x_log"} <= tables(lilota_db_url)
    tasks = store.list_tasks(limit=10)
    by_status = sorted((t.status.value, t.name) for t in tasks)
    # created -> pending; running (its 1.x worker is gone) -> pending, to run again
    assert by_status == [
        ("completed", "add"),
        ("completed", "add"),
        ("failed", "add"),
        ("pending", "add"),
        ("pending", "report"),
    ]
    assert all(t.legacy_id is not None for t in tasks)
    completed = [t for t in tasks if t.status is TaskStatus.COMPLETED]
    assert sorted(t.output["sum"] for t in completed) == [3, 5]
    (failed,) = [t for t in tasks if t.status is TaskStatus.FAILED]
    assert failed.input == {"a": 5, "b": -1}
    assert failed.exception is not None
    assert (failed.exception.type, failed.exception.message) == ("ValueError", "b must be positive")
    # The 1.x id still finds the task, as text or as a UUID.
    import uuid

    assert store.get(failed.legacy_id or "") == failed
    assert store.get(uuid.UUID(failed.legacy_id or "")) == failed
    with pytest.raises(InvalidArgumentType, match=r"UUID of a task moved over from lilota 1\.x"):
        store.get("not-a-uuid")
    # The moved pending tasks run under lilota 2.
    claims = store.claim(worker_id="w", names=["add", "report"], limit=5, lease=LEASE)
    assert sorted(c.name for c in claims) == ["add", "report"]
    with pytest.raises(SchemaVersionError, match="moved already"):
        store.move_from_1x()
    store.dispose()


def test_moving_from_1x_refuses_a_database_that_is_not_1x(lilota_db_url: str) -> None:
    store = TaskStore(lilota_db_url)
    with pytest.raises(SchemaVersionError, match=r"no lilota 1\.x tasks"):
        store.move_from_1x()
    store.dispose()


def test_the_command_refuses_a_1x_database_then_moves_it(lilota_db_url: str) -> None:
    load(lilota_db_url, "lilota1x/lilota-1.4.0")

    def lilota(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "lilota", "--db-url", lilota_db_url, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    refused = lilota("migrate")
    assert refused.returncode == 1
    assert "lilota migrate --from-1x" in refused.stderr
    moved = lilota("migrate", "--from-1x")
    assert moved.returncode == 0, moved.stderr
    assert "moved 5 tasks" in moved.stdout
    assert "lilota_1x_task" in moved.stdout
    again = lilota("migrate")
    assert again.returncode == 0 and "up to date" in again.stdout


# ----------------------------------------------------------------- not lilota's


def test_a_lilota_task_table_lilota_did_not_make_is_refused_and_not_stamped(
    lilota_db_url: str,
) -> None:
    engine = sa.create_engine(lilota_db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE lilota_task (id INTEGER PRIMARY KEY, title TEXT)"))
    engine.dispose()
    store = TaskStore(lilota_db_url)
    with pytest.raises(SchemaVersionError, match="lilota did not create"):
        store.ensure_schema()
    store.dispose()
    assert tables(lilota_db_url) == {"lilota_task"}
