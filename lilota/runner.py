"""``TaskRunner`` of the earlier TaskRunner API (see :mod:`lilota.legacy`).

It runs no task itself: its worker processes are started by the engine's
:class:`~lilota.supervisor.Supervisor` and each is a :class:`~lilota.worker.LilotaWorker`
on the runner's TaskBase classes (adapted to task functions by :mod:`lilota.legacy`) and
the store's database. Their log records come back to this process's loggers when it
configured logging (its root logger has a handler); else each worker logs to stderr in
lilota's default format (:mod:`lilota.logs`), which the supervisor passes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import multiprocessing.spawn
import os
import sys
import threading
import time
from collections.abc import Mapping
from multiprocessing.managers import BaseProxy
from types import TracebackType
from typing import Any

from lilota import execution, validation
from lilota.errors import (
    ConfigurationError,
    DatabaseError,
    LilotaStopped,
    RegistrationError,
    TaskNotRegistered,
)
from lilota.legacy import ClassRef, LegacyCall, TaskBase, registry_of
from lilota.models import Task, TaskStatus
from lilota.registry import Registry, new_task
from lilota.settings import set_logging_level
from lilota.store import TaskStore
from lilota.stores import DatabaseTaskStore, MemoryTaskStore
from lilota.supervisor import Supervisor, is_worker_process, wait_until_finished
from lilota.validation import check_int
from lilota.worker import LilotaWorker

log = logging.getLogger(__name__)

# Pruning the set of ids a TaskRunner added (kept so stop() can wait for them): past this
# many, finished ones are dropped, so a long-running process holds only unfinished ids.
_PRUNE_AT = 10_000
# How long stop() waits for the log records of exited workers to be handed on.
_LOG_DRAIN = 5.0

# Environment of a TaskRunner's worker process: JSON, see TaskRunner._worker_spec.
ENV_LEGACY_WORKER = "LILOTA_LEGACY_WORKER"
_WORKER_ARGV = [
    sys.executable,
    "-c",
    "from lilota.runner import boot_worker; boot_worker()",
]


# --------------------------------------------------------------------------- log records


class _LogReceiver:
    """Hands the log records of worker processes to this process's loggers.

    Workers connect to a Unix socket with a random key (multiprocessing's authenticated
    connections, as its managers use) and send their records, prepared as a
    :class:`~logging.handlers.QueueHandler` does.
    """

    def __init__(self) -> None:
        self.authkey = os.urandom(32)
        self._listener = multiprocessing.connection.Listener(family="AF_UNIX", authkey=self.authkey)
        self.address = str(self._listener.address)
        self._closing = threading.Event()
        self._readers: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="lilota-logs", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn = self._listener.accept()
            except (OSError, EOFError, multiprocessing.AuthenticationError):
                time.sleep(0.05)  # a failed handshake, or the listener is closing
                continue
            reader = threading.Thread(
                target=self._read, args=(conn,), name="lilota-logs", daemon=True
            )
            reader.start()
            self._readers.append(reader)

    @staticmethod
    def _read(conn: multiprocessing.connection.Connection) -> None:
        with conn:
            while True:
                try:
                    record = conn.recv()
                except (EOFError, OSError):
                    return
                except Exception as e:  # a record this process cannot rebuild
                    log.warning("dropped a log record of a worker process: %s", e)
                    continue
                if isinstance(record, logging.LogRecord):
                    logger = logging.getLogger(record.name)
                    if logger.isEnabledFor(record.levelno):
                        logger.handle(record)

    def close(self) -> None:
        """Stop listening once the workers are gone; returns when their records are in."""
        self._closing.set()
        with contextlib.suppress(OSError, EOFError, multiprocessing.AuthenticationError):
            # Wakes the acceptor, which then sees _closing.
            multiprocessing.connection.Client(
                self.address, family="AF_UNIX", authkey=self.authkey
            ).close()
        self._acceptor.join(timeout=_LOG_DRAIN)
        self._listener.close()
        for reader in self._readers:
            reader.join(timeout=_LOG_DRAIN)


class _RecordSender:
    """The "queue" of a worker's QueueHandler: sends each record to the runner."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self._conn = conn

    def put_nowait(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):  # the runner is gone: so is this process, soon
            self._conn.send(record)


def _level_snapshot() -> dict[str, int]:
    """Levels set in this process, for worker processes to send the same records."""
    levels = {"": logging.getLogger().level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


# --------------------------------------------------------------------------- worker side


def boot_worker() -> None:
    """Entry point of a TaskRunner's worker process (started by its Supervisor).

    Imports the runner's main module as "spawn" does, sends log records to the runner
    (if it configured logging), and makes this process a :class:`~lilota.worker.LilotaWorker` for the runner's
    TaskBase classes on the runner's database. Blocks until told to stop.
    """
    spec = json.loads(os.environ.pop(ENV_LEGACY_WORKER))
    multiprocessing.spawn.prepare(spec["main"])
    conn = multiprocessing.connection.Client(
        spec["logs"], family="AF_UNIX", authkey=bytes.fromhex(spec["authkey"])
    )
    root = logging.getLogger()
    if spec.get("forward_logs", True):
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(logging.handlers.QueueHandler(_RecordSender(conn)))  # type: ignore[arg-type]
    # else the runner's process logs nowhere: this worker logs to stderr (lilota.logs)
    for name, level in spec["levels"].items():
        logging.getLogger(name or None).setLevel(level)
    store = TaskStore(spec["db_url"])
    classes = {name: ClassRef(*ref) for name, ref in spec["classes"].items()}
    registry = registry_of(classes, store.get)
    LilotaWorker(spec["db_url"], registry=registry, store=store).start()


# --------------------------------------------------------------------------- runner side


def _database_of(store: object) -> tuple[DatabaseTaskStore, bool]:
    """The database a TaskRunner and its workers share for ``store``, and whether it is
    the temporary file of a MemoryTaskStore."""
    if isinstance(store, BaseProxy):
        if not hasattr(store, "database_url"):
            raise ConfigurationError(
                f"the store {store!r} lacks database_url(): register MemoryTaskStore "
                "(or a subclass) with the StoreManager"
            )
        return DatabaseTaskStore(str(store.database_url())), True
    if isinstance(store, MemoryTaskStore):
        raise ConfigurationError(
            "a MemoryTaskStore must be shared with the worker processes through a "
            "StoreManager: StoreManager.register('Store', MemoryTaskStore); "
            "manager = StoreManager(); manager.start(); store = manager.Store()"
        )
    if isinstance(store, DatabaseTaskStore):
        return store, False
    if isinstance(store, (TaskStore, str)):
        return DatabaseTaskStore(store), False
    raise ConfigurationError(
        f"TaskRunner needs a store: a MemoryTaskStore served by a StoreManager, or "
        f"DatabaseTaskStore(db_url); got {type(store).__name__}"
    )


class TaskRunner:
    """Runs :class:`TaskBase` tasks in worker processes and records them in a store.

    ``store`` is a :class:`MemoryTaskStore` served by a :class:`StoreManager` (the proxy
    ``manager.Store()``), or a :class:`DatabaseTaskStore` (also a ``TaskStore`` or a
    database URL). ``number_of_workers`` processes run tasks (default: one per CPU);
    ``number_of_processes`` is its earlier name (give one of them). ``logging_level``, as in
    the earlier release, sets the level of the ``lilota`` logger in this process, and so in
    the worker processes, which take this process's levels when they start.
    """

    def __init__(
        self,
        store: Any,
        number_of_workers: int | None = None,
        *,
        number_of_processes: int | None = None,
        logging_level: int | str | None = None,
    ) -> None:
        if number_of_processes is not None:
            if number_of_workers is not None:
                raise ConfigurationError(
                    "give number_of_workers or number_of_processes (its earlier name), not both"
                )
            number_of_workers = check_int(
                number_of_processes, "number_of_processes", 1, error=ConfigurationError
            )
        set_logging_level(logging_level)
        self._database, self._memory = _database_of(store)
        if number_of_workers is None:
            number_of_workers = os.cpu_count() or 1
        number_of_workers = check_int(
            number_of_workers, "number_of_workers", 1, error=ConfigurationError
        )
        self.store = store
        self.number_of_workers = number_of_workers
        self._classes: dict[str, ClassRef] = {}
        self._registry = Registry()  # names only: the workers build their own
        self._lock = threading.Lock()  # start, stop, register
        self._supervisor: Supervisor | None = None
        self._logs: _LogReceiver | None = None
        self._ids_lock = threading.Lock()
        self._ids: set[int] = set()  # what stop() waits for
        self._stopped = False

    # ------------------------------------------------------------------ registering

    def register(self, name: str, task_class: type[TaskBase]) -> None:
        """Make ``task_class`` (a TaskBase subclass with ``run()``) the task ``name``.

        Raises :class:`~lilota.errors.RegistrationError` for a class that cannot be a task
        or a bad name, :class:`~lilota.errors.TaskAlreadyRegistered` for a name used before.
        """
        ref = ClassRef.of(name, task_class)
        with self._lock:
            if self._supervisor is not None:
                raise RegistrationError(
                    f"task {name!r}: register tasks before start(); the worker processes "
                    "are already running"
                )
            self._registry.register(name, LegacyCall(name, ref, _no_task), max_attempts=1)
            self._classes[name] = ref

    @property
    def task_names(self) -> frozenset[str]:
        return self._registry.names

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker processes; returns once they are ready to take tasks.

        Raises :class:`~lilota.errors.WorkerStartupError` if they cannot start (the message
        carries their output).
        """
        if is_worker_process():
            raise ConfigurationError(
                "TaskRunner.start() was called inside a worker process: the main module "
                "starts it at import time. Call start() under "
                '`if __name__ == "__main__":` (worker processes import your main module).'
            )
        with self._lock:
            if self._supervisor is not None:
                return
            self._database.task_store.ensure_schema()
            logs = _LogReceiver()
            supervisor = Supervisor(
                _WORKER_ARGV,
                self.number_of_workers,
                env={ENV_LEGACY_WORKER: json.dumps(self._worker_spec(logs))},
                on_exit=self._worker_exited if self._memory else None,
            )
            try:
                supervisor.start()
            except BaseException:
                logs.close()
                raise
            self._supervisor, self._logs = supervisor, logs
            self._stopped = False
        log.info(
            "TaskRunner started %d worker processes for %s",
            self.number_of_workers,
            ", ".join(sorted(self._classes)) or "no tasks",
        )

    def _worker_spec(self, logs: _LogReceiver) -> dict[str, Any]:
        main = multiprocessing.spawn.get_preparation_data("lilota-worker")
        del main["authkey"]  # bytes; the workers need none
        path = main.get("init_main_from_path")
        if path is not None and not os.path.isfile(path):
            del main["init_main_from_path"]  # e.g. "<stdin>": nothing a worker can import
        return {
            "db_url": self._database.db_url,
            "classes": {name: [r.module, r.qualname] for name, r in self._classes.items()},
            "main": main,
            "logs": logs.address,
            "authkey": logs.authkey.hex(),
            "levels": _level_snapshot(),
            # Records go back to this process's handlers if it has any.
            "forward_logs": bool(logging.getLogger().handlers),
        }

    def _worker_exited(self, pid: int, code: int) -> None:
        """In-memory store: a worker process ended on its own; its tasks end failed."""
        self._fail_tasks_of({pid: f"ended unexpectedly (exit code {code})"})

    def _fail_tasks_of(self, ended: Mapping[int, str]) -> None:
        """End the tasks still running in the gone worker processes ``ended`` (pid -> how
        it ended) as failed with :class:`~lilota.errors.WorkerLost`, at progress 100."""
        store = self._database.task_store
        try:
            # Running tasks are few: a worker process holds at most MAX_BATCH of them.
            running = store.list_tasks(status=TaskStatus.RUNNING.value, limit=1_000_000)
            for task in running:
                how = None if task.pid is None else ended.get(task.pid)
                if how is None:
                    continue
                message = f"worker process {task.pid} running task {task.id} {how}"
                store.set_progress(task.id, task.fence, 100)
                lost = execution.interrupted(
                    task.id, task.fence, message, cancel_requested=False, retry_at=None
                )
                if store.finish([lost]):
                    log.error("task %d failed: %s", task.id, message)
        except Exception as e:  # called from the supervisor's thread: never raise there
            log.error("could not record the tasks of worker processes %s: %s", sorted(ended), e)

    def stop(self, timeout: float | None = None) -> None:
        """Wait for the tasks added so far to end, then stop the worker processes.

        After ``timeout`` seconds, workers still running are killed (with the in-memory
        store their tasks end failed; with a database they are recovered like any lost
        task). Afterwards ``add()`` raises :class:`~lilota.errors.LilotaStopped` until
        ``start()`` is called again.
        """
        timeout = validation.seconds(timeout, "timeout")
        with self._lock:
            supervisor, self._supervisor = self._supervisor, None
            logs, self._logs = self._logs, None
            self._stopped = True
        if supervisor is None or logs is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._wait_for_added(deadline)
        finally:  # the database may be gone: the workers are stopped all the same
            pids = supervisor.pids
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            supervisor.stop(timeout=left)
            if self._memory:
                self._fail_tasks_of(
                    dict.fromkeys(pids, "was killed when TaskRunner.stop() timed out")
                )
            logs.close()
        log.info("TaskRunner stopped")

    def _wait_for_added(self, deadline: float | None) -> None:
        with self._ids_lock:
            ids = set(self._ids)
        store = self._database.task_store
        try:
            wait_until_finished(lambda left: store.unfinished(left, due_only=True), ids, deadline)
        except DatabaseError as e:
            log.error("TaskRunner.stop(): cannot read the tasks (%s); stopping now", e)
        with self._ids_lock:
            self._ids.clear()

    def __enter__(self) -> TaskRunner:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the running worker processes."""
        supervisor = self._supervisor
        return [] if supervisor is None else supervisor.pids

    # ------------------------------------------------------------------ adding

    def add(self, name: str, description: str | None = None, input: Any = None) -> int:
        """Add a task to run and return its id.

        ``input`` is stored as JSON (any value :mod:`lilota.serialization` accepts, usually
        a dict); the task reads it back as ``self.task_info.input``. Raises, storing
        nothing: :class:`~lilota.errors.TaskNotRegistered` for an unknown name,
        :class:`~lilota.errors.LilotaStopped` after ``stop()``,
        :class:`~lilota.errors.SerializationError` for input that cannot be stored,
        :class:`~lilota.errors.InvalidArgumentType` for a name or ``description`` that is
        not a str (the checks of :func:`lilota.registry.new_task`).
        """
        if self._stopped:
            raise LilotaStopped("this TaskRunner was stopped; call start() again to add tasks")
        if isinstance(name, str) and name not in self._classes:
            known = ", ".join(sorted(self._classes)) or "none"
            raise TaskNotRegistered(
                f"no task named {name!r} is registered with this TaskRunner (registered: {known})"
            )
        store = self._database.task_store
        # The earlier release ran a task once: max_attempts=1 whatever the class says.
        task_id = store.add(new_task(name, input, description=description, max_attempts=1))
        with self._ids_lock:
            self._ids.add(task_id)
            if len(self._ids) > _PRUNE_AT:
                self._ids = store.unfinished(self._ids)
        return task_id


def _no_task(_task_id: int) -> Task | None:
    return None


__all__ = ["TaskRunner"]
