"""Every SQL statement lilota runs: schema, scheduling, claiming, leases, finishing, queries.

Only this module imports SQLAlchemy. It speaks SQLAlchemy Core (no ORM) and keeps the
dialect differences between SQLite and PostgreSQL inside itself:

* PostgreSQL: claims use ``FOR UPDATE SKIP LOCKED``; scheduling sends one ``NOTIFY`` per
  statement and idle workers ``LISTEN``, so a new task starts within milliseconds.
* SQLite: WAL mode, a busy timeout and ``BEGIN IMMEDIATE`` for every write transaction,
  so that two processes never both think they hold a task and "database is locked" is
  waited out instead of raised. Idle workers watch ``PRAGMA data_version``, which changes
  whenever another connection commits, instead of polling the task table.

Every write after a claim is fenced: it names the attempt number it belongs to in its
WHERE clause, so a worker whose lease expired and whose task was claimed again can never
overwrite the newer attempt. Times are stored as naive UTC.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.pool import StaticPool

from lilota import serialization
from lilota.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    SchemaVersionError,
    TaskAlreadyFinished,
    TaskNotFound,
)
from lilota.models import (
    FINAL_STATUSES,
    Claim,
    LeaseReport,
    NewTask,
    Outcome,
    Task,
    TaskStatus,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
NOTIFY_CHANNEL = "lilota_task"

PENDING = TaskStatus.PENDING.value
RUNNING = TaskStatus.RUNNING.value
COMPLETED = TaskStatus.COMPLETED.value
FAILED = TaskStatus.FAILED.value
CANCELLED = TaskStatus.CANCELLED.value
FINAL = tuple(s.value for s in FINAL_STATUSES)
ACTIVE = (PENDING, RUNNING)

# SQLite waits this long for another process's write transaction before giving up. Writes
# here are a few milliseconds each, so 30 s only runs out when something is badly stuck;
# a short timeout would turn ordinary contention between many workers into errors.
SQLITE_BUSY_TIMEOUT_MS = 30_000

# How often an idle SQLite worker looks at PRAGMA data_version. The pragma reads shared
# memory (no disk, no lock), so 5 ms costs well under 1 % of a core and keeps the start
# latency of a new task near 3 ms; 50 ms would cost the same latency in every task.
SQLITE_WATCH_INTERVAL = 0.005

# "database is locked" that survives the busy timeout (e.g. a checkpoint racing a reader
# upgrade) is retried this many times before it reaches anyone.
SQLITE_LOCKED_RETRIES = 5

# A PostgreSQL transaction that fails because the server cannot be reached (a restart, a
# failover, a dropped connection) is tried this many times, waiting 0.05, 0.1, 0.2, 0.4 s
# in between: a pooled connection the server closed is replaced without anyone noticing,
# and a caller such as schedule() learns of a real outage (DatabaseUnavailable) within
# about a second instead of hanging. Workers retry on their own, with back-off.
UNREACHABLE_RETRIES = 5

# libpq connection settings unless the URL sets them: a server that does not answer
# fails a connection attempt after 10 s (the default is to wait forever), and TCP
# keepalives notice a dead server or network within about a minute even while a
# statement waits for its answer.
POSTGRES_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

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
)
_t = task_table.c

# The runnable set: a partial index holds pending rows only, so claiming costs the same
# with ten or ten million finished tasks in the table.
sa.Index(
    "ix_lilota_task_runnable",
    _t.priority.desc(),
    _t.run_at,
    _t.id,
    postgresql_where=_t.status == PENDING,
    sqlite_where=_t.status == PENDING,
)
sa.Index(
    "ix_lilota_task_leases",
    _t.lease_expires_at,
    postgresql_where=_t.status == RUNNING,
    sqlite_where=_t.status == RUNNING,
)
sa.Index(
    "ix_lilota_task_worker",
    _t.worker_id,
    postgresql_where=_t.status == RUNNING,
    sqlite_where=_t.status == RUNNING,
)
# Every change of status moves a row in each index whose key or condition it touches
# (PostgreSQL: all of them, as such an update is never HOT). The indexes below hold only
# the rows that can match their queries: keys that are set, ends of finished tasks. That
# leaves 9 index entries to write per task run instead of 13.
sa.Index(
    "uq_lilota_task_unique_key",
    _t.unique_key,
    unique=True,
    postgresql_where=sa.and_(_t.status.in_(ACTIVE), _t.unique_key.is_not(None)),
    sqlite_where=sa.and_(_t.status.in_(ACTIVE), _t.unique_key.is_not(None)),
)
sa.Index(
    "uq_lilota_task_schedule_key",
    _t.schedule_key,
    unique=True,
    postgresql_where=_t.schedule_key.is_not(None),
    sqlite_where=_t.schedule_key.is_not(None),
)
sa.Index("ix_lilota_task_status_id", _t.status, _t.id)
sa.Index("ix_lilota_task_name_id", _t.name, _t.id)
sa.Index(
    "ix_lilota_task_end",
    _t.end_date_time,
    postgresql_where=_t.status.in_(FINAL),
    sqlite_where=_t.status.in_(FINAL),
)

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


def utcnow() -> datetime:
    """Naive UTC now: the store's clock unless another one is injected."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def to_naive_utc(value: datetime) -> datetime:
    """Aware datetimes are converted to UTC; naive ones are taken as UTC already."""
    if value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def parse_url(db_url: object) -> URL:
    """Validate ``db_url`` and return it with lilota's driver defaults.

    ``postgresql://`` means psycopg 3 (``postgresql+psycopg://``), the driver lilota
    supports. Raises :class:`ConfigurationError` naming the problem.
    """
    if not isinstance(db_url, (str, URL)):
        raise ConfigurationError(f"db_url must be a string, got {type(db_url).__name__}")
    try:
        url = make_url(db_url)
    except exc.ArgumentError as e:
        raise ConfigurationError(
            f"db_url {str(db_url)!r} is not a database URL; expected e.g. "
            "'sqlite:///lilota.db' or 'postgresql+psycopg://user:password@host:5432/dbname'"
        ) from e
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres") and url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            parent = os.path.dirname(os.path.abspath(database))
            if not os.path.isdir(parent):
                raise ConfigurationError(
                    f"db_url {url.render_as_string(hide_password=True)!r}: the directory "
                    f"{parent!r} does not exist"
                )
    try:
        url.get_dialect()
    except exc.NoSuchModuleError as e:
        raise ConfigurationError(
            f"db_url {url.render_as_string(hide_password=True)!r}: SQLAlchemy has no "
            f"dialect {url.drivername!r}"
        ) from e
    return url


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (url.database or ":memory:") == ":memory:"


def postgres_connect_args(url: URL) -> dict[str, Any]:
    """:data:`POSTGRES_CONNECT_DEFAULTS` that the URL's query does not set."""
    return {k: v for k, v in POSTGRES_CONNECT_DEFAULTS.items() if k not in url.query}


def _is_locked(error: BaseException) -> bool:
    return isinstance(error, exc.OperationalError) and "locked" in str(error.orig).lower()


def _is_disconnect(error: BaseException) -> bool:
    return isinstance(error, exc.DBAPIError) and bool(error.connection_invalidated)


_stores: weakref.WeakSet[TaskStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A process forked from this one (gunicorn --preload, multiprocessing) must not share
    # pooled connections with its parent: drop them without closing the parent's sockets.
    for store in list(_stores):
        store.engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


class TaskStore:
    """The task table and everything done to it. Thread-safe; one per process is enough.

    ``clock`` returns naive UTC datetimes; tests inject one to move time without sleeping.
    """

    def __init__(
        self,
        db_url: str | URL,
        *,
        clock: Callable[[], datetime] = utcnow,
        pool_size: int = 5,
    ) -> None:
        self.url = parse_url(db_url)
        self.clock = clock
        self.dialect = self.url.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        self.is_postgres = self.dialect == "postgresql"
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self.engine = self._create_engine(pool_size)
        # The same pool, for single statements that need no BEGIN/COMMIT (PostgreSQL).
        self._autocommit_engine = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
            if self.is_postgres
            else self.engine
        )
        self._build_statements()
        _stores.add(self)
        # A store dropped without dispose() closes its pooled connections.
        weakref.finalize(self, self.engine.dispose)

    # ------------------------------------------------------------------ engine, schema

    def _create_engine(self, pool_size: int) -> Engine:
        if self.is_sqlite:
            memory = is_memory_sqlite(self.url)
            engine = sa.create_engine(
                self.url,
                # File databases keep a small pool: opening a connection and setting its
                # pragmas costs more than most statements.
                poolclass=StaticPool if memory else None,
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            )
            self._memory_lock: threading.RLock | None = threading.RLock() if memory else None

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                # Autocommit at the driver level: we issue BEGIN ourselves (below), so that
                # writes take the lock up front instead of failing on upgrade.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                if not memory:
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                # WAL + NORMAL: a commit survives a process crash; only an OS crash or power
                # loss can lose the last transactions, never corrupt the database.
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                if conn.get_execution_options().get("lilota_read"):
                    conn.exec_driver_sql("BEGIN")
                else:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        self._memory_lock = None
        if self.is_postgres:
            return sa.create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=10,
                # Server-side idle timeouts and failovers close connections; recycling
                # bounds how stale a pooled one can be. Disconnects that still happen are
                # retried by _run, which is cheaper than a ping before every checkout.
                pool_recycle=1800,
                connect_args=postgres_connect_args(self.url),
            )
        log.warning("lilota is certified on SQLite and PostgreSQL; %s may work", self.dialect)
        return sa.create_engine(self.url, pool_pre_ping=True)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def ensure_schema(self) -> None:
        """Create or check lilota's tables. Idempotent, and safe when processes race.

        Raises :class:`SchemaVersionError` if the database was set up by a newer lilota.
        """
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            self._run(self._ensure_schema)
            self._schema_ready = True

    def _ensure_schema(self, conn: Connection) -> None:
        if self.is_postgres:
            # Serialises concurrent first starts; released at commit.
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(0x6C696C6F7461)))
        metadata.create_all(conn, checkfirst=True)
        found = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar()
        if found is None:
            conn.execute(
                schema_table.insert().values(version=SCHEMA_VERSION, applied_at=self.clock())
            )
        elif found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the database holds lilota schema version {found}, newer than this "
                f"lilota understands ({SCHEMA_VERSION}); upgrade lilota"
            )

    def schema_version(self) -> int | None:
        """The schema version recorded in the database, or None if there are no tables."""

        def read(conn: Connection) -> int | None:
            if not sa.inspect(conn).has_table("lilota_schema"):
                return None
            version = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar()
            return None if version is None else int(version)

        result: int | None = self._run(read, read_only=True)
        return result

    # -------------------------------------------------------------- running statements

    @contextmanager
    def _connection(self, read_only: bool, autocommit: bool = False) -> Iterator[Connection]:
        if self._memory_lock is not None:
            with self._memory_lock, self.engine.connect() as conn:
                yield conn
            return
        engine = self._autocommit_engine if autocommit else self.engine
        with engine.connect() as conn:
            if read_only and self.is_sqlite:
                conn = conn.execution_options(lilota_read=True)
            yield conn

    def _run(
        self, fn: Callable[[Connection], Any], *, read_only: bool = False, autocommit: bool = False
    ) -> Any:
        """Run ``fn`` in one transaction, retrying lock and disconnect errors a few times.

        ``fn`` must be safe to repeat: every caller here is one transaction that either
        committed or rolled back as a whole. Driver errors become lilota errors.
        ``autocommit`` (PostgreSQL) is for an ``fn`` that runs one statement, which is a
        transaction by itself then: one round trip instead of BEGIN, statement, COMMIT.
        """
        attempts = SQLITE_LOCKED_RETRIES if self.is_sqlite else UNREACHABLE_RETRIES
        for attempt in range(1, attempts + 1):
            try:
                with self._connection(read_only, autocommit) as conn, conn.begin():
                    return fn(conn)
            except exc.DBAPIError as e:
                retry = _is_locked(e) or _is_disconnect(e) or isinstance(e, exc.OperationalError)
                if retry and attempt < attempts:
                    time.sleep(0.05 * 2 ** (attempt - 1))
                    continue
                if isinstance(e, (exc.OperationalError, exc.InterfaceError)):
                    raise DatabaseUnavailable(
                        f"the database at {self.safe_url} cannot be reached: {e.orig}"
                    ) from e
                raise DatabaseError(f"the database refused a statement: {e.orig}") from e
            except exc.SQLAlchemyError as e:
                raise DatabaseError(f"database error: {e}") from e
        raise AssertionError("unreachable")

    @property
    def safe_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    # ------------------------------------------------------------------ statements

    def _build_statements(self) -> None:
        t = task_table
        self._insert = t.insert().returning(t.c.id)
        self._insert_notify = t.insert().returning(
            t.c.id, sa.func.pg_notify(NOTIFY_CHANNEL, "").label("notified")
        )
        self._insert_many = t.insert().returning(t.c.id, sort_by_parameter_order=True)
        self._insert_many_pg_stmt = sa.text(
            f"""
            INSERT INTO lilota_task (
                name, status, input, run_at, priority, max_attempts, description,
                unique_key, schedule_key, created_at, attempts, progress_percentage,
                cancel_requested
            )
            SELECT
                n.name, '{PENDING}', n.input, n.run_at, n.priority, n.max_attempts,
                n.description, n.unique_key, n.schedule_key, CAST(:now AS timestamp), 0, 0,
                false
            FROM unnest(
                CAST(:names AS varchar[]), CAST(:inputs AS text[]),
                CAST(:run_ats AS timestamp[]), CAST(:priorities AS integer[]),
                CAST(:max_attempts AS integer[]), CAST(:descriptions AS text[]),
                CAST(:unique_keys AS varchar[]), CAST(:schedule_keys AS varchar[])
            ) WITH ORDINALITY AS n(
                name, input, run_at, priority, max_attempts, description, unique_key,
                schedule_key, position
            )
            ORDER BY n.position
            RETURNING id
            """
        )
        runnable = (
            sa.select(t.c.id)
            .where(t.c.status == PENDING)
            .where(t.c.run_at <= sa.bindparam("now"))
            .where(t.c.name.in_(sa.bindparam("names", expanding=True)))
            .order_by(t.c.priority.desc(), t.c.run_at, t.c.id)
            .limit(sa.bindparam("limit"))
        )
        if self.is_postgres:
            runnable = runnable.with_for_update(skip_locked=True)
        self._claim = (
            t.update()
            .where(t.c.id.in_(runnable.scalar_subquery()))
            .values(
                status=RUNNING,
                attempts=t.c.attempts + 1,
                worker_id=sa.bindparam("b_worker_id"),
                pid=sa.bindparam("b_pid"),
                start_date_time=sa.bindparam("now"),
                lease_expires_at=sa.bindparam("b_lease_until"),
                progress_percentage=0,
                end_date_time=None,
            )
            .returning(
                t.c.id,
                t.c.name,
                t.c.input,
                t.c.attempts,
                t.c.max_attempts,
                t.c.priority,
                t.c.run_at,
            )
        )
        # PostgreSQL: the same claim written by hand: names as one array parameter, so the
        # text never changes and psycopg prepares it once per connection; ids taken with
        # = ANY(ARRAY(...)), which reads the locked rows back by primary key.
        self._claim_pg = sa.text(
            f"""
            UPDATE lilota_task SET
                status = '{RUNNING}',
                attempts = attempts + 1,
                worker_id = :b_worker_id,
                pid = :b_pid,
                start_date_time = :now,
                lease_expires_at = :b_lease_until,
                progress_percentage = 0,
                end_date_time = NULL,
                max_attempts = GREATEST(
                    max_attempts,
                    (CAST(:floors AS integer[]))[array_position(CAST(:names AS varchar[]), name)]
                )
            WHERE id = ANY(ARRAY(
                SELECT id FROM lilota_task
                WHERE status = '{PENDING}' AND run_at <= :now
                    AND name = ANY(CAST(:names AS varchar[]))
                ORDER BY priority DESC, run_at, id
                LIMIT :limit
                FOR UPDATE SKIP LOCKED
            ))
            RETURNING id, name, input, attempts, max_attempts, priority, run_at
            """
        )
        self._has_runnable = (
            sa.select(t.c.id)
            .where(t.c.status == PENDING)
            .where(t.c.run_at <= sa.bindparam("now"))
            .where(t.c.name.in_(sa.bindparam("names", expanding=True)))
            .limit(1)
        )
        self._next_run_at = (
            sa.select(sa.func.min(t.c.run_at))
            .where(t.c.status == PENDING)
            .where(t.c.name.in_(sa.bindparam("names", expanding=True)))
        )
        fence = sa.and_(
            t.c.id == sa.bindparam("b_id"),
            t.c.attempts == sa.bindparam("b_attempt"),
            # Not status.in_(ACTIVE): an IN list is an "expanding" parameter, which
            # SQLAlchemy refuses in executemany (several outcomes at once).
            sa.or_(t.c.status == PENDING, t.c.status == RUNNING),
        )
        self._finish = (
            t.update()
            .where(fence)
            .values(
                status=sa.bindparam("b_status"),
                output=sa.bindparam("b_output"),
                exception=sa.bindparam("b_exception"),
                end_date_time=sa.bindparam("b_end"),
                run_at=sa.func.coalesce(sa.bindparam("b_run_at", type_=sa.DateTime), t.c.run_at),
                progress_percentage=sa.func.coalesce(
                    sa.bindparam("b_progress", type_=sa.SmallInteger), t.c.progress_percentage
                ),
                lease_expires_at=None,
                # Who ran a finished task stays visible; a task going back to pending
                # belongs to no worker.
                worker_id=sa.case((sa.bindparam("b_status") == PENDING, None), else_=t.c.worker_id),
            )
        )
        # PostgreSQL: the same update for a whole batch of outcomes in one statement, a
        # join with one array per column, instead of one UPDATE per outcome. A worker
        # records up to MAX_BATCH outcomes at a time; this cut the server's time for them
        # about threefold (benchmarks/RESULTS.md).
        self._finish_pg = sa.text(
            f"""
            UPDATE lilota_task AS t SET
                status = o.status,
                output = o.output,
                exception = o.exception,
                end_date_time = CASE WHEN o.status = '{PENDING}' THEN NULL
                    ELSE CAST(:now AS timestamp) END,
                run_at = coalesce(o.run_at, t.run_at),
                progress_percentage = CASE o.status WHEN '{COMPLETED}' THEN 100
                    WHEN '{PENDING}' THEN 0 ELSE t.progress_percentage END,
                lease_expires_at = NULL,
                worker_id = CASE WHEN o.status = '{PENDING}' THEN NULL ELSE t.worker_id END
            FROM unnest(
                CAST(:ids AS bigint[]), CAST(:attempts AS integer[]),
                CAST(:statuses AS varchar[]), CAST(:outputs AS text[]),
                CAST(:exceptions AS text[]), CAST(:run_ats AS timestamp[])
            ) AS o(id, attempt, status, output, exception, run_at)
            WHERE t.id = o.id AND t.attempts = o.attempt
                AND t.status IN ('{PENDING}', '{RUNNING}')
            """
        )
        self._progress = (
            t.update()
            .where(t.c.id == sa.bindparam("b_id"))
            .where(t.c.attempts == sa.bindparam("b_attempt"))
            .where(t.c.status == RUNNING)
            .values(progress_percentage=sa.bindparam("b_progress"))
        )
        self._renew = (
            t.update()
            .where(t.c.worker_id == sa.bindparam("b_worker_id"))
            .where(t.c.status == RUNNING)
            .values(lease_expires_at=sa.bindparam("b_lease_until"))
            .returning(t.c.id, t.c.cancel_requested)
        )
        self._release = (
            t.update()
            .where(t.c.id == sa.bindparam("b_id"))
            .where(t.c.attempts == sa.bindparam("b_attempt"))
            .where(t.c.status == RUNNING)
            # A started attempt that is given back counts, as if its worker was lost:
            # with none left, or a cancellation asked for, _end_interrupted ends it.
            .where(
                sa.or_(
                    sa.bindparam("b_refund") == 1,
                    sa.and_(t.c.attempts < t.c.max_attempts, t.c.cancel_requested == sa.false()),
                )
            )
            .values(
                status=PENDING,
                attempts=t.c.attempts - sa.bindparam("b_refund"),
                worker_id=None,
                lease_expires_at=None,
                pid=None,
                start_date_time=None,
            )
        )
        self._get = sa.select(t).where(t.c.id == sa.bindparam("id"))
        self._raise_max_attempts = (
            t.update()
            .where(t.c.id == sa.bindparam("b_id"))
            .where(t.c.attempts == sa.bindparam("b_attempt"))
            .values(max_attempts=sa.bindparam("b_max"))
        )

    def _notify(self, conn: Connection) -> None:
        if self.is_postgres:
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))

    # ------------------------------------------------------------------ scheduling

    def _row(self, task: NewTask, now: datetime) -> dict[str, Any]:
        return {
            "name": task.name,
            "status": PENDING,
            "input": task.input,
            "run_at": to_naive_utc(task.run_at) if task.run_at else now,
            "priority": task.priority,
            "max_attempts": task.max_attempts,
            "description": task.description,
            "unique_key": task.unique_key,
            "schedule_key": task.schedule_key,
            "created_at": now,
            "attempts": 0,
            "progress_percentage": 0,
            "cancel_requested": False,
        }

    def add(self, task: NewTask) -> int:
        """Insert one pending task and wake idle workers; returns its id.

        With a ``unique_key`` that a pending or running task already has, nothing is
        inserted and that task's id is returned. With a ``schedule_key`` that exists
        (that periodic tick was created already), nothing is inserted and -1 returned.
        """
        self.ensure_schema()
        if task.unique_key is None and task.schedule_key is None:
            return int(
                self._run(lambda conn: self._insert_one(conn, task), autocommit=self.is_postgres)
            )
        for _ in range(5):
            found = self._run(lambda conn: self._insert_deduplicated(conn, task))
            if found is not None:
                return int(found)
        raise DatabaseError(
            f"could not schedule {task.name!r} with unique_key {task.unique_key!r}: "
            "the task holding the key kept changing"
        )

    def _insert_one(self, conn: Connection, task: NewTask) -> int:
        if self.is_postgres:
            # INSERT ... RETURNING id, pg_notify(...): one statement, run in autocommit
            # (see add), so scheduling a task costs one round trip instead of four.
            row = conn.execute(self._insert_notify, self._row(task, self.clock())).first()
            assert row is not None
            return int(row[0])
        new_id = conn.execute(self._insert, self._row(task, self.clock())).scalar_one()
        self._notify(conn)
        return int(new_id)

    def _insert_deduplicated(self, conn: Connection, task: NewTask) -> int | None:
        """Insert unless a unique or schedule key is taken; None if that changed meanwhile."""
        t = task_table
        row = self._row(task, self.clock())
        dialect_insert = pg_dialect.insert if self.is_postgres else sqlite_dialect.insert
        # ON CONFLICT DO NOTHING lets the unique indexes decide between two processes
        # scheduling the same key at once; the loser then reads the winner's row.
        inserted = conn.execute(
            dialect_insert(t).values(row).on_conflict_do_nothing().returning(t.c.id)
        ).first()
        if inserted is not None:
            self._notify(conn)
            return int(inserted[0])
        if (
            task.schedule_key is not None
            and conn.execute(sa.select(t.c.id).where(t.c.schedule_key == task.schedule_key)).first()
        ):
            return -1
        existing = conn.execute(
            sa.select(t.c.id).where(t.c.unique_key == task.unique_key).where(t.c.status.in_(ACTIVE))
        ).first()
        return None if existing is None else int(existing[0])

    def add_many(self, tasks: Sequence[NewTask]) -> list[int]:
        """Insert many pending tasks in one statement and one transaction; returns ids."""
        if not tasks:
            return []
        self.ensure_schema()

        def insert(conn: Connection) -> list[int]:
            now = self.clock()
            if self.is_postgres:
                ids = self._insert_many_pg(conn, tasks, now)
            else:
                rows = [self._row(task, now) for task in tasks]
                ids = [int(r[0]) for r in conn.execute(self._insert_many, rows)]
            self._notify(conn)
            return ids

        return list(self._run(insert))

    def _insert_many_pg(
        self, conn: Connection, tasks: Sequence[NewTask], now: datetime
    ) -> list[int]:
        # One INSERT ... SELECT FROM unnest(one array per column): four to five times the
        # rows per second of SQLAlchemy's multi-row VALUES batches. Rows are inserted in
        # input order (ORDER BY the ordinality), so their ids, drawn from the sequence as
        # rows are inserted, ascend in input order: sorting the returned ids restores it.
        result = conn.execute(
            self._insert_many_pg_stmt,
            {
                "now": now,
                "names": [t.name for t in tasks],
                "inputs": [t.input for t in tasks],
                "run_ats": [to_naive_utc(t.run_at) if t.run_at else now for t in tasks],
                "priorities": [t.priority for t in tasks],
                "max_attempts": [t.max_attempts for t in tasks],
                "descriptions": [t.description for t in tasks],
                "unique_keys": [t.unique_key for t in tasks],
                "schedule_keys": [t.schedule_key for t in tasks],
            },
        )
        return sorted(int(r[0]) for r in result)

    # ------------------------------------------------------------------ claiming

    def claim(
        self,
        *,
        worker_id: str,
        names: Iterable[str],
        limit: int,
        lease: timedelta,
        finished: Sequence[Outcome] = (),
        max_attempts: Mapping[str, int] | None = None,
    ) -> list[Claim]:
        """Record ``finished`` outcomes, then claim up to ``limit`` runnable tasks.

        One transaction (one commit) for both. Tasks are taken by priority (highest
        first), then run_at, then id; only tasks whose name is in ``names``. Each claimed
        task becomes running with its attempt count incremented and a lease until now +
        ``lease``. With ``max_attempts`` (by name: the worker's registered limits), a
        claimed task's max_attempts is raised to at least that, in the same transaction
        (a scheduler that did not know the task stored 1). Returns the claims.
        """
        names = sorted(names)
        pid = os.getpid()
        floors = dict(max_attempts or {})

        def claim(conn: Connection) -> list[Claim]:
            if finished:
                self._finish_rows(conn, finished)
                self._cancel_requested_retries(conn, finished)
            if limit <= 0 or not names:
                return []
            now = self.clock()
            rows = conn.execute(
                self._claim_pg if self.is_postgres else self._claim,
                {
                    "now": now,
                    "names": names,
                    "floors": [floors.get(n, 1) for n in names],
                    "limit": limit,
                    "b_worker_id": worker_id,
                    "b_pid": pid,
                    "b_lease_until": now + lease,
                },
            ).all()
            # RETURNING comes in no particular order: run them in claim order.
            rows = sorted(rows, key=lambda r: (-r.priority, r.run_at, r.id))
            # PostgreSQL raised max_attempts in the claim statement itself; SQLite does it
            # here, in the same transaction.
            low = [r for r in rows if floors.get(r.name, 1) > r.max_attempts]
            if low:
                conn.execute(
                    self._raise_max_attempts,
                    [{"b_id": r.id, "b_attempt": r.attempts, "b_max": floors[r.name]} for r in low],
                )
            return [
                Claim(
                    id=r.id,
                    name=r.name,
                    input=r.input,
                    attempt=r.attempts,
                    max_attempts=max(r.max_attempts, floors.get(r.name, 1)),
                )
                for r in rows
            ]

        if self.is_sqlite and not finished and not self.has_runnable(names):
            # Look before taking the write lock: an idle SQLite worker is woken by every
            # commit anyone makes, and most of those are not new tasks.
            return []
        # PostgreSQL: a claim with nothing to record is one statement: no BEGIN/COMMIT.
        return list(self._run(claim, autocommit=self.is_postgres and not finished))

    def has_runnable(self, names: Iterable[str]) -> bool:
        """Whether a pending task of one of ``names`` is due now (a read, no lock)."""
        names = sorted(names)
        if not names:
            return False

        def look(conn: Connection) -> bool:
            return (
                conn.execute(self._has_runnable, {"now": self.clock(), "names": names}).first()
                is not None
            )

        return bool(self._run(look, read_only=True))

    def next_run_at(self, names: Iterable[str]) -> datetime | None:
        """The earliest run_at of a pending task of ``names`` (naive UTC), or None."""
        names = sorted(names)
        if not names:
            return None

        def look(conn: Connection) -> datetime | None:
            return conn.execute(self._next_run_at, {"names": names}).scalar()

        return self._run(look, read_only=True)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ after the claim

    def _finish_rows(self, conn: Connection, outcomes: Sequence[Outcome]) -> int:
        now = self.clock()
        if self.is_postgres:
            written = int(
                conn.execute(
                    self._finish_pg,
                    {
                        "now": now,
                        "ids": [o.id for o in outcomes],
                        "attempts": [o.attempt for o in outcomes],
                        "statuses": [o.status for o in outcomes],
                        "outputs": [o.output for o in outcomes],
                        "exceptions": [o.exception for o in outcomes],
                        "run_ats": [o.run_at for o in outcomes],
                    },
                ).rowcount
            )
            if written < len(outcomes):
                log.warning(
                    "%d of %d task outcomes were not recorded: their lease had been taken over",
                    len(outcomes) - written,
                    len(outcomes),
                )
            return written
        params = [
            {
                "b_id": o.id,
                "b_attempt": o.attempt,
                "b_status": o.status,
                "b_output": o.output,
                "b_exception": o.exception,
                "b_end": None if o.status == PENDING else now,
                "b_run_at": o.run_at,
                "b_progress": 100
                if o.status == COMPLETED
                else (0 if o.status == PENDING else None),
            }
            for o in outcomes
        ]
        result = conn.execute(self._finish, params)
        written = (
            result.rowcount if result.rowcount is not None and result.rowcount >= 0 else len(params)
        )
        if written < len(params):
            log.warning(
                "%d of %d task outcomes were not recorded: their lease had been taken over",
                len(params) - written,
                len(params),
            )
        return written

    def _cancel_requested_retries(self, conn: Connection, outcomes: Sequence[Outcome]) -> None:
        """A task someone asked to cancel while it ran is not tried again: an attempt that
        ended in a retry (it raised, or its worker was lost) ends it cancelled instead.
        Cheap: it only runs when there are retries, and only looks at their rows."""
        retried = sorted({o.id for o in outcomes if o.status == PENDING})
        if not retried:
            return
        t = task_table
        for start in range(0, len(retried), 500):
            conn.execute(
                t.update()
                .where(t.c.id.in_(retried[start : start + 500]))
                .where(t.c.status == PENDING)
                .where(t.c.cancel_requested == sa.true())
                .values(status=CANCELLED, end_date_time=self.clock())
            )

    def finish(self, outcomes: Sequence[Outcome]) -> int:
        """Record the end of attempts (fenced by attempt). Returns how many were recorded."""
        if not outcomes:
            return 0

        def finish(conn: Connection) -> int:
            written = self._finish_rows(conn, outcomes)
            self._cancel_requested_retries(conn, outcomes)
            return written

        return int(self._run(finish))

    def set_progress(self, task_id: int, attempt: int, percentage: int) -> bool:
        """Record progress of a running attempt. False if the attempt no longer holds it."""
        result = self._run(
            lambda conn: (
                conn.execute(
                    self._progress,
                    {"b_id": task_id, "b_attempt": attempt, "b_progress": percentage},
                ).rowcount
            )
        )
        return bool(result)

    def raise_max_attempts(self, claims: Sequence[tuple[Claim, int]]) -> None:
        """Set the attempt limit of held tasks (fenced by attempt)."""
        params = [{"b_id": c.id, "b_attempt": c.attempt, "b_max": n} for c, n in claims]
        self._run(lambda conn: conn.execute(self._raise_max_attempts, params))

    def renew_leases(
        self, worker_id: str, lease: timedelta, *, task_ids: Iterable[int] | None = None
    ) -> LeaseReport:
        """Extend the lease of every task ``worker_id`` holds, and beat its heartbeat.

        With ``task_ids``, only those tasks' leases (a worker passes the tasks it knows it
        holds: a claim whose commit succeeded but whose answer was lost in a dropped
        connection must expire and be recovered, not be renewed for ever).
        """
        ids = None if task_ids is None else sorted({int(i) for i in task_ids})

        def renew(conn: Connection) -> LeaseReport:
            now = self.clock()
            params = {"b_worker_id": worker_id, "b_lease_until": now + lease}
            if ids is None:
                rows = conn.execute(self._renew, params).all()
            elif ids:
                rows = conn.execute(self._renew.where(task_table.c.id.in_(ids)), params).all()
            else:
                rows = []
            conn.execute(
                worker_table.update().where(worker_table.c.id == worker_id).values(heartbeat_at=now)
            )
            return LeaseReport(
                held=frozenset(r.id for r in rows),
                cancel_requested=frozenset(r.id for r in rows if r.cancel_requested),
            )

        return self._run(renew)  # type: ignore[no-any-return]

    def release(self, claims: Sequence[Claim], *, refund: bool) -> int:
        """Give claimed tasks back (pending again). ``refund`` undoes the attempt count,
        for tasks that never started. Without it the attempt counts, as when a worker is
        lost: a task with no attempt left ends failed, one whose cancellation was requested
        ends cancelled (as :meth:`recover_expired` would end them). Returns how many of
        ``claims`` still held their task."""
        if not claims:
            return 0
        params = [
            {"b_id": c.id, "b_attempt": c.attempt, "b_refund": 1 if refund else 0} for c in claims
        ]

        def release(conn: Connection) -> int:
            count = conn.execute(self._release, params).rowcount
            if not refund:
                count += self._end_interrupted(conn, claims)
            self._notify(conn)
            return int(count)

        return int(self._run(release))

    def _end_interrupted(self, conn: Connection, claims: Sequence[Claim]) -> int:
        """End the claims the release left running: those with no attempt left or a
        cancellation requested."""
        t = task_table
        held = {(c.id, c.attempt) for c in claims}
        rows = conn.execute(
            sa.select(t.c.id, t.c.attempts, t.c.max_attempts, t.c.worker_id, t.c.cancel_requested)
            .where(t.c.id.in_(sorted({c.id for c in claims})))
            .where(t.c.status == RUNNING)
        ).all()
        outcomes = []
        for r in rows:
            if (r.id, r.attempts) not in held:
                continue
            stopped = f"worker {r.worker_id} stopped during attempt {r.attempts}"
            if r.cancel_requested:
                status, kind = CANCELLED, "TaskCancelled"
                message = f"task {r.id} was cancelled; {stopped}"
            else:
                status, kind = FAILED, "WorkerLost"
                message = f"{stopped}, the last of {r.max_attempts}"
            error = {"type": f"lilota.errors.{kind}", "message": message, "traceback": ""}
            log.warning("task %d: given back by a stopping worker; now %s", r.id, status)
            outcomes.append(
                Outcome(id=r.id, attempt=r.attempts, status=status, exception=json.dumps(error))
            )
        return self._finish_rows(conn, outcomes) if outcomes else 0

    def recover_expired(self) -> list[tuple[int, str]]:
        """Take back running tasks whose lease expired (their worker is gone).

        Each goes back to pending if it has attempts left, else to failed with a
        ``WorkerLost`` exception; one whose cancellation was requested ends cancelled.
        Safe to call from many processes at once: each row is changed by exactly one of
        them. Returns (task id, new status) pairs.
        """
        t = task_table
        if self.is_sqlite:
            # Workers call this every few seconds: look before taking SQLite's write lock.
            expired = sa.select(t.c.id).where(t.c.status == RUNNING)
            expired = expired.where(t.c.lease_expires_at < self.clock()).limit(1)
            if self._run(lambda conn: conn.execute(expired).first(), read_only=True) is None:
                return []

        def recover(conn: Connection) -> list[tuple[int, str]]:
            now = self.clock()
            query = (
                sa.select(
                    t.c.id,
                    t.c.attempts,
                    t.c.max_attempts,
                    t.c.worker_id,
                    t.c.lease_expires_at,
                    t.c.cancel_requested,
                )
                .where(t.c.status == RUNNING)
                .where(t.c.lease_expires_at < now)
                .order_by(t.c.lease_expires_at)
                .limit(1000)
            )
            if self.is_postgres:
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            if not rows:
                return []
            outcomes = []
            for r in rows:
                error = {
                    "type": "lilota.errors.WorkerLost",
                    "message": (
                        f"worker {r.worker_id} stopped renewing its lease (expired "
                        f"{r.lease_expires_at.isoformat(timespec='milliseconds')} UTC, noticed "
                        f"{now.isoformat(timespec='milliseconds')} UTC) during attempt {r.attempts}"
                    ),
                    "traceback": "",
                }
                retry = r.attempts < r.max_attempts
                status = PENDING if retry else FAILED
                if r.cancel_requested:
                    status, retry = CANCELLED, False
                    error["type"] = "lilota.errors.TaskCancelled"
                    error["message"] = f"task {r.id} was cancelled; {error['message']}"
                outcomes.append(
                    Outcome(
                        id=r.id,
                        attempt=r.attempts,
                        status=status,
                        exception=json.dumps(error),
                        run_at=now if retry else None,
                    )
                )
            self._finish_rows(conn, outcomes)
            self._notify(conn)
            return [(o.id, o.status) for o in outcomes]

        recovered: list[tuple[int, str]] = self._run(recover)
        for task_id, status in recovered:
            log.warning("task %d: its worker was lost; now %s", task_id, status)
        return recovered

    # ------------------------------------------------------------------ workers table

    def register_worker(self, worker_id: str, task_names: Iterable[str]) -> None:
        self.ensure_schema()

        def register(conn: Connection) -> None:
            now = self.clock()
            conn.execute(
                worker_table.insert().values(
                    id=worker_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=now,
                    heartbeat_at=now,
                    task_names=json.dumps(sorted(task_names)),
                )
            )

        self._run(register)

    def unregister_worker(self, worker_id: str) -> None:
        self._run(
            lambda conn: conn.execute(worker_table.delete().where(worker_table.c.id == worker_id))
        )

    def workers(self, *, seen_within: timedelta | None = None) -> list[dict[str, Any]]:
        """Registered worker processes (with a recent heartbeat if ``seen_within``)."""
        self.ensure_schema()

        def read(conn: Connection) -> list[dict[str, Any]]:
            query = sa.select(worker_table).order_by(worker_table.c.started_at)
            if seen_within is not None:
                query = query.where(worker_table.c.heartbeat_at >= self.clock() - seen_within)
            return [
                {**row._mapping, "task_names": json.loads(row.task_names)}
                for row in conn.execute(query)
            ]

        return list(self._run(read, read_only=True))

    def forget_dead_workers(self, older_than: timedelta) -> int:
        """Delete worker rows whose heartbeat is older than ``older_than``."""
        cutoff = self.clock() - older_than
        return int(
            self._run(
                lambda conn: (
                    conn.execute(
                        worker_table.delete().where(worker_table.c.heartbeat_at < cutoff)
                    ).rowcount
                )
            )
        )

    # ------------------------------------------------------------------ reading

    def get(self, task_id: int) -> Task | None:
        """The task with ``task_id``, or None."""
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            return None
        self.ensure_schema()
        row = self._run(
            lambda conn: conn.execute(self._get, {"id": task_id}).first(), read_only=True
        )
        return None if row is None else Task.from_row(row._mapping, serialization.loads)

    def get_many(self, task_ids: Iterable[int]) -> dict[int, Task]:
        ids = sorted({int(i) for i in task_ids})
        if not ids:
            return {}
        self.ensure_schema()
        t = task_table

        def read(conn: Connection) -> dict[int, Task]:
            found: dict[int, Task] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for row in conn.execute(sa.select(t).where(t.c.id.in_(chunk))):
                    found[row.id] = Task.from_row(row._mapping, serialization.loads)
            return found

        return dict(self._run(read, read_only=True))

    def unfinished(self, task_ids: Iterable[int], *, due_only: bool = False) -> set[int]:
        """Those of ``task_ids`` that are pending or running (with ``due_only``, leaving
        out pending tasks whose run_at is still in the future)."""
        ids = sorted({int(i) for i in task_ids})
        if not ids:
            return set()
        t = task_table

        def read(conn: Connection) -> set[int]:
            left: set[int] = set()
            now = self.clock()
            for start in range(0, len(ids), 500):
                query = (
                    sa.select(t.c.id)
                    .where(t.c.id.in_(ids[start : start + 500]))
                    .where(t.c.status.in_(ACTIVE))
                )
                if due_only:
                    query = query.where(sa.or_(t.c.status == RUNNING, t.c.run_at <= now))
                left.update(r[0] for r in conn.execute(query))
            return left

        return set(self._run(read, read_only=True))

    def list_tasks(
        self,
        *,
        status: str | Sequence[str] | None = None,
        name: str | None = None,
        limit: int = 50,
        before_id: int | None = None,
        offset: int = 0,
    ) -> list[Task]:
        """Tasks newest first, optionally filtered; page with ``before_id`` (keyset)."""
        self.ensure_schema()
        t = task_table
        query = sa.select(t).order_by(t.c.id.desc()).limit(max(0, int(limit)))
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            for s in statuses:
                TaskStatus(s)  # ValueError for an unknown status
            query = query.where(t.c.status.in_(statuses))
        if name is not None:
            query = query.where(t.c.name == name)
        if before_id is not None:
            query = query.where(t.c.id < before_id)
        if offset:
            query = query.offset(offset)

        def read(conn: Connection) -> list[Task]:
            return [Task.from_row(row._mapping, serialization.loads) for row in conn.execute(query)]

        return list(self._run(read, read_only=True))

    def count_by_status(self, *, name: str | None = None) -> dict[str, int]:
        """How many tasks are in each status (every status present, zero included)."""
        self.ensure_schema()
        t = task_table
        query = sa.select(t.c.status, sa.func.count()).group_by(t.c.status)
        if name is not None:
            query = query.where(t.c.name == name)
        counts = {s.value: 0 for s in TaskStatus}

        def read(conn: Connection) -> None:
            for status, count in conn.execute(query):
                counts[status] = int(count)

        self._run(read, read_only=True)
        return counts

    def count_by_name(self) -> dict[str, dict[str, int]]:
        """Counts by task name, then status."""
        self.ensure_schema()
        t = task_table
        query = sa.select(t.c.name, t.c.status, sa.func.count()).group_by(t.c.name, t.c.status)
        result: dict[str, dict[str, int]] = {}

        def read(conn: Connection) -> None:
            for name, status, count in conn.execute(query):
                result.setdefault(name, {s.value: 0 for s in TaskStatus})[status] = int(count)

        self._run(read, read_only=True)
        return result

    def finished_since(self, since: datetime) -> int:
        """How many tasks reached a final state since ``since``."""
        self.ensure_schema()
        t = task_table
        query = (
            sa.select(sa.func.count())
            .where(t.c.status.in_(FINAL))
            .where(t.c.end_date_time >= to_naive_utc(since))
        )
        return int(self._run(lambda conn: conn.execute(query).scalar_one(), read_only=True))

    # ------------------------------------------------------------------ actions

    def cancel(self, task_id: int) -> TaskStatus:
        """Cancel a task: a pending one at once (returns CANCELLED); a running one is asked
        to stop (returns RUNNING, with ``cancel_requested`` set).

        Raises :class:`TaskNotFound` or :class:`TaskAlreadyFinished`.
        """
        self.ensure_schema()
        t = task_table

        def cancel(conn: Connection) -> TaskStatus:
            now = self.clock()
            done = conn.execute(
                t.update()
                .where(t.c.id == task_id)
                .where(t.c.status == PENDING)
                .values(status=CANCELLED, end_date_time=now, cancel_requested=True)
            ).rowcount
            if done:
                return TaskStatus.CANCELLED
            asked = conn.execute(
                t.update()
                .where(t.c.id == task_id)
                .where(t.c.status == RUNNING)
                .values(cancel_requested=True)
            ).rowcount
            if asked:
                return TaskStatus.RUNNING
            status = conn.execute(sa.select(t.c.status).where(t.c.id == task_id)).scalar()
            if status is None:
                raise TaskNotFound(f"no task with id {task_id}")
            raise TaskAlreadyFinished(f"task {task_id} is already {status}; it cannot be cancelled")

        return self._run(cancel)  # type: ignore[no-any-return]

    def retry(self, task_id: int) -> None:
        """Schedule a failed or cancelled task again (same id, attempts from zero).

        Raises :class:`TaskNotFound`, or :class:`TaskAlreadyFinished`'s sibling
        ``ValueError`` when the task is pending, running or completed.
        """
        self.ensure_schema()
        t = task_table

        def retry(conn: Connection) -> None:
            now = self.clock()
            changed = conn.execute(
                t.update()
                .where(t.c.id == task_id)
                .where(t.c.status.in_((FAILED, CANCELLED)))
                .values(
                    status=PENDING,
                    attempts=0,
                    run_at=now,
                    output=None,
                    exception=None,
                    progress_percentage=0,
                    start_date_time=None,
                    end_date_time=None,
                    cancel_requested=False,
                    worker_id=None,
                    pid=None,
                )
            ).rowcount
            if changed:
                self._notify(conn)
                return
            status = conn.execute(sa.select(t.c.status).where(t.c.id == task_id)).scalar()
            if status is None:
                raise TaskNotFound(f"no task with id {task_id}")
            raise ValueError(
                f"task {task_id} is {status}; only failed or cancelled tasks can be retried"
            )

        self._run(retry)

    def cleanup(self, older_than: timedelta) -> int:
        """Delete completed, failed and cancelled tasks that ended more than
        ``older_than`` ago. Never touches pending or running tasks. Returns the count."""
        if not isinstance(older_than, timedelta) or older_than < timedelta(0):
            raise ValueError(f"older_than must be a timedelta >= 0, got {older_than!r}")
        self.ensure_schema()
        t = task_table
        cutoff = self.clock() - older_than
        return int(
            self._run(
                lambda conn: (
                    conn.execute(
                        t.delete().where(t.c.status.in_(FINAL)).where(t.c.end_date_time < cutoff)
                    ).rowcount
                )
            )
        )

    # ------------------------------------------------------------------ waking up

    def listener(self) -> Listener:
        """Something an idle worker can wait on until tasks may have arrived."""
        if self.is_postgres:
            return _PostgresListener(self)
        if self.is_sqlite and not is_memory_sqlite(self.url):
            return _SQLiteListener(self)
        return Listener()


class Listener:
    """Waits for a sign that tasks were scheduled. ``wait`` may return early (spuriously).

    ``wake()`` may be called from any thread or a signal handler: the current or next
    ``wait`` returns within a quarter of a second.
    """

    # Longest uninterrupted block inside wait(): how quickly wake() takes effect.
    _SLICE = 0.25

    def __init__(self) -> None:
        self._woken = threading.Event()

    def wake(self) -> None:
        self._woken.set()

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True if woken by a sign of new tasks."""
        deadline = time.monotonic() + timeout
        while not self._woken.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._wait_once(min(left, self._SLICE)):
                return True
        return True

    def _wait_once(self, timeout: float) -> bool:
        self._woken.wait(timeout)
        return False

    def close(self) -> None:
        pass


class _SQLiteListener(Listener):
    """Watches ``PRAGMA data_version`` on its own connection: it changes exactly when
    another connection commits to the database file."""

    def __init__(self, store: TaskStore) -> None:
        super().__init__()
        self._conn = sqlite3.connect(
            store.url.database or "", check_same_thread=False, isolation_level=None
        )
        self._version = self._read()

    def _read(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _wait_once(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            version = self._read()
            if version != self._version:
                self._version = version
                return True
            left = deadline - time.monotonic()
            if left <= 0 or self._woken.is_set():
                return False
            time.sleep(min(SQLITE_WATCH_INTERVAL, left))

    def close(self) -> None:
        self._conn.close()


class _PostgresListener(Listener):
    """A dedicated connection that LISTENs on the task channel."""

    def __init__(self, store: TaskStore) -> None:
        super().__init__()
        self._store = store
        self._conn: Any = None
        self._broken = False  # the connection was lost and is not back yet
        import psycopg

        try:
            self._connect()
        except psycopg.Error as e:  # the database is down: wait() connects when it is back
            self._lost(e)

    def _connect(self) -> None:
        import psycopg

        url = self._store.url.set(drivername="postgresql")
        self._conn = psycopg.connect(
            url.render_as_string(hide_password=False),
            autocommit=True,
            **postgres_connect_args(url),
        )
        self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        if self._broken:
            self._broken = False
            log.info("LISTEN connection to %s is back", self._store.safe_url)

    def _lost(self, error: Exception) -> None:
        # One warning per outage, not one per reconnection attempt.
        if not self._broken:
            log.warning("lost the LISTEN connection (%s); reconnecting", error)
        self._broken = True
        self.close()

    def _wait_once(self, timeout: float) -> bool:
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._connect()
            woken = False
            for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                woken = True
            if woken:  # drain what else arrived, so one burst costs one wake-up
                for _ in self._conn.notifies(timeout=0.0):
                    pass
            return woken
        except psycopg.Error as e:
            self._lost(e)
            self._woken.wait(min(timeout, 1.0))
            return True  # look for work anyway: notifications may have been missed

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


__all__ = [
    "Claim",
    "LeaseReport",
    "Listener",
    "NewTask",
    "Outcome",
    "TaskStore",
    "parse_url",
]
