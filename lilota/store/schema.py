"""lilota's tables, their numbered versions, and the migrations between them.

The store calls :func:`ensure` once per process before its first statement. It creates the
tables of an empty database at :data:`SCHEMA_VERSION`, upgrades one made by an earlier
lilota 2 (one migration per version, each in the same transaction as its version row),
and refuses, with :class:`SchemaVersionError`, a database it cannot vouch for: one made by
a newer lilota, one made by lilota 1.x (moved over with ``lilota migrate --from-1x``, see
:mod:`lilota.store.from1x`), or one holding a ``lilota_task`` table lilota did not make.
It never stamps a version on tables it did not create.

Versions:

1. The first lilota 2 layout.
2. ``fence`` (a claim counter that never goes back: every write after a claim names it,
   so neither a retry nor a refund can make a stale worker's write match a new attempt),
   ``recoveries``/``max_recoveries`` (a lost worker's task runs again up to this many
   times, apart from ``max_attempts``), ``legacy_id`` (the UUID of a task moved over from
   lilota 1.x), and on SQLite ``AUTOINCREMENT``, so ids deleted by ``cleanup()`` are never
   given to a new task.
3. ``trace_context``: the W3C trace context (``traceparent``/``tracestate``, as JSON) of
   the span that scheduled the task, when OpenTelemetry was in use; the worker continues
   that trace (:mod:`lilota.tracing`). Nullable, written only when a trace is active.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lilota.errors import SchemaVersionError
from lilota.models import DEFAULT_MAX_RECOVERIES, FINAL_STATUSES, TaskStatus

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3

PENDING = TaskStatus.PENDING.value
RUNNING = TaskStatus.RUNNING.value
FINAL = tuple(s.value for s in FINAL_STATUSES)
ACTIVE = (PENDING, RUNNING)

metadata = sa.MetaData()
_id_type = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

task_table = sa.Table(
    "lilota_task",
    metadata,
    sa.Column("id", _id_type, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, server_default=PENDING),
    sa.Column("pid", sa.Integer),
    sa.Column("progress_percentage", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("start_date_time", sa.DateTime),
    sa.Column("end_date_time", sa.DateTime),
    sa.Column("input", sa.Text),
    sa.Column("output", sa.Text),
    sa.Column("exception", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="1"),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("run_at", sa.DateTime, nullable=False),
    sa.Column("lease_expires_at", sa.DateTime),
    sa.Column("worker_id", sa.String(120)),
    sa.Column("unique_key", sa.String(255)),
    sa.Column("schedule_key", sa.String(255)),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    # Version 2.
    sa.Column("fence", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("recoveries", sa.Integer, nullable=False, server_default="0"),
    sa.Column(
        "max_recoveries", sa.Integer, nullable=False, server_default=str(DEFAULT_MAX_RECOVERIES)
    ),
    sa.Column("legacy_id", sa.String(36)),
    # Version 3.
    sa.Column("trace_context", sa.Text),
    sqlite_autoincrement=True,
)
_t = task_table.c


def _index(name: str, *columns: Any, where: Any = None, unique: bool = False) -> None:
    # With ``where``: a partial index, on both backends.
    sa.Index(name, *columns, unique=unique, postgresql_where=where, sqlite_where=where)


# The runnable set: a partial index holds pending rows only, so claiming costs the same
# with ten or ten million finished tasks in the table.
_index("ix_lilota_task_runnable", _t.priority.desc(), _t.run_at, _t.id, where=_t.status == PENDING)
_index("ix_lilota_task_leases", _t.lease_expires_at, where=_t.status == RUNNING)
_index("ix_lilota_task_worker", _t.worker_id, where=_t.status == RUNNING)
# Every change of status moves a row in each index whose key or condition it touches
# (PostgreSQL: all of them, as such an update is never HOT). The indexes below hold only
# the rows that can match their queries: keys that are set, ends of finished tasks. That
# leaves 9 index entries to write per task run instead of 13.
_active_key = sa.and_(_t.status.in_(ACTIVE), _t.unique_key.is_not(None))
_index("uq_lilota_task_unique_key", _t.unique_key, unique=True, where=_active_key)
_scheduled = _t.schedule_key.is_not(None)
_index("uq_lilota_task_schedule_key", _t.schedule_key, unique=True, where=_scheduled)
_index("ix_lilota_task_status_id", _t.status, _t.id)
_index("ix_lilota_task_name_id", _t.name, _t.id)
_index("ix_lilota_task_end", _t.end_date_time, where=_t.status.in_(FINAL))
_legacy = _t.legacy_id.is_not(None)
_index("uq_lilota_task_legacy_id", _t.legacy_id, unique=True, where=_legacy)

worker_table = sa.Table(
    "lilota_worker",
    metadata,
    sa.Column("id", sa.String(120), primary_key=True),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("heartbeat_at", sa.DateTime, nullable=False),
    sa.Column("task_names", sa.Text, nullable=False),
)

schema_table = sa.Table(
    "lilota_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)

# Columns only lilota 1.x's lilota_task has (it kept UUID ids, ``error`` and a lock owner).
ONE_X_COLUMNS = frozenset({"locked_by", "locked_at", "error", "version"})
# The columns of version 1's lilota_task, which every later version keeps.
V1_COLUMNS = [
    "id",
    "name",
    "status",
    "pid",
    "progress_percentage",
    "start_date_time",
    "end_date_time",
    "input",
    "output",
    "exception",
    "description",
    "attempts",
    "max_attempts",
    "priority",
    "created_at",
    "run_at",
    "lease_expires_at",
    "worker_id",
    "unique_key",
    "schedule_key",
    "cancel_requested",
]


def version_of(conn: Connection) -> int | None:
    """The schema version recorded in the database; None where lilota's tables are not."""
    if not sa.inspect(conn).has_table("lilota_schema"):
        return None
    found = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar()
    return None if found is None else int(found)


def check_layout(conn: Connection) -> None:
    """Raise :class:`SchemaVersionError` if ``lilota_task`` exists but is not lilota 2's."""
    inspector = sa.inspect(conn)
    if not inspector.has_table("lilota_task"):
        return
    columns = {c["name"] for c in inspector.get_columns("lilota_task")}
    if columns >= ONE_X_COLUMNS:
        raise SchemaVersionError(
            "this database holds the tasks of lilota 1.x (a lilota_task table with UUID ids, "
            "'error' and 'locked_by' columns); lilota 2 uses another layout. Stop the 1.x "
            "workers, then move the tasks over with `lilota migrate --from-1x` (the 1.x "
            "tables are kept, renamed to lilota_1x_*); see the README's 'Upgrading from 1.x'"
        )
    missing = sorted(set(V1_COLUMNS) - columns)
    if missing or not inspector.has_table("lilota_schema"):
        where = conn.engine.url.render_as_string(hide_password=True)
        raise SchemaVersionError(
            f"the database {where} has a lilota_task table that lilota did not create (missing "
            f"columns: {', '.join(missing) or 'none'}; no lilota_schema table: "
            f"{not inspector.has_table('lilota_schema')}); lilota will not change it. "
            "Use another database, or rename that table"
        )


def ensure(conn: Connection, now: datetime) -> int:
    """Create or upgrade lilota's tables in ``conn``'s transaction (the caller holds the
    schema lock); returns the version now in place."""
    check_layout(conn)
    found = version_of(conn)
    if found is None:
        metadata.create_all(conn, checkfirst=True)
        conn.execute(schema_table.insert().values(version=SCHEMA_VERSION, applied_at=now))
        return SCHEMA_VERSION
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the database holds lilota schema version {found}, newer than this "
            f"lilota understands ({SCHEMA_VERSION}); upgrade lilota"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        log.warning("upgrading lilota's tables from schema version %d to %d", version - 1, version)
        MIGRATIONS[version](conn)
        conn.execute(schema_table.insert().values(version=version, applied_at=now))
    metadata.create_all(conn, checkfirst=True)  # tables added since, without a migration
    return SCHEMA_VERSION


def _to_v2(conn: Connection) -> None:
    """Version 1 -> 2: the columns of version 2; the fence starts at the attempt count, so
    an attempt running during the upgrade keeps its fence."""
    if conn.dialect.name == "sqlite":
        _rebuild_sqlite_task_table(conn)
        return
    for column in ("fence", "recoveries", "max_recoveries", "legacy_id"):
        _add_column(conn, task_table.c[column])
    conn.execute(task_table.update().values(fence=_t.attempts))
    for index in task_table.indexes:
        if index.name == "uq_lilota_task_legacy_id":
            index.create(conn, checkfirst=True)


def _to_v3(conn: Connection) -> None:
    """Version 2 -> 3: the nullable ``trace_context`` column (no row changes). A table
    rebuilt by :func:`_to_v2` in the same upgrade has it already."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("lilota_task")}
    if "trace_context" not in columns:
        _add_column(conn, task_table.c.trace_context)


def _add_column(conn: Connection, column: sa.Column[Any]) -> None:
    ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE lilota_task ADD COLUMN {ddl}"))


def _rebuild_sqlite_task_table(conn: Connection) -> None:
    """SQLite cannot add AUTOINCREMENT to a table: copy the rows into a new one. Ids
    deleted before the upgrade and above the highest left may still be given again."""
    for index in task_table.indexes:
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {index.name}"))
    conn.execute(sa.text("ALTER TABLE lilota_task RENAME TO lilota_task_v1"))
    task_table.create(conn)
    columns = ", ".join(V1_COLUMNS)
    conn.execute(
        sa.text(
            f"INSERT INTO lilota_task ({columns}, fence) "
            f"SELECT {columns}, attempts FROM lilota_task_v1 ORDER BY id"
        )
    )
    conn.execute(sa.text("DROP TABLE lilota_task_v1"))


#: The migration to each version from the one before.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {2: _to_v2, 3: _to_v3}
