"""The SQLite database file: how the engine opens it, which of its errors are permanent,
and whether it is still the file this process opened.

:class:`~lilota.dialects.SQLiteDialect` builds its engine here (:func:`sqlite_engine`)
and asks :func:`permanent_error` about each driver error before retrying it: a file that
is read-only, corrupt, of another schema or in a directory that is gone fails the same
way every time, so it is raised at once as a :class:`~lilota.errors.DatabaseFileError`
naming the file and the cause, not retried into ``DatabaseUnavailable``.
:class:`FileWatch` lets a worker notice that the file it holds was deleted or replaced.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.url import URL
from sqlalchemy.pool import StaticPool

from lilota.errors import (
    DatabaseCorrupt,
    DatabaseFileError,
    DatabaseReadOnly,
    DatabaseReplaced,
    DatabaseSchemaMismatch,
)

# Driver messages of errors that retrying cannot cure (SQLite's wording is stable across
# versions; Python 3.10's sqlite3 has no error codes): the class they are raised as.
_PERMANENT: tuple[tuple[str, type[DatabaseFileError]], ...] = (
    ("readonly database", DatabaseReadOnly),
    ("file is not a database", DatabaseCorrupt),
    ("database disk image is malformed", DatabaseCorrupt),
    ("no such column", DatabaseSchemaMismatch),
    ("has no column named", DatabaseSchemaMismatch),
    ("no such table", DatabaseSchemaMismatch),
)


def open_read_only(path: str) -> bool:
    """Whether this process may only read the existing file at ``path``."""
    return os.path.isfile(path) and not os.access(path, os.W_OK)


def _read_only_uri(path: str) -> str:
    """A URI opening ``path`` read-only. Where the directory is not writable either and no
    ``-shm`` file exists, SQLite could not build the WAL index a reader needs: the file is
    opened as immutable (no process can be writing to it in WAL mode then)."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(directory, os.W_OK) and not os.path.exists(path + "-shm"):
        uri += "&immutable=1"
    return uri


def sqlite_engine(
    url: URL, busy_timeout_ms: int, read_only: bool, watch: FileWatch | None
) -> Engine:
    """The engine of a SQLite database: WAL, the busy timeout, ``BEGIN IMMEDIATE`` for
    writes (``BEGIN`` for a connection with the ``lilota_read`` option); read-only files
    opened read-only, so that reads work and writes raise :class:`DatabaseReadOnly`;
    ``watch`` learns of each new connection (None: ``:memory:``, one shared connection)."""
    memory = watch is None
    connect_args: dict[str, Any] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
    options: dict[str, Any] = {}
    if read_only:
        uri = _read_only_uri(url.database or "")
        options["creator"] = lambda: sqlite3.connect(uri, uri=True, **connect_args)
    engine = sa.create_engine(
        url,
        # File databases keep a small pool: opening a connection and setting its
        # pragmas costs more than most statements.
        poolclass=StaticPool if memory else None,
        connect_args=connect_args,
        **options,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Autocommit at the driver level: we issue BEGIN ourselves (below), so that
        # writes take the lock up front instead of failing on upgrade.
        dbapi_conn.isolation_level = None
        if watch is not None:
            watch.opened()
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        if not memory and not read_only:  # a reader can change neither
            cur.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a process crash; only an OS crash or power
            # loss can lose the last transactions, never corrupt the database.
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read = conn.get_execution_options().get("lilota_read")
        conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

    return engine


def permanent_error(error: exc.DBAPIError, path: str) -> DatabaseFileError | None:
    """The error to raise at once for a driver error on the file at ``path`` that
    retrying cannot cure; None for the others (locked, busy, I/O errors)."""
    message = str(error.orig)
    where = os.path.abspath(path)
    for needle, kind in _PERMANENT:
        if needle in message.lower():
            return kind(f"the SQLite database {where} {_cause(kind, error.orig)}", path=where)
    if "unable to open database file" in message:
        cause = _cannot_open(where)
        if cause is not None:
            return DatabaseFileError(f"the SQLite database {where} {cause}", path=where)
    return None


def _cause(kind: type[DatabaseFileError], orig: BaseException | None) -> str:
    message = str(orig)
    if kind is DatabaseReadOnly:
        if "DIRECTORY" in str(getattr(orig, "sqlite_errorname", "")):
            return f"is in a directory this process cannot write ({message})"
        return f"can only be read by this process ({message}): reads work, writes do not"
    if kind is DatabaseCorrupt:
        return f"is damaged or not a SQLite database ({message})"
    return (
        f"does not have the tables and columns this lilota uses ({message}): it was made "
        "by another program or another version of lilota; use another file"
    )


def _cannot_open(path: str) -> str | None:
    """Why ``path`` cannot be opened, if a look at the file system can say."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return f"cannot be opened: its directory {directory} does not exist"
    if os.path.isdir(path):
        return "cannot be opened: it is a directory"
    if not os.path.exists(path) and not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot be created: this process cannot write its directory {directory}"
    if os.path.exists(path) and not os.access(path, os.R_OK):
        return "cannot be opened: this process may not read it"
    return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


class FileWatch:
    """The identity (device, inode) of the file at ``path`` when this process first opened
    it. A file deleted, or replaced by another (a restore, a ``mv``), under a running
    process splits the work: its open connections keep the old file while new processes
    use the new one. :meth:`check` is one ``stat``, cheap enough for every lease renewal."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.identity: tuple[int, int] | None = None

    def opened(self) -> None:
        """A connection was opened: the first one fixes the identity."""
        if self.identity is None:
            self.identity = _identity(self.path)

    def check(self) -> None:
        """Raise :class:`DatabaseReplaced` if the file opened first is no longer at the path."""
        if self.identity is None:
            return
        now = _identity(self.path)
        if now == self.identity:
            return
        what = "was deleted" if now is None else "was replaced by another file"
        raise DatabaseReplaced(
            f"the SQLite database {self.path} {what} while this process had it open: its "
            "connections still use the old file, which no new task reaches",
            path=self.path,
        )


__all__ = ["FileWatch", "open_read_only", "permanent_error", "sqlite_engine"]
