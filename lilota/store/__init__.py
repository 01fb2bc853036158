"""The task table: its schema, the write protocol every worker follows, and the read side.

Each step of a task's life is written once, for every backend, with the named statements
of a :class:`~lilota.dialects.Dialect` (chosen from the URL), which does what SQLite and
PostgreSQL do their own way. Every write after a claim is fenced: it names the claim's
fence (a count of the task's claims that never goes back, not even on retry) in its WHERE
clause, so a worker whose lease expired and whose task was claimed again can never
overwrite the newer attempt. Times are stored as naive UTC.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.engine.url import URL

from lilota import errors, execution, serialization, validation
from lilota.dialects import Dialect, dialect_for
from lilota.dialects.transactions import transaction
from lilota.dialects.urls import is_memory_sqlite, parse_url
from lilota.dialects.urls import postgres_connect_args as postgres_connect_args
from lilota.errors import SchemaVersionError, TaskAlreadyFinished, TaskNotFound
from lilota.listeners import Listener
from lilota.models import Claim, LeaseReport, NewTask, Outcome, Task, TaskStatus
from lilota.models import to_naive_utc as to_naive_utc
from lilota.models import utcnow as utcnow
from lilota.store import from1x, inserts, schema
from lilota.store.gauges import Gauges, read_gauges
from lilota.store.schema import (
    ACTIVE,
    FINAL,
    SCHEMA_VERSION,
    schema_table,
    task_table,
    worker_table,
)

log = logging.getLogger(__name__)

PENDING = TaskStatus.PENDING.value
RUNNING = TaskStatus.RUNNING.value
FAILED = TaskStatus.FAILED.value
CANCELLED = TaskStatus.CANCELLED.value

# Ids are read and written in chunks of this many: far below every backend's limit on
# bound parameters, and one round trip for any batch a worker or the dashboard has.
ID_CHUNK = 500

_t = task_table.c
_w = worker_table.c


def _no_recovery(row: Any, message: str) -> str:
    return f"{message}; it was recovered {row.recoveries} times already, its limit"


def _lost(row: Any, message: str, retry_at: datetime | None) -> Outcome:
    """The outcome rules (lilota.execution) for an attempt whose worker is gone."""
    return execution.interrupted(
        row.id, row.fence, message, cancel_requested=row.cancel_requested, retry_at=retry_at
    )


class TaskStore:
    """The task table and everything done to it. Thread-safe; one per process is enough.

    ``clock`` returns naive UTC datetimes; tests inject one to move time without sleeping.
    ``dialect`` does what the backend does its own way (``str()``: its name).
    """

    def __init__(
        self, db_url: str | URL, *, clock: Callable[[], datetime] = utcnow, pool_size: int = 5
    ) -> None:
        self.url = parse_url(db_url)
        self.clock = clock
        self.dialect: Dialect = dialect_for(self.url, task_table, pool_size=pool_size)
        self.sql = self.dialect.sql
        self.engine = self.dialect.engine
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    @property
    def is_sqlite(self) -> bool:
        return self.dialect.name == "sqlite"

    @property
    def safe_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def listener(self) -> Listener:
        """Something an idle worker can wait on until tasks may have arrived."""
        return self.dialect.listener()

    def check_file(self) -> None:
        """Raise ``DatabaseReplaced`` if the SQLite file opened was deleted or replaced."""
        self.dialect.check_file()

    @transaction()
    def _run(self, conn: Connection, fn: Callable[[Connection], Any]) -> Any:
        """``fn(conn)`` as one transaction (for tests and one-off maintenance)."""
        return fn(conn)

    @transaction(read_only=True)
    def _all(self, conn: Connection, query: Any, params: Any = None) -> Sequence[Any]:
        return conn.execute(query, params).all()

    @transaction()
    def _write(self, conn: Connection, statement: Any, params: Any = None) -> int:
        """Run one write statement (or an executemany); how many rows it changed."""
        return int(conn.execute(statement, params).rowcount)

    def ensure_schema(self) -> None:
        """Create or check lilota's tables. Idempotent, and safe when processes race.
        Raises :class:`SchemaVersionError` for a database it cannot use (see
        :mod:`lilota.store.schema`)."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                if not self.dialect.read_only:
                    self._ensure_schema()
                else:  # a file this process may only read: check, never change
                    self._check_read_only_schema()
                self._schema_ready = True

    def _check_read_only_schema(self) -> None:
        db = os.path.abspath(self.url.database or "")
        version = self.schema_version()
        if version is None:
            raise errors.DatabaseReadOnly(f"{db} is read-only; no lilota tables", path=db)
        if version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{db} holds lilota schema version {version}, this lilota reads {SCHEMA_VERSION}"
                " and cannot upgrade a file it may only read; open it once with write access"
            )

    @transaction()
    def _ensure_schema(self, conn: Connection) -> None:
        self.dialect.lock_schema(conn)
        schema.ensure(conn, self.clock())

    @transaction()
    def move_from_1x(self, conn: Connection) -> int:
        """Move the tasks of a lilota 1.x database into lilota 2's tables, keeping the 1.x
        tables renamed (:mod:`lilota.store.from1x`); returns how many tasks were moved."""
        self.dialect.lock_schema(conn)
        return from1x.move_from_1x(conn, self.clock())

    @transaction(read_only=True)
    def schema_version(self, conn: Connection) -> int | None:
        """The schema version recorded in the database, or None if there are no tables.
        Raises :class:`SchemaVersionError` for tables lilota 2 cannot read (lilota 1.x's)."""
        schema.check_layout(conn)
        return schema.version_of(conn)

    def add(self, task: NewTask, *, connection: object = None) -> int:
        """Insert one pending task and wake idle workers; returns its id. With a
        ``unique_key`` that a pending or running task already has, nothing is inserted and
        that task's id is returned. With a ``schedule_key`` that exists (that periodic tick
        was created already), nothing is inserted and -1 returned. With ``connection`` (a
        SQLAlchemy ``Connection`` or ``Session`` of the caller), in the caller's
        transaction (:mod:`lilota.store.inserts`)."""
        if connection is not None:
            return inserts.add_in_caller_transaction(self, connection, [task])[0]
        if task.unique_key is None and task.schedule_key is None:
            return self._add_one(task)
        return self._add_deduplicated(task)

    @transaction(single=True, schema=True)
    def _add_one(self, conn: Connection, task: NewTask) -> int:
        return self.dialect.insert_one(conn, task.to_row(self.clock()))

    @transaction(schema=True)
    def _add_deduplicated(self, conn: Connection, task: NewTask) -> int:
        return inserts.insert_task(self.dialect, conn, task, self.clock())

    def add_many(self, tasks: Sequence[NewTask], *, connection: object = None) -> list[int]:
        """Insert many pending tasks in one statement and one transaction; returns ids
        (with ``connection``, in the caller's transaction, as :meth:`add`)."""
        if connection is not None:
            return inserts.add_in_caller_transaction(self, connection, tasks)
        return self._add_many(tasks) if tasks else []

    @transaction(schema=True)
    def _add_many(self, conn: Connection, tasks: Sequence[NewTask]) -> list[int]:
        return inserts.insert_tasks(self.dialect, conn, tasks, self.clock())

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
        """Record ``finished`` outcomes, then claim up to ``limit`` runnable tasks, in one
        transaction (one commit). Tasks of ``names`` are taken by priority (highest first),
        then run_at, then id; each becomes running, its attempt count incremented, leased
        until now + ``lease``. With ``max_attempts`` (by name: the worker's registered
        limits), a claimed task's max_attempts is raised to at least that, in the same
        transaction (a scheduler that did not know the task stored 1)."""
        wanted = (worker_id, sorted(names), limit, lease, dict(max_attempts or {}))
        if finished:
            return self._claim_after(finished, wanted)
        if self.dialect.writes_lock_database and not self.has_runnable(wanted[1]):
            # Look before taking the write lock: an idle SQLite worker is woken by every
            # commit anyone makes, and most of those are not new tasks.
            return []
        # A claim with nothing to record is one statement (PostgreSQL: no BEGIN/COMMIT).
        return self._claim_alone(wanted)

    @transaction()
    def _claim_after(self, conn: Connection, done: Sequence[Outcome], wanted: Any) -> list[Claim]:
        self._finish_rows(conn, done)
        self._cancel_requested_retries(conn, done)
        return self._claim_rows(conn, wanted)

    @transaction(single=True)
    def _claim_alone(self, conn: Connection, wanted: Any) -> list[Claim]:
        return self._claim_rows(conn, wanted)

    def _claim_rows(self, conn: Connection, wanted: Any) -> list[Claim]:
        worker, names, limit, lease, floors = wanted
        if limit <= 0 or not names:
            return []
        now = self.clock()
        params = {"now": now, "names": names, "floors": [floors.get(n, 1) for n in names]}
        params.update(limit=limit, b_worker_id=worker, b_pid=os.getpid(), b_lease_until=now + lease)
        # RETURNING comes in no particular order: run them in claim order.
        rows = sorted(self.dialect.claim(conn, params), key=lambda r: (-r.priority, r.run_at, r.id))
        # Where the claim statement did not raise max_attempts itself (PostgreSQL's does),
        # raise it here, in the same transaction.
        low = [
            {"b_id": r.id, "b_fence": r.fence, "b_max": floors[r.name]}
            for r in rows
            if floors.get(r.name, 1) > r.max_attempts
        ]
        if low:
            conn.execute(self.sql["raise_max_attempts"], low)
        limits = [max(r.max_attempts, floors.get(r.name, 1)) for r in rows]
        return [
            Claim(
                id=r.id,
                name=r.name,
                input=r.input,
                attempt=r.attempts,
                max_attempts=n,
                fence=r.fence,
                recoveries=r.recoveries,
                trace_context=r.trace_context,
            )
            for r, n in zip(rows, limits, strict=True)
        ]

    def has_runnable(self, names: Iterable[str]) -> bool:
        """Whether a pending task of one of ``names`` is due now (a read, no lock)."""
        params = {"now": self.clock(), "names": sorted(names)}
        return bool(params["names"]) and bool(self._all(self.sql["has_runnable"], params))

    def next_run_at(self, names: Iterable[str]) -> datetime | None:
        """The earliest run_at of a pending task of ``names`` (naive UTC), or None."""
        names = sorted(names)
        return self._all(self.sql["next_run_at"], {"names": names})[0][0] if names else None

    def _finish_rows(self, conn: Connection, outcomes: Sequence[Outcome]) -> int:
        written = self.dialect.finish_many(conn, outcomes, self.clock())
        if written:
            self.dialect.notify_finished(conn)  # for await_task(), sent at commit
        if written < len(outcomes):
            msg = "%d of %d task outcomes were not recorded: their lease had been taken over"
            log.warning(msg, len(outcomes) - written, len(outcomes))
        return written

    def _cancel_requested_retries(self, conn: Connection, outcomes: Sequence[Outcome]) -> None:
        """A task asked to cancel while it ran is not tried again: an attempt that ended in a
        retry (it raised, its worker was lost) ends it cancelled. Only looks at retries."""
        retried = sorted({o.id for o in outcomes if o.status == PENDING})
        for start in range(0, len(retried), ID_CHUNK):
            ids = retried[start : start + ID_CHUNK]
            conn.execute(self.sql["cancel_retries"], {"ids": ids, "now": self.clock()})

    def finish(self, outcomes: Sequence[Outcome]) -> int:
        """Record the end of attempts (fenced). Returns how many were recorded."""
        return self._finish(outcomes) if outcomes else 0

    @transaction()
    def _finish(self, conn: Connection, outcomes: Sequence[Outcome]) -> int:
        written = self._finish_rows(conn, outcomes)
        self._cancel_requested_retries(conn, outcomes)
        return written

    def set_progress(self, task_id: int, fence: int, percentage: int) -> bool:
        """Record progress of a running attempt (``fence``: its claim's). False if the
        attempt no longer holds the task."""
        params = {"b_id": task_id, "b_fence": fence, "b_progress": percentage}
        return bool(self._write(self.sql["progress"], params))

    @transaction()
    def renew_leases(
        self,
        conn: Connection,
        worker_id: str,
        lease: timedelta,
        *,
        task_ids: Iterable[int] | None = None,
    ) -> LeaseReport:
        """Extend the lease of every task ``worker_id`` holds, and beat its heartbeat. With
        ``task_ids``, only those tasks' leases (a worker passes the tasks it knows it holds: a
        claim whose commit succeeded but whose answer was lost in a dropped connection must
        expire and be recovered, not be renewed for ever)."""
        ids = None if task_ids is None else sorted({int(i) for i in task_ids})
        now = self.clock()
        renew = self.sql["renew"] if ids is None else self.sql["renew"].where(_t.id.in_(ids))
        params = {"b_worker_id": worker_id, "b_lease_until": now + lease}
        rows = conn.execute(renew, params).all() if ids is None or ids else []
        conn.execute(worker_table.update().where(_w.id == worker_id).values(heartbeat_at=now))
        held, asked = {r.id for r in rows}, {r.id for r in rows if r.cancel_requested}
        return LeaseReport(held=frozenset(held), cancel_requested=frozenset(asked))

    def cancel_requested_among(self, worker_id: str, task_ids: Iterable[int]) -> set[int]:
        """Those of ``task_ids`` that ``worker_id`` runs and someone asked to cancel (a
        read: no write lock, no lease renewed)."""
        ids = sorted({int(i) for i in task_ids})
        query = sa.select(_t.id).where(
            _t.worker_id == worker_id, _t.status == RUNNING, _t.cancel_requested == sa.true()
        )
        return {r[0] for r in self._by_ids(query, ids)} if ids else set()

    def release(self, claims: Sequence[Claim], *, refund: bool) -> int:
        """Give claimed tasks back (pending again); the attempt does not count. ``refund``:
        they never started. Without it they did, and that counts as a recovery, as when a
        worker is lost: a task recovered ``max_recoveries`` times already ends failed, one
        whose cancellation was requested ends cancelled (as :meth:`recover_expired` would end
        them). Returns how many of ``claims`` still held their task."""
        return self._release(claims, refund) if claims else 0

    @transaction()
    def _release(self, conn: Connection, claims: Sequence[Claim], refund: bool) -> int:
        params = [{"b_id": c.id, "b_fence": c.fence, "b_refund": int(refund)} for c in claims]
        count = int(conn.execute(self.sql["release"], params).rowcount)
        if not refund:
            count += self._end_interrupted(conn, claims)
        self.dialect.notify(conn)
        return count

    def _end_interrupted(self, conn: Connection, claims: Sequence[Claim]) -> int:
        """End the claims the release left running: no recovery left, or cancel requested."""
        held = {(c.id, c.fence) for c in claims}
        outcomes = []
        for r in conn.execute(self.sql["running"], {"ids": sorted({c.id for c in claims})}):
            if (r.id, r.fence) not in held:
                continue
            stopped = f"worker {r.worker_id} stopped during attempt {r.attempts}"
            outcome = _lost(r, stopped if r.cancel_requested else _no_recovery(r, stopped), None)
            log.warning("task %d: given back by a stopping worker; now %s", r.id, outcome.status)
            outcomes.append(outcome)
        return self._finish_rows(conn, outcomes) if outcomes else 0

    def recover_expired(self, before: datetime | None = None) -> list[tuple[int, str]]:
        """Take back running tasks whose lease expired (their worker is gone): each goes back
        to pending (a recovery: the attempt does not count) if it was recovered fewer than
        ``max_recoveries`` times, else to failed with a ``WorkerLost`` exception, or ends
        cancelled if that was requested. Safe to call from many processes at once:
        each row is changed by exactly one. Returns (task id, new status) pairs.

        ``before`` (default: now): only leases that expired before it. A worker passes the
        time it decided to look, so that a call that hung through a network partition
        does not take tasks whose holders were cut off with it."""
        now = before or self.clock()
        # Workers call this every few seconds: on SQLite, look before taking the write lock.
        look = self.dialect.writes_lock_database
        if look and not self._all(self.sql["any_expired"], {"now": now}):
            return []
        recovered = self._recover(now)
        for task_id, status in recovered:
            log.warning(
                "task %d: its worker was lost; now %s",
                task_id,
                status,
                extra={"lilota_task_id": task_id, "lilota_status": status},
            )
        return recovered

    @transaction()
    def _recover(self, conn: Connection, now: datetime) -> list[tuple[int, str]]:
        rows = conn.execute(self.dialect.skip_locked(self.sql["expired"]), {"now": now}).all()
        if not rows:
            return []
        noticed = now.isoformat(timespec="milliseconds")
        outcomes = []
        for r in rows:
            lost = (
                f"worker {r.worker_id} stopped renewing its lease (expired "
                f"{r.lease_expires_at.isoformat(timespec='milliseconds')} UTC, noticed "
                f"{noticed} UTC) during attempt {r.attempts}"
            )
            again = r.recoveries < r.max_recoveries
            outcomes.append(
                _lost(r, lost if again else _no_recovery(r, lost), now if again else None)
            )
        self._finish_rows(conn, outcomes)
        # A recovery gives the attempt back and is counted apart from attempts.
        recovered = [{"b_id": o.id, "b_fence": o.fence} for o in outcomes if o.status == PENDING]
        if recovered:
            conn.execute(self.sql["count_recovery"], recovered)
        self.dialect.notify(conn)
        return [(o.id, o.status) for o in outcomes]

    @transaction(schema=True)
    def cancel(self, conn: Connection, task_id: int) -> TaskStatus:
        """Cancel a task: a pending one at once (returns CANCELLED); a running one is asked
        to stop (returns RUNNING, with ``cancel_requested`` set). Raises
        :class:`TaskNotFound` or :class:`TaskAlreadyFinished`."""
        params = {"b_id": task_id, "now": self.clock()}
        if conn.execute(self.sql["cancel_pending"], params).rowcount:
            self.dialect.notify_finished(conn)
            return TaskStatus.CANCELLED
        if conn.execute(self.sql["ask_to_cancel"], {"b_id": task_id}).rowcount:
            return TaskStatus.RUNNING
        status = self._status_of(conn, task_id)
        raise TaskAlreadyFinished(f"task {task_id} is already {status}; it cannot be cancelled")

    @transaction(schema=True)
    def retry(self, conn: Connection, task_id: int) -> None:
        """Schedule a failed or cancelled task again (same id, attempts from zero). Raises
        :class:`TaskNotFound`, or :class:`TaskNotRetryable` when pending, running or completed."""
        if conn.execute(self.sql["retry"], {"b_id": task_id, "now": self.clock()}).rowcount:
            self.dialect.notify(conn)
            return
        status = self._status_of(conn, task_id)
        raise errors.TaskNotRetryable(
            f"task {task_id} is {status}; only failed or cancelled tasks can be retried"
        )

    def _status_of(self, conn: Connection, task_id: int) -> str:
        """The status of a task that a cancel or retry did not change; TaskNotFound if none."""
        status = conn.execute(self.sql["status_of"], {"b_id": task_id}).scalar()
        if status is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return str(status)

    def cleanup(self, older_than: timedelta) -> int:
        """Delete completed, failed and cancelled tasks that ended more than
        ``older_than`` ago. Never touches pending or running tasks. Returns the count."""
        cutoff = validation.before(self.clock(), older_than, "older_than")
        self.ensure_schema()
        ended = sa.and_(_t.status.in_(FINAL), _t.end_date_time < cutoff)
        return self._write(task_table.delete().where(ended))

    @transaction(schema=True)
    def register_worker(self, conn: Connection, worker_id: str, task_names: Iterable[str]) -> None:
        now, names = self.clock(), json.dumps(sorted(task_names))
        row = {"id": worker_id, "hostname": socket.gethostname(), "pid": os.getpid()}
        conn.execute(
            worker_table.insert().values(**row, started_at=now, heartbeat_at=now, task_names=names)
        )

    def unregister_worker(self, worker_id: str) -> None:
        self._write(worker_table.delete().where(_w.id == worker_id))

    def forget_dead_workers(self, older_than: timedelta) -> int:
        """Delete worker rows whose heartbeat is older than ``older_than``."""
        return self._write(worker_table.delete().where(_w.heartbeat_at < self.clock() - older_than))

    def workers(self, *, seen_within: timedelta | None = None) -> list[dict[str, Any]]:
        """Registered worker processes (with a recent heartbeat if ``seen_within``)."""
        self.ensure_schema()
        query = sa.select(worker_table).order_by(_w.started_at)
        if seen_within is not None:
            query = query.where(_w.heartbeat_at >= self.clock() - seen_within)
        return [{**r._mapping, "task_names": json.loads(r.task_names)} for r in self._all(query)]

    def get(self, task_id: int | str | uuid.UUID) -> Task | None:
        """The task with ``task_id``, or None. A UUID (or its text) finds a task moved over
        from lilota 1.x by its 1.x id; another non-int is an InvalidArgumentType."""
        found = validation.task_key(task_id)
        if isinstance(found, str):
            return self._get_legacy(found)
        if found is None:
            return None
        self.ensure_schema()
        rows = self._all(self.sql["get"], {"id": found})
        return Task.from_row(rows[0]._mapping, serialization.loads) if rows else None

    def _get_legacy(self, legacy_id: str) -> Task | None:
        self.ensure_schema()
        rows = self._all(sa.select(task_table).where(_t.legacy_id == legacy_id))
        return Task.from_row(rows[0]._mapping, serialization.loads) if rows else None

    def get_many(self, task_ids: Iterable[int]) -> dict[int, Task]:
        ids = sorted({int(i) for i in task_ids})
        if not ids:
            return {}
        self.ensure_schema()
        rows = self._by_ids(sa.select(task_table), ids)
        return {r.id: Task.from_row(r._mapping, serialization.loads) for r in rows}

    @transaction(read_only=True)
    def _by_ids(self, conn: Connection, query: sa.Select[Any], ids: list[int]) -> list[Any]:
        """The rows of ``query`` among ``ids``, read in chunks in one transaction."""
        found: list[Any] = []
        for start in range(0, len(ids), ID_CHUNK):
            found += conn.execute(query.where(_t.id.in_(ids[start : start + ID_CHUNK]))).all()
        return found

    def unfinished(self, task_ids: Iterable[int], *, due_only: bool = False) -> set[int]:
        """Those of ``task_ids`` that are pending or running (with ``due_only``, leaving
        out pending tasks whose run_at is still in the future)."""
        ids = sorted({int(i) for i in task_ids})
        query = sa.select(_t.id).where(_t.status.in_(ACTIVE))
        if due_only:
            query = query.where(sa.or_(_t.status == RUNNING, _t.run_at <= self.clock()))
        return {r[0] for r in self._by_ids(query, ids)} if ids else set()

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
        return {s.value: 0 for s in TaskStatus} | {s: int(n) for s, n in self._all(query)}

    def count_by_name(self) -> dict[str, dict[str, int]]:
        """Counts by task name, then status."""
        self.ensure_schema()
        result: dict[str, dict[str, int]] = {}
        query = sa.select(_t.name, _t.status, sa.func.count()).group_by(_t.name, _t.status)
        for name, status, count in self._all(query):
            result.setdefault(name, {s.value: 0 for s in TaskStatus})[status] = int(count)
        return result

    def unserved(self, seen_within: timedelta) -> dict[str, int]:
        """Pending tasks, counted by name, of the names no worker with a heartbeat within
        ``seen_within`` announced: no live worker will ever run them as things are."""
        served = {n for w in self.workers(seen_within=seen_within) for n in w["task_names"]}
        query = sa.select(_t.name, sa.func.count()).where(_t.status == PENDING).group_by(_t.name)
        return {name: int(n) for name, n in self._all(query) if name not in served}

    def gauges(self, live_within: timedelta) -> Gauges:
        """What the metrics collector reads at each scrape (:mod:`lilota.store.gauges`)."""
        return read_gauges(self, live_within)

    def finished_since(self, since: datetime) -> int:
        """How many tasks reached a final state since ``since``."""
        self.ensure_schema()
        ended = sa.and_(_t.status.in_(FINAL), _t.end_date_time >= to_naive_utc(since))
        return int(self._all(sa.select(sa.func.count()).where(ended))[0][0])


__all__ = ["Claim", "LeaseReport", "Listener", "NewTask", "Outcome", "TaskStore", "parse_url"]
__all__ += ["SCHEMA_VERSION", "schema_table", "task_table", "worker_table"]
__all__ += ["is_memory_sqlite", "postgres_connect_args", "to_naive_utc", "utcnow"]
