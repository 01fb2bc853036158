"""What differs between SQLite and PostgreSQL: one small class per backend.

:mod:`lilota.store` speaks for the task table and writes its protocol once. It holds one
:class:`Dialect`, chosen from the URL by :func:`dialect_for`, and asks it for what each
backend does its own way:

* engine set-up: SQLite's WAL, busy timeout and ``BEGIN IMMEDIATE`` for every write
  transaction, so that "database is locked" is waited out instead of raised; PostgreSQL's
  connect timeout and TCP keepalives;
* the few statements written differently (claim, finish-many, insert-many, insert-one with
  its wake-up), ``FOR UPDATE SKIP LOCKED`` and ``NOTIFY``, in a catalogue of named
  statements per dialect;
* single statements run in autocommit (PostgreSQL: one round trip, no BEGIN/COMMIT);
* which driver errors are transient (locked, disconnected) and worth another try;
* the :class:`Listener` an idle worker waits on: ``LISTEN`` on PostgreSQL, ``PRAGMA
  data_version`` on a SQLite file.

The base class is the portable way (SQLAlchemy Core); a backend lilota does not certify
gets it as is. Times are stored as naive UTC.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.engine.url import URL
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.expression import Executable

from lilota.models import NewTask, Outcome, TaskStatus

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "lilota_task"
PENDING = TaskStatus.PENDING.value
RUNNING = TaskStatus.RUNNING.value
COMPLETED = TaskStatus.COMPLETED.value

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


def to_naive_utc(value: datetime) -> datetime:
    """Aware datetimes are converted to UTC; naive ones are taken as UTC already."""
    if value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (url.database or ":memory:") == ":memory:"


def postgres_connect_args(url: URL) -> dict[str, Any]:
    """:data:`POSTGRES_CONNECT_DEFAULTS` that the URL's query does not set."""
    return {k: v for k, v in POSTGRES_CONNECT_DEFAULTS.items() if k not in url.query}


def task_row(task: NewTask, now: datetime) -> dict[str, Any]:
    """The column values of ``task`` as a new pending row created at ``now``."""
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


class Dialect:
    """The portable way (SQLAlchemy Core), shared by the backends unless they know better.

    Built once per store with the task table (the store owns the schema). ``sql`` is the
    catalogue of this dialect's own statements by name; ``engine`` its configured engine.
    """

    # A transaction that fails for a transient reason (is_transient) is tried this many
    # times in all before the error reaches the caller.
    retries: ClassVar[int] = UNREACHABLE_RETRIES
    # Whether a write transaction locks the whole database (SQLite): the store then looks
    # with a read first where there is often nothing to write, instead of queueing.
    writes_lock_database: ClassVar[bool] = False

    def __init__(self, url: URL, table: sa.Table, *, pool_size: int) -> None:
        self.url = url
        self.name = url.get_backend_name()
        self.table = table
        self.sql = self.catalogue(table)
        self.engine = self.create_engine(pool_size)
        # The engine for single statements: a transaction by themselves where it can be.
        self.single_engine = self.engine

    def __str__(self) -> str:
        return self.name

    def catalogue(self, t: sa.Table) -> dict[str, Executable]:
        """This dialect's statements, by name (the store holds the ones all share)."""
        c = t.c
        runnable = (
            sa.select(c.id)
            .where(c.status == PENDING, c.run_at <= sa.bindparam("now"))
            .where(c.name.in_(sa.bindparam("names", expanding=True)))
            .order_by(c.priority.desc(), c.run_at, c.id)
            .limit(sa.bindparam("limit"))
        )
        return {
            # Insert one pending task, returning its id.
            "insert": t.insert().returning(c.id),
            # Insert a batch in one executemany; ids come back in input order.
            "insert_many": t.insert().returning(c.id, sort_by_parameter_order=True),
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
            # End one attempt, fenced by its attempt number; executemany records a batch.
            "finish": t.update()
            .where(
                c.id == sa.bindparam("b_id"),
                c.attempts == sa.bindparam("b_attempt"),
                # Not status.in_(...): an IN list is an "expanding" parameter, which
                # SQLAlchemy refuses in executemany.
                sa.or_(c.status == PENDING, c.status == RUNNING),
            )
            .values(
                status=sa.bindparam("b_status"),
                output=sa.bindparam("b_output"),
                exception=sa.bindparam("b_exception"),
                end_date_time=sa.bindparam("b_end"),
                run_at=sa.func.coalesce(sa.bindparam("b_run_at", type_=sa.DateTime), c.run_at),
                progress_percentage=sa.func.coalesce(
                    sa.bindparam("b_progress", type_=sa.SmallInteger), c.progress_percentage
                ),
                lease_expires_at=None,
                # Who ran a finished task stays visible; a task going back to pending
                # belongs to no worker.
                worker_id=sa.case((sa.bindparam("b_status") == PENDING, None), else_=c.worker_id),
            ),
        }

    # ------------------------------------------------------------ engine, connections

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
        """Worth another try: the database was locked or unreachable, or the connection
        dropped (the transaction was rolled back as a whole)."""
        return (
            self.is_locked(error)
            or self.is_disconnect(error)
            or isinstance(error, exc.OperationalError)
        )

    def listener(self) -> Listener:
        """Something an idle worker can wait on until tasks may have arrived."""
        return Listener()

    # ------------------------------------------------------------ statements

    def lock_schema(self, conn: Connection) -> None:
        """Serialise concurrent first starts creating the tables (until commit)."""

    def notify(self, conn: Connection) -> None:
        """Wake idle workers, once per statement (where workers watch the database
        instead, nothing to do)."""

    def skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """``query`` that skips rows another transaction holds, where the backend can."""
        return query

    def insert_ignoring_conflicts(self, row: dict[str, Any]) -> Executable:
        """INSERT ``row`` ... ON CONFLICT DO NOTHING RETURNING id: the unique indexes
        decide between two processes scheduling the same key at once."""
        t = self.table
        return sqlite_dialect.insert(t).values(row).on_conflict_do_nothing().returning(t.c.id)

    def insert_one(self, conn: Connection, row: dict[str, Any]) -> int:
        """Insert one pending row and wake idle workers; its id."""
        new_id = conn.execute(self.sql["insert"], row).scalar_one()
        self.notify(conn)
        return int(new_id)

    def insert_many(self, conn: Connection, tasks: Sequence[NewTask], now: datetime) -> list[int]:
        """Insert pending rows in one statement; their ids in input order."""
        rows = [task_row(task, now) for task in tasks]
        return [int(r[0]) for r in conn.execute(self.sql["insert_many"], rows)]

    def claim(self, conn: Connection, params: dict[str, Any]) -> Sequence[Row[Any]]:
        """Run the claim statement: rows (id, name, input, attempts, max_attempts,
        priority, run_at) in no particular order."""
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
                "b_progress": 100
                if o.status == COMPLETED
                else (0 if o.status == PENDING else None),
            }
            for o in outcomes
        ]
        count = conn.execute(self.sql["finish"], params).rowcount
        return count if count is not None and count >= 0 else len(params)


class SQLiteDialect(Dialect):
    """SQLite: WAL, a busy timeout and ``BEGIN IMMEDIATE`` for every write transaction, so
    two processes never both think they hold a task; reads take no write lock. An
    in-memory database is one connection, shared under a lock."""

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
        return Listener() if self._memory_lock is not None else _SQLiteListener(self.url)


class PostgresDialect(Dialect):
    """PostgreSQL: ``FOR UPDATE SKIP LOCKED`` claims written by hand, batches as one
    statement over arrays (``unnest``), one ``NOTIFY`` per statement that workers
    ``LISTEN`` for, single statements in autocommit."""

    def __init__(self, url: URL, table: sa.Table, *, pool_size: int) -> None:
        super().__init__(url, table, pool_size=pool_size)
        # The same pool: one round trip instead of BEGIN, statement, COMMIT.
        self.single_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    def catalogue(self, t: sa.Table) -> dict[str, Executable]:
        return {
            **super().catalogue(t),
            # Insert one row and wake workers: RETURNING id, pg_notify(...), one statement.
            "insert": t.insert().returning(
                t.c.id, sa.func.pg_notify(NOTIFY_CHANNEL, "").label("notified")
            ),
            # Insert a batch as one INSERT ... SELECT FROM unnest(one array per column), in
            # input order (ORDER BY the ordinality): four to five times the rows per second
            # of multi-row VALUES batches.
            "insert_many": sa.text(f"""
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
            """),
            # The claim by hand: names as one array parameter, so the text never changes and
            # psycopg prepares it once per connection; ids by = ANY(ARRAY(...)), which reads
            # the locked rows back by primary key; max_attempts raised to the worker's floor.
            "claim": sa.text(f"""
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
            """),
            # Finish a batch of outcomes in one statement, a join with one array per column
            # (fenced by attempt): about a third of the server time of one UPDATE each.
            "finish_many": sa.text(f"""
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
            """),
            # Wake idle workers (they LISTEN on the channel).
            "notify": sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")),
            # Serialise concurrent first starts; released at commit.
            "lock_schema": sa.select(sa.func.pg_advisory_xact_lock(0x6C696C6F7461)),
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
        return _PostgresListener(self.url)

    def lock_schema(self, conn: Connection) -> None:
        conn.execute(self.sql["lock_schema"])

    def notify(self, conn: Connection) -> None:
        conn.execute(self.sql["notify"])

    def skip_locked(self, query: sa.Select[Any]) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=True)

    def insert_ignoring_conflicts(self, row: dict[str, Any]) -> Executable:
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
        }
        return int(conn.execute(self.sql["finish_many"], params).rowcount)


def dialect_for(url: URL, table: sa.Table, *, pool_size: int) -> Dialect:
    """The dialect of ``url``'s backend, its engine set up."""
    kinds: dict[str, type[Dialect]] = {"sqlite": SQLiteDialect, "postgresql": PostgresDialect}
    return kinds.get(url.get_backend_name(), Dialect)(url, table, pool_size=pool_size)


# ---------------------------------------------------------------------- listeners


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

    def __init__(self, url: URL) -> None:
        super().__init__()
        self._conn = sqlite3.connect(
            url.database or "", check_same_thread=False, isolation_level=None
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

    def __init__(self, url: URL) -> None:
        super().__init__()
        self._safe_url = url.render_as_string(hide_password=True)
        self._url = url.set(drivername="postgresql")
        self._conn: Any = None
        self._broken = False  # the connection was lost and is not back yet
        import psycopg

        try:
            self._connect()
        except psycopg.Error as e:  # the database is down: wait() connects when it is back
            self._lost(e)

    def _connect(self) -> None:
        import psycopg

        self._conn = psycopg.connect(
            self._url.render_as_string(hide_password=False),
            autocommit=True,
            **postgres_connect_args(self._url),
        )
        self._conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        if self._broken:
            self._broken = False
            log.info("LISTEN connection to %s is back", self._safe_url)

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
