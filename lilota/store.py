"""The task table: its schema, the write protocol every worker follows, and the read side.

Only this module and :mod:`lilota.dialects` import SQLAlchemy. The store speaks SQLAlchemy
Core (no ORM) and writes every step of a task's life once, for every backend; it holds a
:class:`~lilota.dialects.Dialect` (chosen from the URL) and asks it for what SQLite and
PostgreSQL do differently: engine set-up, the claim, batches, wake-ups and listeners.

Every write after a claim is fenced: it names the attempt number it belongs to in its
WHERE clause, so a worker whose lease expired and whose task was claimed again can never
overwrite the newer attempt. Every transaction runs through :func:`transaction`, which
retries lock and disconnect errors and turns driver errors into lilota errors. Times are
stored as naive UTC.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Row, make_url
from sqlalchemy.engine.url import URL

from lilota import serialization
from lilota.dialects import (
    Dialect,
    Listener,
    dialect_for,
    is_memory_sqlite,
    postgres_connect_args,
    task_row,
    to_naive_utc,
)
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

PENDING = TaskStatus.PENDING.value
RUNNING = TaskStatus.RUNNING.value
COMPLETED = TaskStatus.COMPLETED.value
FAILED = TaskStatus.FAILED.value
CANCELLED = TaskStatus.CANCELLED.value
FINAL = tuple(s.value for s in FINAL_STATUSES)
ACTIVE = (PENDING, RUNNING)

# Reads by id go in chunks of this many ids: far below every backend's limit on bound
# parameters (SQLite's is 32766, older ones 999), and large enough to be one round trip
# for any batch a worker or the dashboard asks about.
ID_CHUNK = 500

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


class SQL:
    """The statements every backend runs alike, by name (the ones that differ, with the
    portable claim, finish and inserts, are in :mod:`lilota.dialects`)."""

    # Is a pending task of :names due at :now? (A read: it takes no write lock.)
    has_runnable = (
        sa.select(_t.id)
        .where(_t.status == PENDING, _t.run_at <= sa.bindparam("now"))
        .where(_t.name.in_(sa.bindparam("names", expanding=True)))
        .limit(1)
    )
    # The earliest run_at of a pending task of :names.
    next_run_at = (
        sa.select(sa.func.min(_t.run_at))
        .where(_t.status == PENDING)
        .where(_t.name.in_(sa.bindparam("names", expanding=True)))
    )
    # Record the progress of a running attempt (fenced by attempt).
    progress = (
        task_table.update()
        .where(_t.id == sa.bindparam("b_id"), _t.attempts == sa.bindparam("b_attempt"))
        .where(_t.status == RUNNING)
        .values(progress_percentage=sa.bindparam("b_progress"))
    )
    # Extend the leases a worker holds; RETURNING each id and whether it was asked to cancel.
    renew = (
        task_table.update()
        .where(_t.worker_id == sa.bindparam("b_worker_id"), _t.status == RUNNING)
        .values(lease_expires_at=sa.bindparam("b_lease_until"))
        .returning(_t.id, _t.cancel_requested)
    )
    # Give a running attempt back to pending (fenced), refunding its attempt or not.
    release = (
        task_table.update()
        .where(_t.id == sa.bindparam("b_id"), _t.attempts == sa.bindparam("b_attempt"))
        .where(_t.status == RUNNING)
        # A started attempt that is given back counts, as if its worker was lost: with
        # none left, or a cancellation asked for, _end_interrupted ends it.
        .where(
            sa.or_(
                sa.bindparam("b_refund") == 1,
                sa.and_(_t.attempts < _t.max_attempts, _t.cancel_requested == sa.false()),
            )
        )
        .values(
            status=PENDING,
            attempts=_t.attempts - sa.bindparam("b_refund"),
            worker_id=None,
            lease_expires_at=None,
            pid=None,
            start_date_time=None,
        )
    )
    # Raise a held task's attempt limit to :b_max (fenced by attempt).
    raise_max_attempts = (
        task_table.update()
        .where(_t.id == sa.bindparam("b_id"), _t.attempts == sa.bindparam("b_attempt"))
        .values(max_attempts=sa.bindparam("b_max"))
    )
    # One task by :id.
    get = sa.select(task_table).where(_t.id == sa.bindparam("id"))
    # Running attempts whose lease ended before :now, oldest first, a bounded batch.
    expired = (
        sa.select(
            _t.id,
            _t.attempts,
            _t.max_attempts,
            _t.worker_id,
            _t.lease_expires_at,
            _t.cancel_requested,
        )
        .where(_t.status == RUNNING, _t.lease_expires_at < sa.bindparam("now"))
        .order_by(_t.lease_expires_at)
        .limit(1000)
    )
    # A task's status by id (to say why a cancel or retry changed nothing).
    status_of = sa.select(_t.status).where(_t.id == sa.bindparam("b_id"))
    # A pending task ends cancelled at once.
    cancel_pending = (
        task_table.update()
        .where(_t.id == sa.bindparam("b_id"), _t.status == PENDING)
        .values(status=CANCELLED, end_date_time=sa.bindparam("now"), cancel_requested=True)
    )
    # A running task is asked to stop: its worker sees it when it renews its lease.
    ask_to_cancel = (
        task_table.update()
        .where(_t.id == sa.bindparam("b_id"), _t.status == RUNNING)
        .values(cancel_requested=True)
    )
    # A failed or cancelled task is pending again, as if new (same id, attempts from zero).
    retry = (
        task_table.update()
        .where(_t.id == sa.bindparam("b_id"), _t.status.in_((FAILED, CANCELLED)))
        .values(
            status=PENDING,
            attempts=0,
            run_at=sa.bindparam("now"),
            output=None,
            exception=None,
            progress_percentage=0,
            start_date_time=None,
            end_date_time=None,
            cancel_requested=False,
            worker_id=None,
            pid=None,
        )
    )


def utcnow() -> datetime:
    """Naive UTC now: the store's clock unless another one is injected."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


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


_stores: weakref.WeakSet[TaskStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A process forked from this one (gunicorn --preload, multiprocessing) must not share
    # pooled connections with its parent: drop them without closing the parent's sockets.
    for store in list(_stores):
        store.engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)

P = ParamSpec("P")
R = TypeVar("R")


def transaction(
    *, read_only: bool = False, single: bool = False
) -> Callable[
    [Callable[Concatenate[TaskStore, Connection, P], R]], Callable[Concatenate[TaskStore, P], R]
]:
    """Run the decorated method in one transaction, on a connection passed after ``self``.

    The method must be safe to repeat: lock and disconnect errors roll it back as a whole
    and run it again a few times (waiting 0.05, 0.1, 0.2... s). Driver errors that remain
    become :class:`DatabaseUnavailable` or :class:`DatabaseError`. ``read_only`` takes no
    write lock (SQLite: BEGIN, not BEGIN IMMEDIATE). ``single`` is for a method that runs
    one statement, which is a transaction by itself where the dialect can (PostgreSQL:
    autocommit, one round trip instead of BEGIN, statement, COMMIT).
    """

    def decorate(
        method: Callable[Concatenate[TaskStore, Connection, P], R],
    ) -> Callable[Concatenate[TaskStore, P], R]:
        @functools.wraps(method)
        def run(self: TaskStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
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
                        raise DatabaseUnavailable(
                            f"the database at {self.safe_url} cannot be reached: {e.orig}"
                        ) from e
                    raise DatabaseError(f"the database refused a statement: {e.orig}") from e
                except exc.SQLAlchemyError as e:
                    raise DatabaseError(f"database error: {e}") from e
            raise AssertionError("unreachable")

        return run

    return decorate


def _interrupted(row: Any, message: str, retry_at: datetime | None) -> Outcome:
    """The end of an attempt whose worker is gone (``message`` says how): cancelled if
    someone asked, else pending again at ``retry_at``, else failed with ``WorkerLost``."""
    kind, status = "WorkerLost", PENDING if retry_at else FAILED
    if row.cancel_requested:
        kind, status, retry_at = "TaskCancelled", CANCELLED, None
        message = f"task {row.id} was cancelled; {message}"
    error = {"type": f"lilota.errors.{kind}", "message": message, "traceback": ""}
    return Outcome(
        id=row.id, attempt=row.attempts, status=status, exception=json.dumps(error), run_at=retry_at
    )


class TaskStore:
    """The task table and everything done to it. Thread-safe; one per process is enough.

    ``clock`` returns naive UTC datetimes; tests inject one to move time without sleeping.
    ``dialect`` is what this database's backend does its own way (``str()`` is its name).
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
        self.dialect: Dialect = dialect_for(self.url, task_table, pool_size=pool_size)
        self.engine = self.dialect.engine
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        _stores.add(self)
        # A store dropped without dispose() closes its pooled connections.
        weakref.finalize(self, self.engine.dispose)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect.name == "sqlite"

    @property
    def is_postgres(self) -> bool:
        return self.dialect.name == "postgresql"

    @property
    def safe_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def listener(self) -> Listener:
        """Something an idle worker can wait on until tasks may have arrived."""
        return self.dialect.listener()

    @transaction()
    def _run(self, conn: Connection, fn: Callable[[Connection], R]) -> R:
        """Run ``fn(conn)`` as one transaction (for tests and one-off maintenance)."""
        return fn(conn)

    @transaction(read_only=True)
    def _all(self, conn: Connection, query: Any, params: Any = None) -> Sequence[Any]:
        """The rows of one read."""
        return conn.execute(query, params).all()

    @transaction()
    def _write(self, conn: Connection, statement: Any, params: Any = None) -> int:
        """Run one write statement (or an executemany); how many rows it changed."""
        return int(conn.execute(statement, params).rowcount)

    # ------------------------------------------------------------------ schema

    def ensure_schema(self) -> None:
        """Create or check lilota's tables. Idempotent, and safe when processes race.

        Raises :class:`SchemaVersionError` if the database was set up by a newer lilota.
        """
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            self._ensure_schema()
            self._schema_ready = True

    @transaction()
    def _ensure_schema(self, conn: Connection) -> None:
        self.dialect.lock_schema(conn)
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

    @transaction(read_only=True)
    def schema_version(self, conn: Connection) -> int | None:
        """The schema version recorded in the database, or None if there are no tables."""
        if not sa.inspect(conn).has_table("lilota_schema"):
            return None
        version = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar()
        return None if version is None else int(version)

    # ------------------------------------------------------------------ scheduling

    def add(self, task: NewTask) -> int:
        """Insert one pending task and wake idle workers; returns its id.

        With a ``unique_key`` that a pending or running task already has, nothing is
        inserted and that task's id is returned. With a ``schedule_key`` that exists
        (that periodic tick was created already), nothing is inserted and -1 returned.
        """
        self.ensure_schema()
        if task.unique_key is None and task.schedule_key is None:
            return self._add_one(task)
        for _ in range(5):
            found = self._add_deduplicated(task)
            if found is not None:
                return found
        raise DatabaseError(
            f"could not schedule {task.name!r} with unique_key {task.unique_key!r}: "
            "the task holding the key kept changing"
        )

    @transaction(single=True)
    def _add_one(self, conn: Connection, task: NewTask) -> int:
        return self.dialect.insert_one(conn, task_row(task, self.clock()))

    @transaction()
    def _add_deduplicated(self, conn: Connection, task: NewTask) -> int | None:
        """Insert unless a unique or schedule key is taken; None if that changed meanwhile."""
        inserted = conn.execute(
            self.dialect.insert_ignoring_conflicts(task_row(task, self.clock()))
        ).first()
        if inserted is not None:
            self.dialect.notify(conn)
            return int(inserted[0])
        # The key is taken: the loser of a race reads the winner's row.
        if (
            task.schedule_key is not None
            and conn.execute(sa.select(_t.id).where(_t.schedule_key == task.schedule_key)).first()
        ):
            return -1
        existing = conn.execute(
            sa.select(_t.id).where(_t.unique_key == task.unique_key, _t.status.in_(ACTIVE))
        ).first()
        return None if existing is None else int(existing[0])

    def add_many(self, tasks: Sequence[NewTask]) -> list[int]:
        """Insert many pending tasks in one statement and one transaction; returns ids."""
        if not tasks:
            return []
        self.ensure_schema()
        return self._add_many(tasks)

    @transaction()
    def _add_many(self, conn: Connection, tasks: Sequence[NewTask]) -> list[int]:
        ids = self.dialect.insert_many(conn, tasks, self.clock())
        self.dialect.notify(conn)
        return ids

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
        wanted = (worker_id, sorted(names), limit, lease, dict(max_attempts or {}))
        if finished:
            return self._finish_and_claim(finished, *wanted)
        if self.dialect.writes_lock_database and not self.has_runnable(wanted[1]):
            # Look before taking the write lock: an idle SQLite worker is woken by every
            # commit anyone makes, and most of those are not new tasks.
            return []
        # A claim with nothing to record is one statement (PostgreSQL: no BEGIN/COMMIT).
        return self._claim_single(*wanted)

    @transaction()
    def _finish_and_claim(
        self, conn: Connection, finished: Sequence[Outcome], *wanted: Any
    ) -> list[Claim]:
        self._finish_rows(conn, finished)
        self._cancel_requested_retries(conn, finished)
        return self._claim_rows(conn, *wanted)

    @transaction(single=True)
    def _claim_single(self, conn: Connection, *wanted: Any) -> list[Claim]:
        return self._claim_rows(conn, *wanted)

    def _claim_rows(
        self,
        conn: Connection,
        worker_id: str,
        names: list[str],
        limit: int,
        lease: timedelta,
        floors: dict[str, int],
    ) -> list[Claim]:
        if limit <= 0 or not names:
            return []
        now = self.clock()
        params = {
            "now": now,
            "names": names,
            "floors": [floors.get(n, 1) for n in names],
            "limit": limit,
            "b_worker_id": worker_id,
            "b_pid": os.getpid(),
            "b_lease_until": now + lease,
        }
        # RETURNING comes in no particular order: run them in claim order.
        rows = sorted(self.dialect.claim(conn, params), key=lambda r: (-r.priority, r.run_at, r.id))
        # Where the claim statement did not raise max_attempts itself (PostgreSQL's does),
        # raise it here, in the same transaction.
        low = [r for r in rows if floors.get(r.name, 1) > r.max_attempts]
        if low:
            conn.execute(
                SQL.raise_max_attempts,
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

    def has_runnable(self, names: Iterable[str]) -> bool:
        """Whether a pending task of one of ``names`` is due now (a read, no lock)."""
        names = sorted(names)
        return bool(names) and bool(
            self._all(SQL.has_runnable, {"now": self.clock(), "names": names})
        )

    def next_run_at(self, names: Iterable[str]) -> datetime | None:
        """The earliest run_at of a pending task of ``names`` (naive UTC), or None."""
        names = sorted(names)
        if not names:
            return None
        found: datetime | None = self._all(SQL.next_run_at, {"names": names})[0][0]
        return found

    # ------------------------------------------------------------------ after the claim

    def _finish_rows(self, conn: Connection, outcomes: Sequence[Outcome]) -> int:
        written = self.dialect.finish_many(conn, outcomes, self.clock())
        if written < len(outcomes):
            log.warning(
                "%d of %d task outcomes were not recorded: their lease had been taken over",
                len(outcomes) - written,
                len(outcomes),
            )
        return written

    def _cancel_requested_retries(self, conn: Connection, outcomes: Sequence[Outcome]) -> None:
        """A task someone asked to cancel while it ran is not tried again: an attempt that
        ended in a retry (it raised, or its worker was lost) ends it cancelled instead.
        Cheap: it only runs when there are retries, and only looks at their rows."""
        retried = sorted({o.id for o in outcomes if o.status == PENDING})
        for start in range(0, len(retried), ID_CHUNK):
            conn.execute(
                task_table.update()
                .where(_t.id.in_(retried[start : start + ID_CHUNK]))
                .where(_t.status == PENDING, _t.cancel_requested == sa.true())
                .values(status=CANCELLED, end_date_time=self.clock())
            )

    def finish(self, outcomes: Sequence[Outcome]) -> int:
        """Record the end of attempts (fenced by attempt). Returns how many were recorded."""
        return self._finish(outcomes) if outcomes else 0

    @transaction()
    def _finish(self, conn: Connection, outcomes: Sequence[Outcome]) -> int:
        written = self._finish_rows(conn, outcomes)
        self._cancel_requested_retries(conn, outcomes)
        return written

    def set_progress(self, task_id: int, attempt: int, percentage: int) -> bool:
        """Record progress of a running attempt. False if the attempt no longer holds it."""
        params = {"b_id": task_id, "b_attempt": attempt, "b_progress": percentage}
        return bool(self._write(SQL.progress, params))

    def raise_max_attempts(self, claims: Sequence[tuple[Claim, int]]) -> None:
        """Set the attempt limit of held tasks (fenced by attempt)."""
        params = [{"b_id": c.id, "b_attempt": c.attempt, "b_max": n} for c, n in claims]
        self._write(SQL.raise_max_attempts, params)

    @transaction()
    def renew_leases(
        self,
        conn: Connection,
        worker_id: str,
        lease: timedelta,
        *,
        task_ids: Iterable[int] | None = None,
    ) -> LeaseReport:
        """Extend the lease of every task ``worker_id`` holds, and beat its heartbeat.

        With ``task_ids``, only those tasks' leases (a worker passes the tasks it knows it
        holds: a claim whose commit succeeded but whose answer was lost in a dropped
        connection must expire and be recovered, not be renewed for ever).
        """
        ids = None if task_ids is None else sorted({int(i) for i in task_ids})
        now = self.clock()
        params = {"b_worker_id": worker_id, "b_lease_until": now + lease}
        rows: Sequence[Row[Any]] = []
        if ids is None:
            rows = conn.execute(SQL.renew, params).all()
        elif ids:
            rows = conn.execute(SQL.renew.where(_t.id.in_(ids)), params).all()
        conn.execute(
            worker_table.update().where(worker_table.c.id == worker_id).values(heartbeat_at=now)
        )
        return LeaseReport(
            held=frozenset(r.id for r in rows),
            cancel_requested=frozenset(r.id for r in rows if r.cancel_requested),
        )

    def release(self, claims: Sequence[Claim], *, refund: bool) -> int:
        """Give claimed tasks back (pending again). ``refund`` undoes the attempt count,
        for tasks that never started. Without it the attempt counts, as when a worker is
        lost: a task with no attempt left ends failed, one whose cancellation was requested
        ends cancelled (as :meth:`recover_expired` would end them). Returns how many of
        ``claims`` still held their task."""
        return self._release(claims, refund) if claims else 0

    @transaction()
    def _release(self, conn: Connection, claims: Sequence[Claim], refund: bool) -> int:
        params = [{"b_id": c.id, "b_attempt": c.attempt, "b_refund": int(refund)} for c in claims]
        count = conn.execute(SQL.release, params).rowcount
        if not refund:
            count += self._end_interrupted(conn, claims)
        self.dialect.notify(conn)
        return int(count)

    def _end_interrupted(self, conn: Connection, claims: Sequence[Claim]) -> int:
        """End the claims the release left running: those with no attempt left or a
        cancellation requested."""
        held = {(c.id, c.attempt) for c in claims}
        rows = conn.execute(
            sa.select(_t.id, _t.attempts, _t.max_attempts, _t.worker_id, _t.cancel_requested)
            .where(_t.id.in_(sorted({c.id for c in claims})))
            .where(_t.status == RUNNING)
        ).all()
        outcomes = []
        for r in rows:
            if (r.id, r.attempts) not in held:
                continue
            stopped = f"worker {r.worker_id} stopped during attempt {r.attempts}"
            outcome = _interrupted(
                r,
                stopped if r.cancel_requested else f"{stopped}, the last of {r.max_attempts}",
                None,
            )
            log.warning("task %d: given back by a stopping worker; now %s", r.id, outcome.status)
            outcomes.append(outcome)
        return self._finish_rows(conn, outcomes) if outcomes else 0

    def recover_expired(self) -> list[tuple[int, str]]:
        """Take back running tasks whose lease expired (their worker is gone).

        Each goes back to pending if it has attempts left, else to failed with a
        ``WorkerLost`` exception; one whose cancellation was requested ends cancelled.
        Safe to call from many processes at once: each row is changed by exactly one of
        them. Returns (task id, new status) pairs.
        """
        if self.dialect.writes_lock_database and not self._all(
            SQL.expired.limit(1), {"now": self.clock()}
        ):
            # Workers call this every few seconds: look before taking SQLite's write lock.
            return []
        recovered = self._recover()
        for task_id, status in recovered:
            log.warning("task %d: its worker was lost; now %s", task_id, status)
        return recovered

    @transaction()
    def _recover(self, conn: Connection) -> list[tuple[int, str]]:
        now = self.clock()
        rows = conn.execute(self.dialect.skip_locked(SQL.expired), {"now": now}).all()
        if not rows:
            return []
        outcomes = [
            _interrupted(
                r,
                f"worker {r.worker_id} stopped renewing its lease (expired "
                f"{r.lease_expires_at.isoformat(timespec='milliseconds')} UTC, noticed "
                f"{now.isoformat(timespec='milliseconds')} UTC) during attempt {r.attempts}",
                now if r.attempts < r.max_attempts else None,
            )
            for r in rows
        ]
        self._finish_rows(conn, outcomes)
        self.dialect.notify(conn)
        return [(o.id, o.status) for o in outcomes]

    # ------------------------------------------------------------------ workers table

    def register_worker(self, worker_id: str, task_names: Iterable[str]) -> None:
        self.ensure_schema()
        now = self.clock()
        self._write(
            worker_table.insert().values(
                id=worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                started_at=now,
                heartbeat_at=now,
                task_names=json.dumps(sorted(task_names)),
            )
        )

    def unregister_worker(self, worker_id: str) -> None:
        self._write(worker_table.delete().where(worker_table.c.id == worker_id))

    def workers(self, *, seen_within: timedelta | None = None) -> list[dict[str, Any]]:
        """Registered worker processes (with a recent heartbeat if ``seen_within``)."""
        self.ensure_schema()
        query = sa.select(worker_table).order_by(worker_table.c.started_at)
        if seen_within is not None:
            query = query.where(worker_table.c.heartbeat_at >= self.clock() - seen_within)
        return [{**r._mapping, "task_names": json.loads(r.task_names)} for r in self._all(query)]

    def forget_dead_workers(self, older_than: timedelta) -> int:
        """Delete worker rows whose heartbeat is older than ``older_than``."""
        cutoff = self.clock() - older_than
        return self._write(worker_table.delete().where(worker_table.c.heartbeat_at < cutoff))

    # ------------------------------------------------------------------ reading

    def get(self, task_id: int) -> Task | None:
        """The task with ``task_id``, or None."""
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            return None
        self.ensure_schema()
        rows = self._all(SQL.get, {"id": task_id})
        return Task.from_row(rows[0]._mapping, serialization.loads) if rows else None

    def get_many(self, task_ids: Iterable[int]) -> dict[int, Task]:
        ids = sorted({int(i) for i in task_ids})
        if not ids:
            return {}
        self.ensure_schema()
        return {
            row.id: Task.from_row(row._mapping, serialization.loads)
            for row in self._by_ids(sa.select(task_table), ids)
        }

    @transaction(read_only=True)
    def _by_ids(self, conn: Connection, query: sa.Select[Any], ids: list[int]) -> list[Row[Any]]:
        """The rows of ``query`` among ``ids``, read in chunks in one transaction."""
        found: list[Row[Any]] = []
        for start in range(0, len(ids), ID_CHUNK):
            found += conn.execute(query.where(_t.id.in_(ids[start : start + ID_CHUNK]))).all()
        return found

    def unfinished(self, task_ids: Iterable[int], *, due_only: bool = False) -> set[int]:
        """Those of ``task_ids`` that are pending or running (with ``due_only``, leaving
        out pending tasks whose run_at is still in the future)."""
        ids = sorted({int(i) for i in task_ids})
        if not ids:
            return set()
        query = sa.select(_t.id).where(_t.status.in_(ACTIVE))
        if due_only:
            query = query.where(sa.or_(_t.status == RUNNING, _t.run_at <= self.clock()))
        return {r[0] for r in self._by_ids(query, ids)}

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
        query = sa.select(task_table).order_by(_t.id.desc()).limit(max(0, int(limit)))
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            for s in statuses:
                TaskStatus(s)  # ValueError for an unknown status
            query = query.where(_t.status.in_(statuses))
        if name is not None:
            query = query.where(_t.name == name)
        if before_id is not None:
            query = query.where(_t.id < before_id)
        if offset:
            query = query.offset(offset)
        return [Task.from_row(row._mapping, serialization.loads) for row in self._all(query)]

    def count_by_status(self, *, name: str | None = None) -> dict[str, int]:
        """How many tasks are in each status (every status present, zero included)."""
        self.ensure_schema()
        query = sa.select(_t.status, sa.func.count()).group_by(_t.status)
        if name is not None:
            query = query.where(_t.name == name)
        counts = {s.value: 0 for s in TaskStatus}
        counts.update({status: int(count) for status, count in self._all(query)})
        return counts

    def count_by_name(self) -> dict[str, dict[str, int]]:
        """Counts by task name, then status."""
        self.ensure_schema()
        query = sa.select(_t.name, _t.status, sa.func.count()).group_by(_t.name, _t.status)
        result: dict[str, dict[str, int]] = {}
        for name, status, count in self._all(query):
            result.setdefault(name, {s.value: 0 for s in TaskStatus})[status] = int(count)
        return result

    def finished_since(self, since: datetime) -> int:
        """How many tasks reached a final state since ``since``."""
        self.ensure_schema()
        query = sa.select(sa.func.count()).where(
            _t.status.in_(FINAL), _t.end_date_time >= to_naive_utc(since)
        )
        return int(self._all(query)[0][0])

    # ------------------------------------------------------------------ actions

    def cancel(self, task_id: int) -> TaskStatus:
        """Cancel a task: a pending one at once (returns CANCELLED); a running one is asked
        to stop (returns RUNNING, with ``cancel_requested`` set).

        Raises :class:`TaskNotFound` or :class:`TaskAlreadyFinished`.
        """
        self.ensure_schema()
        return self._cancel(task_id)

    @transaction()
    def _cancel(self, conn: Connection, task_id: int) -> TaskStatus:
        if conn.execute(SQL.cancel_pending, {"b_id": task_id, "now": self.clock()}).rowcount:
            return TaskStatus.CANCELLED
        if conn.execute(SQL.ask_to_cancel, {"b_id": task_id}).rowcount:
            return TaskStatus.RUNNING
        status = conn.execute(SQL.status_of, {"b_id": task_id}).scalar()
        if status is None:
            raise TaskNotFound(f"no task with id {task_id}")
        raise TaskAlreadyFinished(f"task {task_id} is already {status}; it cannot be cancelled")

    def retry(self, task_id: int) -> None:
        """Schedule a failed or cancelled task again (same id, attempts from zero).

        Raises :class:`TaskNotFound`, or :class:`TaskAlreadyFinished`'s sibling
        ``ValueError`` when the task is pending, running or completed.
        """
        self.ensure_schema()
        self._retry(task_id)

    @transaction()
    def _retry(self, conn: Connection, task_id: int) -> None:
        if conn.execute(SQL.retry, {"b_id": task_id, "now": self.clock()}).rowcount:
            self.dialect.notify(conn)
            return
        status = conn.execute(SQL.status_of, {"b_id": task_id}).scalar()
        if status is None:
            raise TaskNotFound(f"no task with id {task_id}")
        raise ValueError(
            f"task {task_id} is {status}; only failed or cancelled tasks can be retried"
        )

    def cleanup(self, older_than: timedelta) -> int:
        """Delete completed, failed and cancelled tasks that ended more than
        ``older_than`` ago. Never touches pending or running tasks. Returns the count."""
        if not isinstance(older_than, timedelta) or older_than < timedelta(0):
            raise ValueError(f"older_than must be a timedelta >= 0, got {older_than!r}")
        self.ensure_schema()
        cutoff = self.clock() - older_than
        return self._write(
            task_table.delete().where(_t.status.in_(FINAL), _t.end_date_time < cutoff)
        )


__all__ = [
    "Claim",
    "LeaseReport",
    "Listener",
    "NewTask",
    "Outcome",
    "TaskStore",
    "is_memory_sqlite",
    "parse_url",
    "postgres_connect_args",
    "to_naive_utc",
    "utcnow",
]
