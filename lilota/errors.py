"""Every exception lilota raises on purpose.

All of them derive from :class:`LilotaError`, so ``except LilotaError`` catches anything
lilota itself refuses. Where a built-in exception is the natural thing to catch
(``ValueError`` for a bad value, ``TypeError`` for a wrong type, ``KeyError`` for an
unknown name), the lilota class also derives from it, so existing handlers keep working.

A bad argument of a public call is an :class:`InvalidArgument` (out of range) or an
:class:`InvalidArgumentType` (wrong type) naming it, checked by :mod:`lilota.validation`
before anything is written, with the same class and message on SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum


class WorkerExit(enum.IntEnum):
    """Exit codes of a worker process; the supervisor acts on them."""

    OK = 0
    STARTUP_FAILED = 78  # the script or the database could not be set up (EX_CONFIG)
    TASK_TIMEOUT = 79  # a task overran its timeout: replace the process at once
    CANCEL_FORCED = 80  # a running task ignored its cancellation: replace at once
    PARENT_DIED = 81  # the process that started the worker is gone
    LEASE_LOST = 82  # another worker took over the running task (this one had stalled)
    DATABASE_REPLACED = 83  # the SQLite file it opened was deleted or replaced: start afresh


class LilotaError(Exception):
    """Base class of every error lilota raises on purpose."""


class ConfigurationError(LilotaError, ValueError):
    """A setting is wrong: a malformed ``db_url``, a negative worker count, a bad option."""


class TaskNotRegistered(LilotaError, KeyError):
    """A task name that no registry here knows was scheduled or looked up."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class TaskAlreadyRegistered(LilotaError, ValueError):
    """The same task name was registered twice on one registry."""


class RegistrationError(LilotaError, TypeError):
    """A function or model cannot be registered as given (e.g. a model lilota cannot store)."""


class SerializationError(LilotaError, TypeError):
    """A value cannot be stored as JSON; the message names the field (``input.items[2]``)."""


class InvalidArgument(LilotaError, ValueError):
    """An argument of a public call is out of its range or otherwise refused: a
    ``priority`` beyond a 32-bit int, a ``delay`` that ends past the year 9999, a negative
    ``limit``, a ``unique_key`` of 300 characters, text with NUL. The message names the
    argument. Raised alike on SQLite and PostgreSQL, before anything is written."""


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument of a public call has the wrong type (``priority="high"``,
    ``get_task_by_id("1")``); the message names the argument and the type it takes. Also a
    ``ValueError`` (through :class:`InvalidArgument`) and a ``TypeError``, so either
    ``except`` catches it."""


class InvalidInput(InvalidArgument):
    """The input does not fit the task's ``input_model``; the message names the field."""


class TaskNotRetryable(LilotaError, ValueError):
    """``retry()`` of a task that is pending, running or completed (only failed or cancelled
    tasks can be retried)."""


class TaskNotFound(LilotaError, LookupError):
    """No task has the given id (raised by actions; ``get_task_by_id`` returns None)."""


class TaskAlreadyFinished(LilotaError):
    """An action such as ``cancel`` was asked of a task that is completed, failed or cancelled."""


class DatabaseError(LilotaError):
    """The database refused a statement or could not be reached; the driver error is chained."""


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached, even after a short retry."""


class SchemaVersionError(DatabaseError):
    """The database holds lilota tables of a newer schema than this release understands."""


class DatabaseFileError(DatabaseError):
    """The SQLite database file cannot be used as it is, and trying again will not help
    (its directory is gone, it cannot be opened): raised at once, never retried. The
    message names the file and the cause; ``path`` is the file. Subclasses name the cause."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class DatabaseReadOnly(DatabaseFileError):
    """A write to a SQLite file this process may only read (reads of it work)."""


class DatabaseCorrupt(DatabaseFileError):
    """The SQLite file is not a database, or is damaged."""


class DatabaseSchemaMismatch(DatabaseFileError):
    """The SQLite file has a table of lilota's name without the columns lilota uses."""


class DatabaseReplaced(DatabaseFileError):
    """The SQLite file a worker opened was deleted or replaced by another file since."""


class WorkerStartupError(LilotaError):
    """Worker processes could not be started: the message carries the end of their output."""


class WorkerAlreadyStarted(LilotaError, RuntimeError):
    """``start()`` was called on a worker that is running, or ``register()`` after
    ``start()`` (its processes would never learn the new task, which would wait for ever)."""


class LilotaStopped(LilotaError):
    """The instance was stopped: it schedules no more tasks (create a new one or ``start()``)."""


class TaskTimeout(LilotaError):
    """Stored as a task's exception when it ran longer than its ``timeout``."""


class WorkerLost(LilotaError):
    """Stored as a task's exception when the worker that ran it stopped renewing its lease."""


class NoRetry(LilotaError):
    """Raise it from a task to fail it at once, whatever attempts it has left
    (``raise NoRetry("the file is gone") from error``); it is recorded as the exception."""


class TaskCancelled(LilotaError):
    """Raised inside a task by ``TaskProgress.raise_if_cancelled()``; ends the task as cancelled."""


class TaskFailed(LilotaError):
    """Raised by ``Task.result()`` for a task that failed: ``remote_type``,
    ``remote_message`` and ``remote_traceback`` are those of what the task raised (its
    :class:`~lilota.models.TaskError`), ``task_id`` its id."""

    def __init__(
        self, task_id: int, name: str, remote_type: str, remote_message: str, remote_traceback: str
    ) -> None:
        what = f"{remote_type}: {remote_message}" if remote_message else remote_type
        super().__init__(f"task {task_id} ({name}) failed: {what}")
        self.task_id = task_id
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class TaskNotFinished(LilotaError):
    """Raised by ``Task.result()`` for a task that is still pending or running."""
