"""What differs between SQLite and PostgreSQL: one small class per backend.

:mod:`lilota.store` writes the task protocol once and holds one :class:`Dialect`, chosen
from the URL, which owns the engine set-up, the catalogue of named statements (shared
ones in the base, the portable way; per backend: claim, finish-many, insert-many/one),
``SKIP LOCKED``, the wake-up and the listener (:mod:`lilota.listeners`), autocommit of
single statements, and which driver errors are worth another try (:func:`transaction`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any, ClassVar, Concatenate, ParamSpec, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, Row, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.pool import StaticPool

from lilota.errors import ConfigurationError, DatabaseError, DatabaseUnavailable
from lilota.execution import cancelled_record
from lilota.listeners import NOTIFY_CHANNEL, Listener, PostgresListener, SQLiteListener
from lilota.models import NewTask, Outcome, TaskStatus, to_naive_utc

log = logging.getLogger(__name__)

PENDING = TaskStatus.PENDING.value
RUNNING = TaskStatus.RUNNING.value
CANCELLED = TaskStatus.CANCELLED.value
# An outcome's progress: 100 if completed, 0 if pending again, else (or if asked to cancel) kept.
_FINAL_PROGRESS = {TaskStatus.COMPLETED.value: 100, PENDING: 0}


def _if_cancel_requested(o: Outcome) -> str | None:
    """The exception recorded instead if a cancellation was requested (the worker may not
    have seen it): a return or failure then ends cancelled. None: retries, cancellations."""
    done = o.status in (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value)
    return cancelled_record(o) if done else None


# SQLite waits this long for another process's write transaction. Writes here take a few
# ms, so 30 s runs out only when something is badly stuck; a short timeout would turn
# ordinary contention between many workers into errors.
SQLITE_BUSY_TIMEOUT_MS = 30_000

# "database is locked" that survives the busy timeout (e.g. a checkpoint racing a reader
# upgrade) is retried this many times before it reaches anyone.
SQLITE_LOCKED_RETRIES = 5

# A PostgreSQL transaction that fails because the server cannot be reached (restart,
# failover, dropped connection) is tried this many times, waiting 0.05, 0.1, 0.2, 0.4 s: a
# pooled connection the server closed is replaced unnoticed, and schedule() learns of a
# real outage (DatabaseUnavailable) within about a second. Workers retry with back-off.
UNREACHABLE_RETRIES = 5

# libpq settings unless the URL sets them: connecting gives up after 10 s (default: never),
# keepalives notice a dead peer of an idle connection in a minute, and the server ends a
# session idle in a transaction for 10 s (a cut-off worker's row locks would hide its tasks).
POSTGRES_CONNECT_DEFAULTS: dict[str, Any] = dict(
    connect_timeout=10, keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3
) | {"options": "-c idle_in_transaction_session_timeout=10s"}


def parse_url(db_url: object) -> URL:
    """``db_url`` validated, with lilota's driver defaults (``postgresql://`` means psycopg
    3, ``postgresql+psycopg://``). Raises :class:`ConfigurationError` naming the problem."""
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
    shown = url.render_as_string(hide_password=True)
    database = (url.database or "") if backend == "sqlite" else ""
    if database and database != ":memory:" and not database.startswith("file:"):
        parent = os.path.dirname(os.path.abspath(database))
        if not os.path.isdir(parent):
            raise ConfigurationError(f"db_url {shown!r}: the directory {parent!r} does not exist")
    try:
        url.get_dialect()
    except exc.NoSuchModuleError as e:
        raise ConfigurationError(
            f"db_url {shown!r}: SQLAlchemy has no dialect {url.drivername!r}"
        ) from e
    return url


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (url.database or ":memory:") == ":memory:"


def postgres_connect_args(url: URL) -> dict[str, Any]:
    """:data:`POSTGRES_CONNECT_DEFAULTS` that the URL's query does not set."""
    return {k: v for k, v in POSTGRES_CONNECT_DEFAULTS.items() if k not in url.query}


P = ParamSpec("P")
R = TypeVar("R")
_dialects: weakref.WeakSet[Dialect] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A process forked from this one (gunicorn --preload, multiprocessing) must not share
    # pooled connections with its parent: drop them without closing the parent's sockets.
    for dialect in list(_dialects):
        dialect.engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


class Dialect:
    """The portable way (SQLAlchemy Core), and what every backend shares. Built once per
    store with the task table (the store owns the schema): ``sql`` is the catalogue of
    statements by name, ``engine`` the configured engine."""

    # A transaction that fails for a transient reason (is_transient) is tried this many
    # times in all before the error reaches the caller.
    retries: ClassVar[int] = UNREACHABLE_RETRIES
    # Whether a write transaction locks the whole database (SQLite): the store then looks
    # with a read first where there is often nothing to write, instead of queueing.
    writes_lock_database: ClassVar[bool] = False

    def __init__(self, url: URL, table: sa.Table, *, pool_size: int) -> None:
        self.url, self.name, self.table = url, url.get_backend_name(), table
        self.sql: dict[str, Any] = self.catalogue(table)
        self.engine = self.create_engine(pool_size)
        # The engine for single statements: a transaction by themselves where it can be.
        self.single_engine = self.engine
        _dialects.add(self)
        # A store dropped without dispose() closes its pooled connections.
        weakref.finalize(self, self.engine.dispose)

    def __str__(self) -> str:
        return self.name

    def catalogue(self, t: sa.Table) -> dict[str, Any]:
        """Every statement the store runs, by name (one comment each)."""
        c, pct = t.c, t.c.progress_percentage
        fence = (c.id == sa.bindparam("b_id"), c.attempts == sa.bindparam("b_attempt"))
        by_id = c.id == sa.bindparam("b_id")
        names = c.name.in_(sa.bindparam("names", expanding=True))
        due = (c.status == PENDING, c.run_at <= sa.bindparam("now"), names)
        running = (c.id, c.attempts, c.max_attempts, c.worker_id, c.cancel_requested)
        lease_over = (c.status == RUNNING, c.lease_expires_at < sa.bindparam("now"))
        ids = c.id.in_(sa.bindparam("ids", expanding=True))
        order = (c.priority.desc(), c.run_at, c.id)
        b_cancelled = sa.bindparam("b_cancelled", type_=sa.Text)
        asked = sa.and_(c.cancel_requested == sa.true(), b_cancelled.is_not(None))
        runnable = sa.select(c.id).where(*due).order_by(*order).limit(sa.bindparam("limit"))
        return {
            # Insert one pending task, returning its id.
            "insert": t.insert().returning(c.id),
            # Insert a batch in one executemany; ids come back in input order.
            "insert_many": t.insert().returning(c.id, sort_by_parameter_order=True),
            # Is a pending task of :names due at :now? (A read: it takes no write lock.)
            "has_runnable": sa.select(c.id).where(*due).limit(1),
            # The earliest run_at of a pending task of :names.
            "next_run_at": sa.select(sa.func.min(c.run_at)).where(c.status == PENDING, names),
            # The first :limit runnable tasks of :names become running: attempt + 1, leased.
            "claim": t.update()
            .where(c.id.in_(runnable.scalar_subquery()))
            .values(
                status=RUNNING,
                attempts=c.attempts + 1,
                worker_id=sa.bindparam("b_worker_id"),
                pid=sa.bindparam("b_pid"),
                start_date_time=sa.bindparam("now"),
                lease_expires_at=sa.bindparam("b_lease_until"),
                progress_percentage=0,
                end_date_time=None,
            )
            .returning(c.id, c.name, c.input, c.attempts, c.max_attempts, c.priority, c.run_at),
            # Raise a held task's attempt limit to :b_max (fenced).
            "raise_max_attempts": t.update()
            .where(*fence)
            .values(max_attempts=sa.bindparam("b_max")),
            # End one attempt (fenced; not status.in_(...): an IN list is an expanding
            # parameter, refused in executemany, which records a batch). A task asked to
            # cancel ends cancelled however it ended (b_cancelled: its exception then).
            "finish": t.update()
            .where(*fence, sa.or_(c.status == PENDING, c.status == RUNNING))
            .values(status=sa.case((asked, CANCELLED), else_=sa.bindparam("b_status")))
            .values(exception=sa.case((asked, b_cancelled), else_=sa.bindparam("b_exception")))
            .values(output=sa.bindparam("b_output"), end_date_time=sa.bindparam("b_end"))
            .values(run_at=sa.func.coalesce(sa.bindparam("b_run_at", type_=sa.DateTime), c.run_at))
            .values(
                progress_percentage=sa.case(
                    (c.cancel_requested == sa.true(), pct),
                    else_=sa.func.coalesce(sa.bindparam("b_progress", type_=sa.SmallInteger), pct),
                ),
                lease_expires_at=None,
                # Who ran a finished task stays visible; a pending one belongs to no worker.
                worker_id=sa.case((sa.bindparam("b_status") == PENDING, None), else_=c.worker_id),
            ),
            # Retries of :ids whose cancellation was requested end cancelled instead.
            "cancel_retries": t.update()
            .where(ids, c.status == PENDING, c.cancel_requested == sa.true())
            .values(status=CANCELLED, end_date_time=sa.bindparam("now")),
            # Record the progress of a running attempt (fenced).
            "progress": t.update()
            .where(*fence, c.status == RUNNING)
            .values(progress_percentage=sa.bindparam("b_progress")),
            # Extend the leases a worker holds; RETURNING ids and who was asked to cancel.
            "renew": t.update()
            .where(c.worker_id == sa.bindparam("b_worker_id"), c.status == RUNNING)
            .values(lease_expires_at=sa.bindparam("b_lease_until"))
            .returning(c.id, c.cancel_requested),
            # Give a running attempt back to pending (fenced), refunding it if :b_refund is
            # 1. A started attempt given back counts, as if its worker was lost: with none
            # left, or a cancellation asked for, it stays running for the store to end.
            "release": t.update()
            .where(*fence, c.status == RUNNING)
            .where(
                sa.or_(
                    sa.bindparam("b_refund") == 1,
                    sa.and_(c.attempts < c.max_attempts, c.cancel_requested == sa.false()),
                )
            )
            .values(status=PENDING, attempts=c.attempts - sa.bindparam("b_refund"))
            .values(**dict.fromkeys(("worker_id", "lease_expires_at", "pid", "start_date_time"))),
            # Running attempts among :ids (to end those a release left running).
            "running": sa.select(*running).where(c.status == RUNNING, ids),
            # Running attempts whose lease ended before :now, oldest first, a bounded batch.
            "expired": sa.select(*running, c.lease_expires_at)
            .where(*lease_over)
            .order_by(c.lease_expires_at)
            .limit(1000),
            # Is any lease over at :now? (A read: it takes no write lock.)
            "any_expired": sa.select(c.id).where(*lease_over).limit(1),
            # One task by :id.
            "get": sa.select(t).where(c.id == sa.bindparam("id")),
            # A task's status (to say why a cancel or retry changed nothing).
            "status_of": sa.select(c.status).where(by_id),
            # A pending task ends cancelled at once.
            "cancel_pending": t.update()
            .where(by_id, c.status == PENDING)
            .values(status=CANCELLED, end_date_time=sa.bindparam("now"), cancel_requested=True),
            # A running task is asked to stop: its worker learns it when it renews its lease.
            "ask_to_cancel": t.update()
            .where(by_id, c.status == RUNNING)
            .values(cancel_requested=True),
            # A failed or cancelled task is pending again, as if new (attempts from zero).
            "retry": t.update()
            .where(by_id, c.status.in_((TaskStatus.FAILED.value, CANCELLED)))
            .values(status=PENDING, attempts=0, run_at=sa.bindparam("now"), progress_percentage=0)
            .values(cancel_requested=False, output=None, exception=None, start_date_time=None)
            .values(end_date_time=None, worker_id=None, pid=None),
        }

    def create_engine(self, pool_size: int) -> Engine:
        log.warning("lilota is certified on SQLite and PostgreSQL; %s may work", self.name)
        return sa.create_engine(self.url, pool_pre_ping=True)

    def connect(self, read_only: bool, single: bool) -> AbstractContextManager[Connection]:
        """A pooled connection for one transaction (``single``: of one statement)."""
        return (self.single_engine if single else self.engine).connect()

    def is_locked(self, error: exc.DBAPIError) -> bool:
        return isinstance(error, exc.OperationalError) and "locked" in str(error.orig).lower()

    def is_disconnect(self, error: exc.DBAPIError) -> bool:
        return bool(error.connection_invalidated)

    def is_transient(self, error: exc.DBAPIError) -> bool:
        """Worth another try (rolled back as a whole): locked, unreachable, or dropped."""
        unreachable = isinstance(error, exc.OperationalError)
        return self.is_locked(error) or self.is_disconnect(error) or unreachable

    def listener(self) -> Listener:
        """Something an idle worker can wait on until tasks may have arrived."""
        return Listener()

    def lock_schema(self, conn: Connection) -> None:
        """Serialise concurrent first starts creating the tables (until commit)."""

    def notify(self, conn: Connection) -> None:
        """Wake idle workers, once per statement (none where they watch the database)."""

    def skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """``query``, skipping rows another transaction holds where the backend can."""
        return query

    def insert_ignoring_conflicts(self, row: dict[str, Any]) -> Any:
        """INSERT ``row`` ON CONFLICT DO NOTHING RETURNING id (unique indexes decide races)."""
        t = self.table
        return sqlite_dialect.insert(t).values(row).on_conflict_do_nothing().returning(t.c.id)

    def insert_one(self, conn: Connection, row: dict[str, Any]) -> int:
        """Insert one pending row and wake idle workers; its id."""
        new_id = conn.execute(self.sql["insert"], row).scalar_one()
        self.notify(conn)
        return int(new_id)

    def insert_many(self, conn: Connection, tasks: Sequence[NewTask], now: datetime) -> list[int]:
        """Insert pending rows in one statement; their ids in input order."""
        rows = [task.to_row(now) for task in tasks]
        return [int(r[0]) for r in conn.execute(self.sql["insert_many"], rows)]

    def claim(self, conn: Connection, params: dict[str, Any]) -> Sequence[Row[Any]]:
        """Run the claim: rows (id, name, input, attempts, max_attempts, priority, run_at)."""
        return conn.execute(self.sql["claim"], params).all()

    def finish_many(self, conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> int:
        """Record ``outcomes`` (fenced by attempt) at ``now``; how many were recorded."""
        params = [
            {
                "b_id": o.id,
                "b_attempt": o.attempt,
                "b_status": o.status,
                "b_output": o.output,
                "b_exception": o.exception,
                "b_end": None if o.status == PENDING else now,
                "b_run_at": o.run_at,
                "b_progress": _FINAL_PROGRESS.get(o.status),
                "b_cancelled": _if_cancel_requested(o),
            }
            for o in outcomes
        ]
        count = conn.execute(self.sql["finish"], params).rowcount
        return count if count is not None and count >= 0 else len(params)


class SQLiteDialect(Dialect):
    """SQLite: WAL, a busy timeout and ``BEGIN IMMEDIATE`` for every write transaction, so
    two processes never both hold a task; reads take no write lock; ``:memory:`` is one
    connection, shared under a lock."""

    retries = SQLITE_LOCKED_RETRIES
    writes_lock_database = True
    _memory_lock: threading.RLock | None = None

    def create_engine(self, pool_size: int) -> Engine:
        memory = is_memory_sqlite(self.url)
        engine = sa.create_engine(
            self.url,
            # File databases keep a small pool: opening a connection and setting its
            # pragmas costs more than most statements.
            poolclass=StaticPool if memory else None,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        self._memory_lock = threading.RLock() if memory else None

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
            read = conn.get_execution_options().get("lilota_read")
            conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

        return engine

    def connect(self, read_only: bool, single: bool) -> AbstractContextManager[Connection]:
        if self._memory_lock is not None:
            return self._locked_connection()
        conn = self.engine.connect()
        # A read begins with BEGIN, not BEGIN IMMEDIATE (see _on_begin).
        return conn.execution_options(lilota_read=True) if read_only else conn

    @contextmanager
    def _locked_connection(self) -> Iterator[Connection]:
        assert self._memory_lock is not None
        with self._memory_lock, self.engine.connect() as conn:
            yield conn

    def listener(self) -> Listener:
        memory = self._memory_lock is not None
        return Listener() if memory else SQLiteListener(self.url.database or "")


class PostgresDialect(Dialect):
    """PostgreSQL: ``FOR UPDATE SKIP LOCKED`` claims by hand, batches as one statement over
    arrays (``unnest``), a ``NOTIFY`` workers ``LISTEN`` for, single statements autocommit."""

    def __init__(self, url: URL, table: sa.Table, *, pool_size: int) -> None:
        super().__init__(url, table, pool_size=pool_size)  # autocommit: 1 round trip, not 3
        self.single_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    def catalogue(self, t: sa.Table) -> dict[str, Any]:
        notify = sa.func.pg_notify(NOTIFY_CHANNEL, "")
        return {
            **super().catalogue(t),
            # Insert one row and wake workers: RETURNING id, pg_notify(...), one statement.
            "insert": t.insert().returning(t.c.id, notify.label("notified")),
            # Wake idle workers (they LISTEN on the channel).
            "notify": sa.select(notify),
            # Serialise concurrent first starts; released at commit.
            "lock_schema": sa.select(sa.func.pg_advisory_xact_lock(0x6C696C6F7461)),
            # Insert a batch as one INSERT ... SELECT FROM unnest(one array per column), in
            # input order (ORDER BY the ordinality): four to five times the rows per second
            # of multi-row VALUES batches.
            "insert_many": sa.text(f"""
                INSERT INTO lilota_task (name, status, input, run_at, priority, max_attempts,
                    description, unique_key, schedule_key, created_at, attempts,
                    progress_percentage, cancel_requested)
                SELECT n.name, '{PENDING}', n.input, n.run_at, n.priority, n.max_attempts,
                    n.description, n.unique_key, n.schedule_key, CAST(:now AS timestamp), 0, 0, false
                FROM unnest(CAST(:names AS varchar[]), CAST(:inputs AS text[]),
                    CAST(:run_ats AS timestamp[]), CAST(:priorities AS integer[]),
                    CAST(:max_attempts AS integer[]), CAST(:descriptions AS text[]),
                    CAST(:unique_keys AS varchar[]), CAST(:schedule_keys AS varchar[])
                ) WITH ORDINALITY AS n(name, input, run_at, priority, max_attempts, description,
                    unique_key, schedule_key, position)
                ORDER BY n.position RETURNING id"""),
            # The claim by hand: names as one array parameter, so the text never changes and
            # psycopg prepares it once per connection; ids by = ANY(ARRAY(...)), which reads
            # the locked rows back by primary key; max_attempts raised to the worker's floor.
            "claim": sa.text(f"""
                UPDATE lilota_task SET status = '{RUNNING}', attempts = attempts + 1,
                    worker_id = :b_worker_id, pid = :b_pid, start_date_time = :now,
                    lease_expires_at = :b_lease_until, progress_percentage = 0,
                    end_date_time = NULL, max_attempts = GREATEST(max_attempts,
                    (CAST(:floors AS integer[]))[array_position(CAST(:names AS varchar[]), name)])
                WHERE id = ANY(ARRAY(
                    SELECT id FROM lilota_task
                    WHERE status = '{PENDING}' AND run_at <= :now
                        AND name = ANY(CAST(:names AS varchar[]))
                    ORDER BY priority DESC, run_at, id LIMIT :limit FOR UPDATE SKIP LOCKED))
                RETURNING id, name, input, attempts, max_attempts, priority, run_at"""),
            # Finish a batch of outcomes in one statement, a join with one array per column
            # (fenced by attempt): about a third of the server time of one UPDATE each;
            # a task asked to cancel ends cancelled however it ended, as in "finish".
            "finish_many": sa.text(f"""
                UPDATE lilota_task AS t SET status = CASE WHEN t.cancel_requested
                    AND o.cancelled IS NOT NULL THEN '{CANCELLED}' ELSE o.status END,
                    exception = CASE WHEN t.cancel_requested AND o.cancelled IS NOT NULL
                        THEN o.cancelled ELSE o.exception END, output = o.output,
                    end_date_time = CASE WHEN o.status = '{PENDING}'
                        THEN NULL ELSE CAST(:now AS timestamp) END,
                    run_at = coalesce(o.run_at, t.run_at),
                    progress_percentage = CASE WHEN t.cancel_requested THEN t.progress_percentage
                        WHEN o.status = '{TaskStatus.COMPLETED.value}' THEN 100
                        WHEN o.status = '{PENDING}' THEN 0 ELSE t.progress_percentage END,
                    lease_expires_at = NULL,
                    worker_id = CASE WHEN o.status = '{PENDING}' THEN NULL ELSE t.worker_id END
                FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS integer[]),
                    CAST(:statuses AS varchar[]), CAST(:outputs AS text[]),
                    CAST(:exceptions AS text[]), CAST(:run_ats AS timestamp[]),
                    CAST(:cancelled AS text[])
                ) AS o(id, attempt, status, output, exception, run_at, cancelled)
                WHERE t.id = o.id AND t.attempts = o.attempt
                    AND t.status IN ('{PENDING}', '{RUNNING}')"""),
        }

    def create_engine(self, pool_size: int) -> Engine:
        return sa.create_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=10,
            # Server-side idle timeouts and failovers close connections; recycling bounds
            # how stale a pooled one can be. Disconnects that still happen are retried by
            # the store's transactions, which is cheaper than a ping before every checkout.
            pool_recycle=1800,
            connect_args=postgres_connect_args(self.url),
        )

    def listener(self) -> Listener:
        url = self.url.set(drivername="postgresql")
        return PostgresListener(
            url.render_as_string(hide_password=False),
            self.url.render_as_string(hide_password=True),
            postgres_connect_args(url),
        )

    def lock_schema(self, conn: Connection) -> None:
        conn.execute(self.sql["lock_schema"])

    def notify(self, conn: Connection) -> None:
        conn.execute(self.sql["notify"])

    def skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=True)

    def insert_ignoring_conflicts(self, row: dict[str, Any]) -> Any:
        t = self.table
        return pg_dialect.insert(t).values(row).on_conflict_do_nothing().returning(t.c.id)

    def insert_one(self, conn: Connection, row: dict[str, Any]) -> int:
        # Run in autocommit by the store: scheduling a task costs one round trip, not four.
        inserted = conn.execute(self.sql["insert"], row).first()
        assert inserted is not None
        return int(inserted[0])

    def insert_many(self, conn: Connection, tasks: Sequence[NewTask], now: datetime) -> list[int]:
        # Ids are drawn from the sequence as rows are inserted in input order: sorting the
        # returned ids restores that order.
        params = {
            "now": now,
            "names": [t.name for t in tasks],
            "inputs": [t.input for t in tasks],
            "run_ats": [to_naive_utc(t.run_at) if t.run_at else now for t in tasks],
            "priorities": [t.priority for t in tasks],
            "max_attempts": [t.max_attempts for t in tasks],
            "descriptions": [t.description for t in tasks],
            "unique_keys": [t.unique_key for t in tasks],
            "schedule_keys": [t.schedule_key for t in tasks],
        }
        return sorted(int(r[0]) for r in conn.execute(self.sql["insert_many"], params))

    def finish_many(self, conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> int:
        params = {
            "now": now,
            "ids": [o.id for o in outcomes],
            "attempts": [o.attempt for o in outcomes],
            "statuses": [o.status for o in outcomes],
            "outputs": [o.output for o in outcomes],
            "exceptions": [o.exception for o in outcomes],
            "run_ats": [o.run_at for o in outcomes],
            "cancelled": [_if_cancel_requested(o) for o in outcomes],
        }
        return int(conn.execute(self.sql["finish_many"], params).rowcount)


class Transactional(Protocol):
    """What :func:`transaction` needs of the object whose methods it decorates."""

    dialect: Dialect

    def ensure_schema(self) -> None: ...


S = TypeVar("S", bound=Transactional)


def transaction(
    *, read_only: bool = False, single: bool = False, schema: bool = False
) -> Callable[[Callable[Concatenate[S, Connection, P], R]], Callable[Concatenate[S, P], R]]:
    """Run the decorated method in one transaction, on a connection passed after ``self``.

    A transient error (:meth:`Dialect.is_transient`) rolls it back and runs it again a few
    times, waiting 0.05, 0.1, 0.2... s: the method must be safe to repeat. Driver errors
    that remain become :class:`DatabaseUnavailable` or :class:`DatabaseError`. ``read_only``
    takes no write lock (SQLite: BEGIN, not BEGIN IMMEDIATE); ``single`` is for one
    statement, autocommit where the dialect can (PostgreSQL: one round trip); ``schema``
    ensures the tables first."""

    def decorate(
        method: Callable[Concatenate[S, Connection, P], R],
    ) -> Callable[Concatenate[S, P], R]:
        @functools.wraps(method)
        def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            if schema:
                self.ensure_schema()
            dialect = self.dialect
            for attempt in range(1, dialect.retries + 1):
                try:
                    with dialect.connect(read_only, single) as conn, conn.begin():
                        return method(self, conn, *args, **kwargs)
                except exc.DBAPIError as e:
                    if attempt < dialect.retries and dialect.is_transient(e):
                        time.sleep(0.05 * 2 ** (attempt - 1))
                        continue
                    if isinstance(e, (exc.OperationalError, exc.InterfaceError)):
                        where = dialect.url.render_as_string(hide_password=True)
                        raise DatabaseUnavailable(
                            f"the database at {where} cannot be reached: {e.orig}"
                        ) from e
                    raise DatabaseError(f"the database refused a statement: {e.orig}") from e
                except exc.SQLAlchemyError as e:
                    raise DatabaseError(f"database error: {e}") from e
            raise AssertionError("unreachable")

        return run

    return decorate


def dialect_for(url: URL, table: sa.Table, *, pool_size: int) -> Dialect:
    """The dialect of ``url``'s backend, its engine set up."""
    kinds: dict[str, type[Dialect]] = {"sqlite": SQLiteDialect, "postgresql": PostgresDialect}
    return kinds.get(url.get_backend_name(), Dialect)(url, table, pool_size=pool_size)
