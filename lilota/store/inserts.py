"""Inserting new tasks: the statements every way of scheduling shares, and scheduling in
the caller's own transaction.

:func:`insert_task` and :func:`insert_tasks` write new pending rows on a connection in a
transaction someone else begins and ends: the store's own (:class:`~lilota.store.TaskStore`
``add``/``add_many``) or the application's (:func:`add_in_caller_transaction`, a
SQLAlchemy ``Connection`` or ORM ``Session`` it passes as ``schedule(...,
connection=...)``). In the caller's transaction the row is invisible to workers until the
caller commits and gone if it rolls back; the PostgreSQL wake-up (``pg_notify``) is
transactional too, so it is sent on commit. Only that connection writes, so a SQLite
caller already holding the write lock is never waited for.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine

from lilota.dialects import Dialect
from lilota.errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    InvalidArgument,
    InvalidArgumentType,
    SchemaVersionError,
)
from lilota.models import NewTask
from lilota.store import schema
from lilota.store.schema import ACTIVE, SCHEMA_VERSION, task_table

if TYPE_CHECKING:
    from collections.abc import Iterator

    from lilota.store import TaskStore

_t = task_table.c

# A unique_key whose holder keeps finishing between the insert and the read is tried this
# many times before the caller is told.
KEY_RACE_TRIES = 5

# What identifies a PostgreSQL database cheaply: its name and when its server started.
_PG_FINGERPRINT = sa.text("SELECT current_database(), pg_postmaster_start_time()")

# The database each engine points at, once looked up (an engine's URL never changes).
_fingerprints: weakref.WeakKeyDictionary[Engine, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def insert_task(dialect: Dialect, conn: Connection, task: NewTask, now: datetime) -> int:
    """Insert one pending task in ``conn``'s transaction and wake idle workers; its id.
    With a ``unique_key`` that a pending or running task holds, that task's id and nothing
    inserted; with a ``schedule_key`` that exists, -1 and nothing inserted."""
    if task.unique_key is None and task.schedule_key is None:
        return dialect.insert_one(conn, task.to_row(now))
    for _ in range(KEY_RACE_TRIES):
        found = _insert_deduplicated(dialect, conn, task, now)
        if found is not None:
            return found
    raise DatabaseError(
        f"could not schedule {task.name!r} with unique_key {task.unique_key!r}: "
        "the task holding the key kept changing"
    )


def _insert_deduplicated(
    dialect: Dialect, conn: Connection, task: NewTask, now: datetime
) -> int | None:
    """Insert unless a unique or schedule key is taken; None if that changed meanwhile."""
    inserted = conn.execute(dialect.insert_ignoring_conflicts(task.to_row(now))).first()
    if inserted is not None:
        dialect.notify(conn)
        return int(inserted[0])
    # The key is taken: the loser of a race reads the winner's row.
    scheduled = sa.select(_t.id).where(_t.schedule_key == task.schedule_key)
    if task.schedule_key is not None and conn.execute(scheduled).first():
        return -1
    held = _t.unique_key == task.unique_key, _t.status.in_(ACTIVE)
    existing = conn.execute(sa.select(_t.id).where(*held)).first()
    return None if existing is None else int(existing[0])


def insert_tasks(
    dialect: Dialect, conn: Connection, tasks: Sequence[NewTask], now: datetime
) -> list[int]:
    """Insert pending tasks in one statement in ``conn``'s transaction and wake idle
    workers; their ids in input order."""
    ids = dialect.insert_many(conn, tasks, now)
    dialect.notify(conn)
    return ids


# ---------------------------------------------------------------------- the caller's transaction


def add_in_caller_transaction(
    store: TaskStore, connection: object, tasks: Sequence[NewTask]
) -> list[int]:
    """Insert ``tasks`` (one: :func:`insert_task`, several: one statement) in the
    transaction of ``connection``, a SQLAlchemy ``Connection`` or ORM ``Session`` of the
    caller, which commits or rolls back; their ids.

    Raises, writing nothing: :class:`~lilota.errors.InvalidArgumentType` for an object
    that is not one; :class:`~lilota.errors.InvalidArgument` for a closed connection or
    one to another database than ``store``'s; :class:`~lilota.errors.ConfigurationError`
    when lilota's tables are not there (created by ``start()`` or ``lilota migrate``), and
    :class:`~lilota.errors.SchemaVersionError` for tables of another version. A driver
    error is a :class:`~lilota.errors.DatabaseError` and is not retried: the caller's
    transaction is theirs to roll back.
    """
    conn = caller_connection(connection)
    with translated(store):
        _check_same_database(store, conn)
        if not store._schema_ready:
            _check_schema(conn)
        now = store.clock()
        if len(tasks) == 1:
            return [insert_task(store.dialect, conn, tasks[0], now)]
        return insert_tasks(store.dialect, conn, tasks, now) if tasks else []


def caller_connection(connection: object) -> Connection:
    """The ``Connection`` of a SQLAlchemy ``Connection``, ``Session`` or ``scoped_session``
    (the session's, in its transaction); InvalidArgumentType for anything else."""
    if isinstance(connection, Connection):
        conn = connection
    else:
        from sqlalchemy.orm import Session, scoped_session

        if isinstance(connection, scoped_session):
            connection = connection()
        if not isinstance(connection, Session):
            kind = type(connection)
            hint = ""
            if kind.__module__.startswith("sqlalchemy.ext.asyncio"):
                hint = "; an async one goes to aschedule()/aschedule_many()"
            raise InvalidArgumentType(
                "connection must be a SQLAlchemy Connection or Session, got "
                f"{connection!r} ({kind.__qualname__}){hint}"
            )
        try:
            conn = connection.connection()
        except exc.UnboundExecutionError as e:
            raise InvalidArgument(
                f"connection: the Session {connection!r} is bound to no engine; make it with "
                "Session(engine) or sessionmaker(bind=engine)"
            ) from e
    if conn.closed or conn.invalidated:
        raise InvalidArgument("connection is closed; pass an open Connection or Session")
    return conn


def _check_same_database(store: TaskStore, conn: Connection) -> None:
    """InvalidArgument unless ``conn`` is on the database of ``store`` (checked once per
    engine: the name and server start of a PostgreSQL database, a SQLite file's identity)."""
    ours, theirs = store.url.get_backend_name(), conn.engine.url.get_backend_name()
    where = store.safe_url
    if ours != theirs:
        raise InvalidArgument(
            f"connection is to a {theirs} database, but this Lilota instance's is {where}: "
            "the task must be written in the database the workers read"
        )
    if conn.engine is store.engine:
        return
    mine, other = _fingerprint(store.engine, None), _fingerprint(conn.engine, conn)
    if mine != other:
        raise InvalidArgument(
            f"connection is to another database ({conn.engine.url.render_as_string()}) than "
            f"this Lilota instance's ({where}): the task must be written in the database "
            "the workers read"
        )


def _fingerprint(engine: Engine, conn: Connection | None) -> tuple[Any, ...]:
    found = _fingerprints.get(engine)
    if found is not None:
        return found
    if engine.url.get_backend_name() == "sqlite":
        path = engine.url.database or ""
        if path in ("", ":memory:") or path.startswith("file:"):
            # An in-memory database is its engine's alone.
            found = ("memory", id(engine))
        else:
            try:
                st = os.stat(path)
                found = ("file", st.st_dev, st.st_ino)
            except OSError:
                found = ("path", os.path.realpath(path))
    elif conn is not None:
        found = tuple(conn.execute(_PG_FINGERPRINT).one())
    else:
        with engine.connect() as own:
            found = tuple(own.execute(_PG_FINGERPRINT).one())
    _fingerprints[engine] = found
    return found


def _check_schema(conn: Connection) -> None:
    schema.check_layout(conn)
    version = schema.version_of(conn)
    if version is None:
        raise ConfigurationError(
            "lilota's tables are not in the connection's database yet: create them first "
            "(Lilota.start(), or `lilota migrate`), not inside an application's transaction"
        )
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the connection's database holds lilota schema version {version}, this lilota "
            f"writes {SCHEMA_VERSION}; upgrade it first (Lilota.start() or `lilota migrate`)"
        )


@contextmanager
def translated(store: TaskStore) -> Iterator[None]:
    """Driver errors as lilota's, as :func:`lilota.dialects.transactions.transaction` says
    them (without its retries: the transaction is the caller's)."""
    try:
        yield
    except exc.DBAPIError as e:
        permanent = store.dialect.permanent_error(e)
        if permanent is not None:
            raise permanent from e
        if isinstance(e, (exc.OperationalError, exc.InterfaceError)):
            raise DatabaseUnavailable(f"the database at {store.safe_url} failed: {e.orig}") from e
        raise DatabaseError(f"the database refused a statement: {e.orig}") from e
    except exc.SQLAlchemyError as e:
        raise DatabaseError(f"database error: {e}") from e
