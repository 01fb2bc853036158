"""Moving a lilota 1.x database to lilota 2 (``lilota migrate --from-1x``).

lilota 1.x kept its tasks in a ``lilota_task`` table of another layout (UUID ids, JSON
``input``/``output``/``error``, ``locked_by``) beside ``lilota_node``, ``lilota_node_leader``,
``lilota_log`` and ``lilota_alembic_version``. In one transaction, :func:`move_from_1x`
renames those tables to ``lilota_1x_*`` (never drops them), creates lilota 2's tables, and
copies every task over: its status mapped (created and scheduled: pending; running:
pending again, as a task whose worker was lost, since 1.x workers must be stopped first;
expired: failed), input, output and error kept, and the 1.x UUID kept as ``legacy_id``,
so ``get_task_by_id("<uuid>")`` still finds it.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lilota import serialization
from lilota.errors import SchemaVersionError
from lilota.models import TaskError, TaskStatus, to_naive_utc
from lilota.store import schema

#: The 1.x tables, renamed with the ``lilota_1x_`` prefix by the move.
ONE_X_TABLES = (
    "lilota_task",
    "lilota_node",
    "lilota_node_leader",
    "lilota_log",
    "lilota_alembic_version",
)

#: A 1.x status -> lilota 2's.
STATUS = {
    "created": TaskStatus.PENDING.value,
    "scheduled": TaskStatus.PENDING.value,
    "running": TaskStatus.PENDING.value,
    "completed": TaskStatus.COMPLETED.value,
    "failed": TaskStatus.FAILED.value,
    "expired": TaskStatus.FAILED.value,
    "cancelled": TaskStatus.CANCELLED.value,
}


def is_1x(conn: Connection) -> bool:
    """Whether ``lilota_task`` has lilota 1.x's layout."""
    inspector = sa.inspect(conn)
    if not inspector.has_table("lilota_task"):
        return False
    return {c["name"] for c in inspector.get_columns("lilota_task")} >= schema.ONE_X_COLUMNS


def move_from_1x(conn: Connection, now: datetime) -> int:
    """Move a 1.x database to lilota 2 in ``conn``'s transaction; returns how many tasks
    were copied. Raises :class:`SchemaVersionError` if it is not a 1.x database or was
    moved already."""
    inspector = sa.inspect(conn)
    if not is_1x(conn):
        moved = inspector.has_table("lilota_1x_task")
        raise SchemaVersionError(
            "the tasks of lilota 1.x were moved already (lilota_1x_task exists)"
            if moved
            else "this database holds no lilota 1.x tasks (no lilota_task table of 1.x's layout)"
        )
    if inspector.has_table("lilota_1x_task"):
        raise SchemaVersionError("lilota_1x_task exists already: rename or drop it first")
    # A lilota 2 that opened this database before the check existed added these two empty
    # tables of its own (and stamped a version on them): they hold nothing to keep.
    for own in ("lilota_schema", "lilota_worker"):
        if inspector.has_table(own):
            conn.execute(sa.text(f"DROP TABLE {own}"))
    for table in ONE_X_TABLES:
        if inspector.has_table(table):
            _rename(conn, inspector, table, table.replace("lilota_", "lilota_1x_", 1))
    schema.ensure(conn, now)
    old = sa.Table("lilota_1x_task", sa.MetaData(), autoload_with=conn)
    rows = [_row(r._mapping, now) for r in conn.execute(sa.select(old).order_by(old.c.run_at))]
    if rows:
        conn.execute(schema.task_table.insert(), rows)
    return len(rows)


def _rename(conn: Connection, inspector: Any, table: str, new: str) -> None:
    key = inspector.get_pk_constraint(table).get("name")
    conn.execute(sa.text(f"ALTER TABLE {table} RENAME TO {new}"))
    # PostgreSQL keeps the name of the primary key's index, which lilota 2's new
    # lilota_task would need.
    if conn.dialect.name == "postgresql" and key and key.startswith(table):
        renamed = key.replace(table, new, 1)
        conn.execute(sa.text(f'ALTER INDEX "{key}" RENAME TO "{renamed}"'))


def _json(value: Any) -> Any:
    """A 1.x JSON column's value (text on SQLite, decoded already on PostgreSQL)."""
    return json.loads(value) if isinstance(value, str) else value


def _row(old: Any, now: datetime) -> dict[str, Any]:
    status = STATUS.get(old["status"], TaskStatus.FAILED.value)
    error = _json(old["error"])
    if old["status"] == "expired" and not isinstance(error, dict):
        error = {"type": "TaskTimeout", "message": "expired in lilota 1.x", "traceback": ""}
    again = status == TaskStatus.PENDING.value  # to run (again): no trace of a start
    return {
        "legacy_id": str(uuid.UUID(str(old["id"]))),
        "name": old["name"],
        "status": status,
        "pid": None if again else old["pid"],
        "progress_percentage": 0 if again else int(old["progress_percentage"] or 0),
        "start_date_time": None if again else old["start_date_time"],
        "end_date_time": None if again else old["end_date_time"],
        "input": serialization.dumps(_json(old["input"])),
        "output": serialization.dumps(_json(old["output"])),
        "exception": TaskError.from_dict(error).to_json() if isinstance(error, dict) else None,
        "attempts": 0 if again else int(old["attempts"] or 0),
        "max_attempts": max(1, int(old["max_attempts"] or 1)),
        "priority": 0,
        "created_at": _naive(old["run_at"]) or now,  # 1.x kept no creation time
        "run_at": _naive(old["run_at"]) or now,
        "cancel_requested": False,
    }


def _naive(value: datetime | None) -> datetime | None:
    return None if value is None else to_naive_utc(value)
