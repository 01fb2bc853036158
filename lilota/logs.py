"""Logging in worker processes: the default set-up, and the task log.

A worker process (started by ``Lilota.start()``, by ``lilota worker``, by a TaskRunner
or by a script calling ``LilotaWorker.start()``) calls :func:`setup_worker_logging` once,
after its ``worker_init`` hooks: if the root logger has no handler yet (the application
configured nothing), one handler writing to stderr is added (:class:`WorkerStderr`), in
:data:`FORMAT`, which names the worker (``worker-3``: its slot under a supervisor) and its
pid. It writes records below WARNING in bunches, at most :data:`HOLD_FOR` seconds late: a
busy worker logs a line per task, and a write per line (with the wake-up of the
supervisor that passes it on) cost more than a short task itself. An application that
configured logging (``dictConfig``, ``basicConfig``, a ``worker_init`` hook, the
TaskRunner's forwarding of records) keeps its own handlers: none is added.

The level of the ``lilota`` loggers is ``$LILOTA_LOG_LEVEL`` (set for its workers by
``Lilota(log_level=)`` and ``lilota worker --log-level``), else the level given to
``LilotaWorker(logging_level=)``, else INFO where this module added the handler. The
root logger's level is not changed: other libraries' INFO records (SQLAlchemy's SQL)
stay quiet, an application's own loggers show WARNING and up unless it sets their level.

The task log (:data:`TASK_LOG`, logger ``lilota.tasks``) is the first observer of every
attempt (:mod:`lilota.hooks`): DEBUG when it starts, INFO when it completes (with its
duration), WARNING when it will be retried (the error and the delay) or was cancelled,
ERROR with the traceback when it failed for good. Each record carries ``extra`` fields
``lilota_task_id``, ``lilota_task_name``, ``lilota_attempt``, ``lilota_worker_id``
(and at its end ``lilota_status``, ``lilota_duration``), as ``ctx.logger``'s records do.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from lilota.errors import ConfigurationError
from lilota.models import TaskStatus

if TYPE_CHECKING:
    from lilota.hooks import Hooks, TaskInfo, TaskOutcome

ENV_LOG_LEVEL = "LILOTA_LOG_LEVEL"  # level of the lilota loggers in worker processes
ENV_WORKER_NAME = "LILOTA_WORKER_NAME"  # "worker-3": set by the supervisor for each slot

#: The default format of a worker process's records; ``{worker}`` is its name.
FORMAT = "%(asctime)s %(levelname)s {worker}[%(process)d] %(name)s: %(message)s"

task_log = logging.getLogger("lilota.tasks")

COMPLETED = TaskStatus.COMPLETED.value
PENDING = TaskStatus.PENDING.value
FAILED = TaskStatus.FAILED.value


def log_level_number(level: object, option: str = "logging_level") -> int:
    """``level`` as a logging level number: a number >= 0 or a level name ("INFO",
    "debug"); anything else raises ConfigurationError naming ``option``."""
    number: object = None
    if isinstance(level, int) and not isinstance(level, bool):
        number = level
    elif isinstance(level, str) and level.strip().isdigit():
        number = int(level)
    elif isinstance(level, str):
        number = logging.getLevelName(level.strip().upper())  # "Level X" if unknown
    if not isinstance(number, int) or number < 0:
        raise ConfigurationError(
            f"{option} must be a logging level: a number >= 0 or a name such as "
            f"'INFO' or 'DEBUG', got {level!r}"
        )
    return number


# Records below WARNING wait at most this long (seconds) before they are written, with
# whatever else arrived meanwhile; WARNING and above are written at once, after them.
HOLD_FOR = 0.1
# ... or until this many are held.
HOLD_AT_MOST = 1000


class WorkerStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """The default handler of a worker process: stderr, records below WARNING written
    together at most :data:`HOLD_FOR` seconds after the first of them (by a thread of
    its own), WARNING and above at once; :meth:`flush` writes what is held (at exit,
    logging's own shutdown does; before ``os._exit``, :func:`flush_worker_log`)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self._held: list[str] = []
        self._first_held = threading.Event()
        threading.Thread(target=self._write_later, name="lilota-log", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        try:
            self._held.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._held) >= HOLD_AT_MOST:
            self._write_held()
        elif len(self._held) == 1:
            self._first_held.set()

    def _write_held(self) -> None:
        if not self._held:
            return
        text = "".join(self._held)
        self._held.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed: nowhere to write
            pass

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_held()
        finally:
            self.release()

    def _write_later(self) -> None:
        while True:
            self._first_held.wait()
            self._first_held.clear()
            time.sleep(HOLD_FOR)
            self.flush()


_worker_handler: WorkerStderr | None = None


def flush_worker_log() -> None:
    """Write what the default handler holds (before this process ends with ``os._exit``,
    which skips logging's own shutdown)."""
    if _worker_handler is not None:
        _worker_handler.flush()


def worker_name() -> str:
    """``worker-N`` under a supervisor (its slot, from 1), else ``worker``."""
    return os.environ.get(ENV_WORKER_NAME) or "worker"


def setup_worker_logging() -> logging.Handler | None:
    """Give this worker process its default logging (see the module docstring): returns
    the handler added to the root logger, or None if the root logger had one already.
    Raises ConfigurationError for a malformed ``$LILOTA_LOG_LEVEL``."""
    lilota_logger = logging.getLogger("lilota")
    given = os.environ.get(ENV_LOG_LEVEL)
    if given:
        lilota_logger.setLevel(log_level_number(given, ENV_LOG_LEVEL))
    root = logging.getLogger()
    if root.handlers:
        return None
    if lilota_logger.level == logging.NOTSET:
        lilota_logger.setLevel(logging.INFO)
    global _worker_handler
    handler = _worker_handler = WorkerStderr()
    handler.setFormatter(logging.Formatter(FORMAT.format(worker=worker_name())))
    root.addHandler(handler)
    return handler


def init_worker_process(hooks: Hooks) -> None:
    """Set up a worker process before it claims a task: run the ``worker_init`` hooks
    (once per process), then :func:`setup_worker_logging` (so a hook that configures
    logging is left alone). What a hook raises is logged with its traceback and raised."""
    try:
        hooks.run_worker_init()
    except Exception:
        setup_worker_logging()
        logging.getLogger("lilota.worker").exception(
            "a worker_init hook raised; this worker does not start"
        )
        raise
    setup_worker_logging()


class TaskLog:
    """The observer writing one line when an attempt starts and one when it ends."""

    def task_started(self, task: TaskInfo) -> None:
        if task_log.isEnabledFor(logging.DEBUG):
            task_log.debug("%s started", task.label, extra=task.log_extra())

    def task_ended(self, task: TaskInfo, outcome: TaskOutcome) -> None:
        level = _level_of(outcome.status)
        if not task_log.isEnabledFor(level):
            return
        extra = {
            **task.log_extra(),
            "lilota_status": outcome.status,
            "lilota_duration": outcome.duration,
        }
        took = f"{outcome.duration:.3f} s"
        if outcome.status == COMPLETED:
            task_log.info("%s completed in %s", task.label, took, extra=extra)
        elif outcome.status == PENDING:
            task_log.warning(
                "%s failed in %s: %s; retrying in %.1f s",
                task.label,
                took,
                outcome.error,
                outcome.retry_in or 0.0,
                extra=extra,
            )
        elif outcome.status == FAILED:
            exception = outcome.exception
            if exception is not None:
                exc_info = (type(exception), exception, exception.__traceback__)
                task_log.error(
                    "%s failed in %s: %s; not retried",
                    task.label,
                    took,
                    outcome.error,
                    exc_info=exc_info,
                    extra=extra,
                )
            else:  # raised elsewhere (a pool process) or decided here: the stored traceback
                trace = outcome.error.traceback.rstrip() if outcome.error else ""
                task_log.error(
                    "%s failed in %s: %s; not retried%s",
                    task.label,
                    took,
                    outcome.error,
                    f"\n{trace}" if trace else "",
                    extra=extra,
                )
        else:
            task_log.warning(
                "%s %s after %s: %s", task.label, outcome.status, took, outcome.error, extra=extra
            )


def _level_of(status: str) -> int:
    if status == COMPLETED:
        return logging.INFO
    return logging.ERROR if status == FAILED else logging.WARNING


TASK_LOG = TaskLog()

__all__ = [
    "ENV_LOG_LEVEL",
    "ENV_WORKER_NAME",
    "FORMAT",
    "TASK_LOG",
    "init_worker_process",
    "log_level_number",
    "setup_worker_logging",
]
