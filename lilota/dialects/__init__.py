"""What differs between SQLite and PostgreSQL: one small class per backend.

:mod:`lilota.store` writes the task protocol once and holds one :class:`Dialect`, chosen
from the URL, which owns the engine set-up, the catalogue of named statements (shared
ones in the base, the portable way; per backend: claim, finish-many, insert-many/one),
``SKIP LOCKED``, the wake-up and the listener (:mod:`lilota.listeners`), autocommit of
single statements, and which driver errors are worth another try (:func:`transaction`).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.engine.url import URL

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

from lilota.dialects.aio import FINISHED_CHANNEL, FinishWatch, async_engine
from lilota.dialects.sqlitefile import FileWatch, open_read_only, permanent_error, sqlite_engine
from lilota.dialects.urls import is_memory_sqlite, lilota_options, postgres_connect_args
from lilota.errors import DatabaseError
from lilota.execution import cancelled_record
from lilota.listeners import NOTIFY_CHANNEL, Listener, PostgresListener, SQLiteListener
from lilota.models import NewTask, Outcome, TaskStatus, to_naive_utc

log = logging.getLogger(__name__)

PENDING = TaskStatus.PENDING.value
RUNNING = TaskStatus.RUNNING.value
CANCELLED = TaskStatus.CANCELLED.value
# An outcome's progress: 100 if completed, 0 if pending again, else (or if asked to cancel) kept.
_FINAL_PROGRESS = {TaskStatus.COMPLETED.value: 100, PENDING: 0}


# An attempt that returned or raised ends cancelled if a cancellation was requested (the
# worker may not have seen it), with :func:`cancelled_record` as its exception.
_ENDED = (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value)
# What a claim returns of each task it claims.
CLAIMED = (
    "id",
    "name",
    "input",
    "attempts",
    "fence",
    "recoveries",
    "max_attempts",
    "priority",
    "run_at",
    "trace_context",
)


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
    # Whether this process may only read the database (a SQLite file it cannot write).
    read_only: bool = False

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
        # Every write after a claim names the claim's fence, which only ever goes up.
        fence = (c.id == sa.bindparam("b_id"), c.fence == sa.bindparam("b_fence"))
        by_id = c.id == sa.bindparam("b_id")
        names = c.name.in_(sa.bindparam("names", expanding=True))
        due = (c.status == PENDING, c.run_at <= sa.bindparam("now"), names)
        running = [c.id, c.fence, c.attempts, c.recoveries, c.max_recoveries]
        running += [c.worker_id, c.cancel_requested]
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
            # The first :limit runnable tasks of :names become running: attempt + 1, a new
            # fence, leased.
            "claim": t.update()
            .where(c.id.in_(runnable.scalar_subquery()))
            .values(
                status=RUNNING,
                attempts=c.attempts + 1,
                fence=c.fence + 1,
                worker_id=sa.bindparam("b_worker_id"),
                pid=sa.bindparam("b_pid"),
                start_date_time=sa.bindparam("now"),
                lease_expires_at=sa.bindparam("b_lease_until"),
                progress_percentage=0,
                end_date_time=None,
            )
            .returning(*(c[name] for name in CLAIMED)),
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
            # Which of :ids were asked to cancel.
            "asked": sa.select(c.id).where(ids, c.cancel_requested == sa.true()),
            # Retries of :ids whose cancellation was requested end cancelled instead.
            "cancel_retries": t.update()
            .where(ids, c.status == PENDING, c.cancel_requested == sa.true())
            .values(status=CANCELLED, end_date_time=sa.bindparam("now")),
            # A recovered task's attempt (its worker was lost) does not count; the recovery
            # does (fenced: the claim that was lost).
            "count_recovery": t.update()
            .where(*fence, c.status == PENDING)
            .values(attempts=c.attempts - 1, recoveries=c.recoveries + 1),
            # Record the progress of a running attempt (fenced).
            "progress": t.update()
            .where(*fence, c.status == RUNNING)
            .values(progress_percentage=sa.bindparam("b_progress")),
            # Extend the leases a worker holds; RETURNING ids and who was asked to cancel.
            "renew": t.update()
            .where(c.worker_id == sa.bindparam("b_worker_id"), c.status == RUNNING)
            .values(lease_expires_at=sa.bindparam("b_lease_until"))
            .returning(c.id, c.cancel_requested),
            # Give a running attempt back to pending (fenced); its attempt does not count. If
            # it started (:b_refund 0) it counts as a recovery, as if its worker was lost: with
            # left, or a cancellation asked for, it stays running for the store to end.
            "release": t.update()
            .where(*fence, c.status == RUNNING)
            .where(
                sa.or_(
                    sa.bindparam("b_refund") == 1,
                    sa.and_(c.recoveries < c.max_recoveries, c.cancel_requested == sa.false()),
                )
            )
            .values(status=PENDING, attempts=c.attempts - 1, progress_percentage=0)
            .values(recoveries=c.recoveries + 1 - sa.bindparam("b_refund"))
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
            # A failed or cancelled task is pending again, as if new (attempts and recoveries
            # from zero; the fence goes on from where it is).
            "retry": t.update()
            .where(by_id, c.status.in_((TaskStatus.FAILED.value, CANCELLED)))
            .values(status=PENDING, attempts=0, recoveries=0, run_at=sa.bindparam("now"))
            .values(progress_percentage=0)
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

    def permanent_error(self, error: exc.DBAPIError) -> DatabaseError | None:
        """The error to raise at once, unretried, for a driver error no retry can cure."""
        return None

    def check_file(self) -> None:
        """Raise :class:`~lilota.errors.DatabaseReplaced` if the database this process
        opened is no longer where the URL points (SQLite files only)."""

    def is_transient(self, error: exc.DBAPIError) -> bool:
        """Worth another try (rolled back as a whole): locked, unreachable, or dropped."""
        unreachable = isinstance(error, exc.OperationalError)
        return self.is_locked(error) or self.is_disconnect(error) or unreachable

    def listener(self) -> Listener:
        """Something an idle worker can wait on until tasks may have arrived."""
        return Listener()

    def create_async_engine(self) -> AsyncEngine | None:
        """An engine for asyncio callers (a driver of its own, no thread per call); None
        where the backend has none (they run the store's calls in a thread)."""
        return None

    def lock_schema(self, conn: Connection) -> None:
        """Serialise concurrent first starts creating the tables (until commit)."""

    def notify(self, conn: Connection) -> None:
        """Wake idle workers, once per statement (none where they watch the database)."""

    def notify_finished(self, conn: Connection) -> None:
        """Tell asyncio callers waiting for tasks that attempts ended (at commit)."""

    def finish_watch(self) -> FinishWatch | None:
        """What ``await_task`` waits on between two reads; None: it reads at intervals."""
        return None

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
        """Run the claim: rows of :data:`CLAIMED`."""
        return conn.execute(self.sql["claim"], params).all()

    def finish_many(self, conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> int:
        """Record ``outcomes`` (fenced) at ``now``; how many were recorded. Those
        of tasks asked to cancel are read first (SQLite's writers are serialised, so the
        update sees the same requests); only they carry a cancelled record."""
        ended = [o.id for o in outcomes if o.status in _ENDED]
        asked = {r[0] for r in conn.execute(self.sql["asked"], {"ids": ended})} if ended else ()
        params = [
            {
                "b_id": o.id,
                "b_fence": o.fence,
                "b_status": o.status,
                "b_output": o.output,
                "b_exception": o.exception,
                "b_end": None if o.status == PENDING else now,
                "b_run_at": o.run_at,
                "b_progress": _FINAL_PROGRESS.get(o.status),
                "b_cancelled": cancelled_record(o)
                if o.id in asked and o.status in _ENDED
                else None,
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
    _watch: FileWatch | None = None

    def create_engine(self, pool_size: int) -> Engine:
        memory, path = is_memory_sqlite(self.url), self.url.database or ""
        self.read_only = not memory and open_read_only(path)
        self._watch = None if memory else FileWatch(path)  # None: one connection, shared
        self._memory_lock = threading.RLock() if memory else None
        return sqlite_engine(self.url, SQLITE_BUSY_TIMEOUT_MS, self.read_only, self._watch)

    def permanent_error(self, error: exc.DBAPIError) -> DatabaseError | None:
        return permanent_error(error, self.url.database or "")

    def check_file(self) -> None:
        if self._watch is not None:
            self._watch.check()

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

    # Behind a transaction pooler with no direct connection, idle workers hear no NOTIFY
    # and look for new tasks this often instead.
    POOLED_POLL = 1.0

    def __init__(self, url: URL, table: sa.Table, *, pool_size: int) -> None:
        # lilota_pooler / lilota_direct (dialects.urls) are lilota's, not the driver's.
        self.server_url, self.pooler, self.direct_url = lilota_options(url)
        super().__init__(url, table, pool_size=pool_size)  # autocommit: 1 round trip, not 3
        self.single_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    def connect_args(self, url: URL) -> dict[str, Any]:
        args = postgres_connect_args(url)
        if self.pooler is not None:
            # A pooler refuses startup options it does not know (PgBouncer: "unsupported
            # startup parameter"), unless the URL gives them itself.
            args.pop("options", None)
        if self.pooler == "transaction":
            # The next statement may run on another server connection: psycopg must not
            # prepare statements on the server (PgBouncer < 1.21 cannot follow them).
            args["prepare_threshold"] = None
        return args

    def catalogue(self, t: sa.Table) -> dict[str, Any]:
        notify = sa.func.pg_notify(NOTIFY_CHANNEL, "")
        return {
            **super().catalogue(t),
            # Insert one row and wake workers: RETURNING id, pg_notify(...), one statement.
            "insert": t.insert().returning(t.c.id, notify.label("notified")),
            # Wake idle workers (they LISTEN on the channel).
            "notify": sa.select(notify),
            # Wake await_task() callers: attempts ended (dialects.aio).
            "notify_finished": sa.select(sa.func.pg_notify(FINISHED_CHANNEL, "")),
            # Serialise concurrent first starts; released at commit.
            "lock_schema": sa.select(sa.func.pg_advisory_xact_lock(0x6C696C6F7461)),
            # Insert a batch as one INSERT ... SELECT FROM unnest(one array per column), in
            # input order (ORDER BY the ordinality): four to five times the rows per second
            # of multi-row VALUES batches.
            "insert_many": sa.text(f"""
                INSERT INTO lilota_task (name, status, input, run_at, priority, max_attempts,
                    description, unique_key, schedule_key, created_at, attempts,
                    progress_percentage, cancel_requested, max_recoveries, trace_context)
                SELECT n.name, '{PENDING}', n.input, n.run_at, n.priority, n.max_attempts,
                    n.description, n.unique_key, n.schedule_key, CAST(:now AS timestamp), 0, 0,
                    false, n.max_recoveries, n.trace_context
                FROM unnest(CAST(:names AS varchar[]), CAST(:inputs AS text[]),
                    CAST(:run_ats AS timestamp[]), CAST(:priorities AS integer[]),
                    CAST(:max_attempts AS integer[]), CAST(:descriptions AS text[]),
                    CAST(:unique_keys AS varchar[]), CAST(:schedule_keys AS varchar[]),
                    CAST(:max_recoveries AS integer[]), CAST(:trace_contexts AS text[])
                ) WITH ORDINALITY AS n(name, input, run_at, priority, max_attempts, description,
                    unique_key, schedule_key, max_recoveries, trace_context, position)
                ORDER BY n.position RETURNING id"""),
            # The claim by hand: names as one array parameter, so the text never changes and
            # psycopg prepares it once per connection; ids by = ANY(ARRAY(...)), which reads
            # the locked rows back by primary key; max_attempts raised to the worker's floor.
            "claim": sa.text(f"""
                UPDATE lilota_task SET status = '{RUNNING}', attempts = attempts + 1,
                    fence = fence + 1,
                    worker_id = :b_worker_id, pid = :b_pid, start_date_time = :now,
                    lease_expires_at = :b_lease_until, progress_percentage = 0,
                    end_date_time = NULL, max_attempts = GREATEST(max_attempts,
                    (CAST(:floors AS integer[]))[array_position(CAST(:names AS varchar[]), name)])
                WHERE id = ANY(ARRAY(
                    SELECT id FROM lilota_task
                    WHERE status = '{PENDING}' AND run_at <= :now
                        AND name = ANY(CAST(:names AS varchar[]))
                    ORDER BY priority DESC, run_at, id LIMIT :limit FOR UPDATE SKIP LOCKED))
                RETURNING {", ".join(CLAIMED)}"""),
            # Finish a batch of outcomes in one statement, a join with one array per column
            # (fenced): about a third of the server time of one UPDATE each. A
            # task asked to cancel ends cancelled however it ended; RETURNING says which.
            "finish_many": sa.text(f"""
                UPDATE lilota_task AS t SET status = CASE WHEN t.cancel_requested
                    AND o.status IN {_ENDED} THEN '{CANCELLED}' ELSE o.status END,
                    exception = o.exception, output = o.output,
                    end_date_time = CASE WHEN o.status = '{PENDING}'
                        THEN NULL ELSE CAST(:now AS timestamp) END,
                    run_at = coalesce(o.run_at, t.run_at),
                    progress_percentage = CASE WHEN t.cancel_requested THEN t.progress_percentage
                        WHEN o.status = '{TaskStatus.COMPLETED.value}' THEN 100
                        WHEN o.status = '{PENDING}' THEN 0 ELSE t.progress_percentage END,
                    lease_expires_at = NULL,
                    worker_id = CASE WHEN o.status = '{PENDING}' THEN NULL ELSE t.worker_id END
                FROM unnest(CAST(:ids AS bigint[]), CAST(:fences AS bigint[]),
                    CAST(:statuses AS varchar[]), CAST(:outputs AS text[]),
                    CAST(:exceptions AS text[]), CAST(:run_ats AS timestamp[])
                ) AS o(id, fence, status, output, exception, run_at)
                WHERE t.id = o.id AND t.fence = o.fence
                    AND t.status IN ('{PENDING}', '{RUNNING}')
                RETURNING t.id, t.status = '{CANCELLED}' AND o.status <> '{CANCELLED}'"""),
            # The record of an attempt that ended cancelled because it was asked to.
            "cancelled_record": sa.text("""UPDATE lilota_task SET exception = :b_exception
                WHERE id = :b_id AND fence = :b_fence"""),
        }

    def create_engine(self, pool_size: int) -> Engine:
        return sa.create_engine(
            self.server_url,
            pool_size=pool_size,
            max_overflow=10,
            # Server-side idle timeouts and failovers close connections; recycling bounds
            # how stale a pooled one can be. Disconnects that still happen are retried by
            # the store's transactions, which is cheaper than a ping before every checkout.
            pool_recycle=1800,
            connect_args=self.connect_args(self.server_url),
        )

    def listener(self) -> Listener:
        """LISTEN on the server (through ``lilota_direct`` when given); behind a
        transaction pooler without one, poll every :attr:`POOLED_POLL` seconds (a LISTEN
        there would be on whichever server connection the pooler lent)."""
        if self.pooler == "transaction" and self.direct_url is None:
            return Listener(poll=self.POOLED_POLL)
        server = self.direct_url or self.server_url
        url = server.set(drivername="postgresql")
        return PostgresListener(
            url.render_as_string(hide_password=False),
            server.render_as_string(hide_password=True),
            postgres_connect_args(url),
        )

    def create_async_engine(self) -> AsyncEngine | None:
        return async_engine(self.server_url, self.connect_args(self.server_url))

    def lock_schema(self, conn: Connection) -> None:
        conn.execute(self.sql["lock_schema"])

    def notify(self, conn: Connection) -> None:
        conn.execute(self.sql["notify"])

    def notify_finished(self, conn: Connection) -> None:
        conn.execute(self.sql["notify_finished"])

    def finish_watch(self) -> FinishWatch | None:
        # As listener(): not through a transaction pooler (LISTEN needs its own session).
        if self.pooler == "transaction" and self.direct_url is None:
            return None
        url = (self.direct_url or self.server_url).set(drivername="postgresql")
        return FinishWatch(url.render_as_string(hide_password=False), postgres_connect_args(url))

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
            "max_recoveries": [t.max_recoveries for t in tasks],
            "trace_contexts": [t.trace_context for t in tasks],
        }
        return sorted(int(r[0]) for r in conn.execute(self.sql["insert_many"], params))

    def finish_many(self, conn: Connection, outcomes: Sequence[Outcome], now: datetime) -> int:
        params = {
            "now": now,
            "ids": [o.id for o in outcomes],
            "fences": [o.fence for o in outcomes],
            "statuses": [o.status for o in outcomes],
            "outputs": [o.output for o in outcomes],
            "exceptions": [o.exception for o in outcomes],
            "run_ats": [o.run_at for o in outcomes],
        }
        rows = conn.execute(self.sql["finish_many"], params).all()
        if turned := {task_id for task_id, cancelled in rows if cancelled}:  # rare
            records = [
                {"b_id": o.id, "b_fence": o.fence, "b_exception": cancelled_record(o)}
                for o in outcomes
                if o.id in turned
            ]
            conn.execute(self.sql["cancelled_record"], records)
        return len(rows)


def dialect_for(url: URL, table: sa.Table, *, pool_size: int) -> Dialect:
    """The dialect of ``url``'s backend, its engine set up."""
    kinds: dict[str, type[Dialect]] = {"sqlite": SQLiteDialect, "postgresql": PostgresDialect}
    return kinds.get(url.get_backend_name(), Dialect)(url, table, pool_size=pool_size)
