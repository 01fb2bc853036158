"""The TaskRunner API of lilota's earlier releases, running on the current engine.

Code written for those releases keeps working::

    class LongRunningTask(TaskBase):
        def run(self):
            self.logger.info("working")
            self.set_output(self.task_info.id, {"result": self.task_info.input["x"] + 1})

    StoreManager.register("Store", MemoryTaskStore)
    store_manager = StoreManager(); store_manager.start(); store = store_manager.Store()
    runner = TaskRunner(store)
    runner.register("long_running_task", LongRunningTask)
    runner.start()
    runner.add("long_running_task", "adds one", {"x": 1})
    ...
    runner.stop(); store_manager.shutdown()

The public names are re-exported where the old releases had them: ``TaskBase`` from
:mod:`lilota.models`, ``MemoryTaskStore``/``StoreManager``/``DatabaseTaskStore`` from
:mod:`lilota.stores`, ``TaskRunner`` from :mod:`lilota.runner`.

What is shared with the current engine: a ``TaskBase`` class is run as an ordinary task
function of a :class:`~lilota.registry.Registry` by :func:`lilota.worker.run_task`, so
inputs and outputs go through :mod:`lilota.serialization` (JSON, never pickle), and a task
that raises ends ``failed`` with the same :class:`~lilota.models.TaskError` (type,
message, traceback). Task records are :class:`~lilota.models.Task` objects on both stores
(``TaskInfo`` is another name for it). With a :class:`DatabaseTaskStore` the worker
processes run the engine's own :class:`~lilota.worker.WorkerLoop` (claims, leases, crash
recovery); with the in-memory store they take task ids from a queue and write through the
store's proxy. Worker processes are started with the "spawn" method (never forked), so a
``TaskBase`` subclass must be importable: defined at module level, in ``__main__`` too,
whose code below ``if __name__ == "__main__":`` is not run again in the workers.

Old behaviours kept on purpose: a task's progress is 100 once it has ended, whether it
completed or failed; tasks added before ``start()`` run once it is called.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.managers import BaseManager, BaseProxy
from types import TracebackType
from typing import Any

from lilota import serialization
from lilota.errors import (
    ConfigurationError,
    DatabaseError,
    InvalidInput,
    LilotaError,
    LilotaStopped,
    RegistrationError,
    TaskNotRegistered,
    require_int,
)
from lilota.models import Task, TaskError, TaskProgress, TaskStatus, check_percentage
from lilota.registry import Registry
from lilota.store import (
    Claim,
    NewTask,
    Outcome,
    TaskStore,
    is_memory_sqlite,
    parse_url,
    utcnow,
)
from lilota.worker import WorkerExit, WorkerLoop, WorkerSettings, run_task

log = logging.getLogger(__name__)

TaskInfo = Task
"""The record of a task as the TaskRunner API shows it: the engine's :class:`Task`."""

TASK_LOGGER = "lilota.task"
"""Parent of the loggers of ``TaskBase`` tasks: ``lilota.task.<task name>``."""

# Exit code of an in-memory worker whose store stopped answering (store_manager.shutdown()
# before runner.stop()): starting another worker would not help.
_EXIT_STORE_GONE = 83

# A worker that dies this soon after its start counts towards the restart back-off.
_HEALTHY_AFTER = 10.0
_MAX_BACKOFF = 10.0
# How often the parent looks at its workers (a death is noticed at once through the
# process sentinels; this only bounds how late a pending restart happens).
_MONITOR_TICK = 0.2
_PRUNE_AT = 10_000


class LegacyUsageError(LilotaError, ValueError):
    """The TaskRunner API was used in a way it does not support (the message says how)."""


# --------------------------------------------------------------------------- tasks


class _TaskFields(logging.Filter):
    """Puts ``task_id`` and ``task_name`` on every record of one task's logger."""

    def __init__(self, task_id: int, task_name: str) -> None:
        super().__init__()
        self.task_id = task_id
        self.task_name = task_name

    def filter(self, record: logging.LogRecord) -> bool:
        record.task_id = self.task_id
        record.task_name = self.task_name
        return True


def task_logger(task_name: str, task_id: int) -> logging.Logger:
    """A logger for one run of a task: named ``lilota.task.<name>``, records carry
    ``task_id`` and ``task_name`` (use ``%(task_id)s`` in a format).

    It is not kept in the logging registry (one per task would never be freed); it
    propagates to ``logging.getLogger("lilota.task.<name>")``, whose level and handlers apply.
    """
    parent = logging.getLogger(f"{TASK_LOGGER}.{task_name}")
    logger = logging.Logger(parent.name)
    logger.parent = parent
    logger.addFilter(_TaskFields(task_id, task_name))
    return logger


class TaskBase:
    """Base class of a task of the TaskRunner API: derive from it and implement ``run()``.

    Inside ``run()``: ``self.task_info`` is the task as it was when it started (``id``,
    ``name``, ``description``, ``input``, ``start_date_time``...), ``self.logger`` a
    :class:`logging.Logger` whose records carry the task id, ``self.set_output(id, value)``
    sets the task's output (stored when ``run()`` returns), ``self.set_progress(n)``
    records progress (an int 0..100) at once. An exception raised by ``run()`` ends the
    task ``failed`` with the exception recorded; the runner carries on.
    """

    def __init__(
        self,
        task_info: Task,
        logger: logging.Logger | None = None,
        progress: TaskProgress | None = None,
    ) -> None:
        self.task_info = task_info
        self.logger = logger if logger is not None else task_logger(task_info.name, task_info.id)
        # Prefixed: subclasses of the old API set attributes of their own.
        self._lilota_progress = (
            progress if progress is not None else TaskProgress(task_info.id, _no_write)
        )
        self._lilota_output: Any = None
        self._lilota_output_set = False

    def run(self) -> Any:
        """The task's work. Override it."""
        raise NotImplementedError(f"{type(self).__qualname__} does not implement run()")

    def set_output(self, id: int, output: Any) -> None:
        """Set the output of this task (``id`` is ``self.task_info.id``).

        ``output`` is any value lilota can store as JSON (dicts, lists, numbers, strings,
        dataclasses...); anything else raises :class:`~lilota.errors.SerializationError`
        here, naming the offending field.
        """
        if id != self.task_info.id:
            raise LegacyUsageError(
                f"set_output({id!r}, ...): a task can only set its own output "
                f"(task {self.task_info.id}); pass self.task_info.id"
            )
        serialization.dumps(output, root="output")
        self._lilota_output = output
        self._lilota_output_set = True

    def set_progress(self, progress: int) -> None:
        """Record the task's progress now: an int from 0 to 100 (ValueError otherwise)."""
        self._lilota_progress.set(progress)


def _no_write(_percentage: int) -> None:
    pass


@dataclass(frozen=True)
class _ClassRef:
    """Where a worker process imports a TaskBase subclass from (module and qualname)."""

    module: str
    qualname: str

    @classmethod
    def of(cls, name: str, task_class: object) -> _ClassRef:
        """Check ``task_class`` can be a task; raises RegistrationError saying why not."""
        if not isinstance(task_class, type):
            raise RegistrationError(
                f"task {name!r}: register a class deriving from lilota.models.TaskBase, "
                f"got {task_class!r}"
            )
        what = f"task {name!r}: class {task_class.__qualname__}"
        if not issubclass(task_class, TaskBase):
            raise RegistrationError(f"{what} must derive from lilota.models.TaskBase")
        run = getattr(task_class, "run", None)
        if run is None or run is TaskBase.run or not callable(run):
            raise RegistrationError(f"{what} has no run() method; implement run(self)")
        ref = cls(task_class.__module__, task_class.__qualname__)
        if "<locals>" in ref.qualname:
            raise RegistrationError(
                f"{what} is defined inside a function; worker processes import task "
                "classes, so define it at module level"
            )
        module = sys.modules.get(ref.module)
        if ref.module == "__main__" and not (
            getattr(module, "__file__", None) or getattr(module, "__spec__", None)
        ):
            raise RegistrationError(
                f"{what} is defined in an interactive session, where worker processes "
                "cannot import it; put it in a module or script"
            )
        try:
            found = ref._lookup(module)
        except AttributeError:
            found = None
        if found is not task_class:
            raise RegistrationError(
                f"{what} is not reachable as {ref.module}.{ref.qualname}; worker processes "
                "import task classes by name, so keep it a module-level name"
            )
        return ref

    def _lookup(self, module: object) -> object:
        if module is None:
            raise AttributeError(self.module)
        found: object = module
        for part in self.qualname.split("."):
            found = getattr(found, part)
        return found

    def load(self) -> type[TaskBase]:
        """The class, imported in this process."""
        try:
            found = self._lookup(importlib.import_module(self.module))
        except (ImportError, AttributeError) as e:
            raise RegistrationError(
                f"the worker process cannot import the task class {self.qualname} from "
                f"module {self.module!r}: {type(e).__name__}: {e}"
            ) from e
        if not (isinstance(found, type) and issubclass(found, TaskBase)):
            raise RegistrationError(
                f"{self.module}.{self.qualname} is not a TaskBase subclass in the worker process"
            )
        return found


class _LegacyCall:
    """A TaskBase subclass as a task function of the engine: ``f(input, progress)``."""

    def __init__(
        self,
        name: str,
        ref: _ClassRef,
        describe: Callable[[int], Task | None],
        *,
        progress_on_failure: bool,
    ) -> None:
        self.name = name
        self.ref = ref
        self.describe = describe
        self.progress_on_failure = progress_on_failure
        self.__qualname__ = ref.qualname

    def __call__(self, input: Any, progress: TaskProgress) -> Any:
        try:
            task_class = self.ref.load()
            info = self.describe(progress.task_id)
            if info is None:
                raise LilotaError(f"task {progress.task_id} is not in the store any more")
            task = task_class(info, task_logger(self.name, info.id), progress)
            returned = task.run()
            return task._lilota_output if task._lilota_output_set else returned
        except BaseException:
            if self.progress_on_failure:
                # Old behaviour: an ended task is at 100 %. The database store keeps the
                # progress of a failed attempt, so set it before the failure is recorded.
                with contextlib.suppress(Exception):
                    progress.set(100)
            raise


def _registry_of(
    classes: Mapping[str, _ClassRef],
    describe: Callable[[int], Task | None],
    *,
    progress_on_failure: bool,
) -> Registry:
    registry = Registry()
    for name, ref in classes.items():
        registry.register(
            name,
            _LegacyCall(name, ref, describe, progress_on_failure=progress_on_failure),
            max_attempts=1,  # the old API runs a task once: no retries
        )
    return registry


# --------------------------------------------------------------------------- stores


def _error_text(kind: type[BaseException], message: str) -> str:
    """An exception column value in the engine's format (see TaskError)."""
    name = f"{kind.__module__}.{kind.__qualname__}"
    return json.dumps(TaskError(type=name, message=message).as_dict())


class MemoryTaskStore:
    """Tasks in the memory of one process, shared through a :class:`StoreManager`.

    ``get_all_tasks()``, ``get_task_by_id(id)`` and ``get_unfinished_tasks()`` return
    :class:`~lilota.models.Task` records (``TaskInfo``). The other methods are how a
    :class:`TaskRunner` and its workers write; inputs and outputs are held as the same
    JSON text the database stores. Everything is lost when the manager shuts down.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[int, dict[str, Any]] = {}
        self._next_id = 1

    # ----------------------------------------------------------------- reading

    def get_all_tasks(self) -> list[Task]:
        """Every task, oldest first."""
        with self._lock:
            rows = [dict(r) for r in self._rows.values()]
        return [Task.from_row(r, serialization.loads) for r in rows]

    def get_unfinished_tasks(self) -> list[Task]:
        """Pending and running tasks, oldest first."""
        return [t for t in self.get_all_tasks() if not t.is_final]

    def get_task_by_id(self, id: int) -> Task | None:
        """The task with ``id``, or None."""
        with self._lock:
            row = self._rows.get(id)
            row = None if row is None else dict(row)
        return None if row is None else Task.from_row(row, serialization.loads)

    def delete_task_by_id(self, id: int) -> bool:
        """Forget a task; True if there was one."""
        with self._lock:
            return self._rows.pop(id, None) is not None

    # ----------------------------------------------------------------- writing

    def create_task(
        self, name: str, description: str | None = None, input_json: str | None = None
    ) -> int:
        """Add a pending task; ``input_json`` is text from :func:`lilota.serialization.dumps`."""
        if input_json is not None and not isinstance(input_json, str):
            raise LegacyUsageError("input_json must be JSON text from lilota.serialization")
        now = utcnow()
        with self._lock:
            task_id = self._next_id
            self._next_id += 1
            self._rows[task_id] = {
                "id": task_id,
                "name": name,
                "status": TaskStatus.PENDING.value,
                "description": description,
                "input": input_json,
                "output": None,
                "exception": None,
                "pid": None,
                "progress_percentage": 0,
                "attempts": 0,
                "max_attempts": 1,
                "created_at": now,
                "run_at": now,
                "start_date_time": None,
                "end_date_time": None,
            }
        return task_id

    def start_task(self, task_id: int, pid: int) -> tuple[Claim, Task] | None:
        """Make a pending task running in process ``pid``; None if it is not pending."""
        with self._lock:
            row = self._rows.get(task_id)
            if row is None or row["status"] != TaskStatus.PENDING.value:
                return None
            row.update(
                status=TaskStatus.RUNNING.value,
                pid=pid,
                attempts=row["attempts"] + 1,
                progress_percentage=0,
                start_date_time=utcnow(),
                end_date_time=None,
            )
            snapshot = dict(row)
        claim = Claim(
            id=task_id,
            name=snapshot["name"],
            input=snapshot["input"],
            attempt=snapshot["attempts"],
            max_attempts=snapshot["max_attempts"],
        )
        return claim, Task.from_row(snapshot, serialization.loads)

    def set_progress(self, task_id: int, attempt: int, percentage: int) -> bool:
        """Record the progress of a running attempt; False if it no longer runs."""
        percentage = check_percentage(percentage)
        with self._lock:
            row = self._rows.get(task_id)
            if (
                row is None
                or row["status"] != TaskStatus.RUNNING.value
                or row["attempts"] != attempt
            ):
                return False
            row["progress_percentage"] = percentage
            return True

    def finish(self, outcomes: list[Outcome]) -> int:
        """Record the end of attempts, like :meth:`TaskStore.finish`; a final status also
        sets the progress to 100 (the old behaviour, failures included)."""
        written = 0
        now = utcnow()
        with self._lock:
            for outcome in outcomes:
                row = self._rows.get(outcome.id)
                if (
                    row is None
                    or row["attempts"] != outcome.attempt
                    or row["status"] not in (TaskStatus.PENDING.value, TaskStatus.RUNNING.value)
                ):
                    continue
                pending = outcome.status == TaskStatus.PENDING.value
                row.update(
                    status=outcome.status,
                    output=outcome.output,
                    exception=outcome.exception,
                    end_date_time=None if pending else now,
                    progress_percentage=0 if pending else 100,
                )
                if outcome.run_at is not None:
                    row["run_at"] = outcome.run_at
                written += 1
        return written

    def fail_tasks_of(self, pid: int, message: str) -> list[int]:
        """End the tasks running in process ``pid`` as failed (``WorkerLost``)."""
        from lilota.errors import WorkerLost

        ended = []
        now = utcnow()
        with self._lock:
            for row in self._rows.values():
                if row["status"] == TaskStatus.RUNNING.value and row["pid"] == pid:
                    row.update(
                        status=TaskStatus.FAILED.value,
                        exception=_error_text(WorkerLost, message.format(task_id=row["id"])),
                        end_date_time=now,
                        progress_percentage=100,
                    )
                    ended.append(row["id"])
        return ended

    def ping(self) -> bool:
        return True


class StoreManager(BaseManager):
    """A :class:`multiprocessing.managers.BaseManager` that serves a store to every process.

    ``StoreManager.register("Store", MemoryTaskStore)``, then ``start()`` it and create the
    store with ``manager.Store()``. Its server process is started with "spawn" (not a
    fork of a process that may run threads) unless ``ctx`` says otherwise.
    """

    def __init__(
        self,
        address: Any = None,
        authkey: bytes | None = None,
        serializer: str = "pickle",
        ctx: multiprocessing.context.BaseContext | None = None,
        **kwargs: Any,
    ) -> None:
        if ctx is None:
            ctx = multiprocessing.get_context("spawn")
        super().__init__(address, authkey, serializer, ctx, **kwargs)

    def start(self, initializer: Callable[..., object] | None = None, initargs: Any = ()) -> None:
        """Start the server process. It ignores Ctrl-C (the process that started it shuts
        it down) and ends when that process is gone."""
        super().start(_store_server_init, (initializer, tuple(initargs)))


def _store_server_init(
    initializer: Callable[..., object] | None, initargs: tuple[Any, ...]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _parent_watch(lambda: os._exit(0))
    if initializer is not None:
        initializer(*initargs)


class DatabaseTaskStore:
    """The TaskRunner API on a real database: ``TaskRunner(DatabaseTaskStore(db_url))``.

    Same URLs as :class:`~lilota.core.Lilota` (SQLite file or PostgreSQL), same tables:
    tasks added by a TaskRunner can be read with the current API and the other way round.
    """

    def __init__(self, db_url: str | TaskStore) -> None:
        url = db_url.url if isinstance(db_url, TaskStore) else parse_url(db_url)
        if is_memory_sqlite(url):
            raise ConfigurationError(
                "an in-memory SQLite database cannot be shared with worker processes; use a "
                "file, e.g. 'sqlite:///lilota.db'"
            )
        self.task_store = db_url if isinstance(db_url, TaskStore) else TaskStore(url)
        self.db_url = self.task_store.url.render_as_string(hide_password=False)

    def get_all_tasks(self) -> list[Task]:
        """Every task of the table, oldest first."""
        tasks: list[Task] = []
        before: int | None = None
        while True:
            page = self.task_store.list_tasks(limit=1000, before_id=before)
            tasks.extend(page)
            if len(page) < 1000:
                break
            before = page[-1].id
        tasks.reverse()
        return tasks

    def get_unfinished_tasks(self) -> list[Task]:
        """Pending and running tasks, oldest first."""
        tasks: list[Task] = []
        before: int | None = None
        statuses = [TaskStatus.PENDING.value, TaskStatus.RUNNING.value]
        while True:
            page = self.task_store.list_tasks(status=statuses, limit=1000, before_id=before)
            tasks.extend(page)
            if len(page) < 1000:
                break
            before = page[-1].id
        tasks.reverse()
        return tasks

    def get_task_by_id(self, id: int) -> Task | None:
        """The task with ``id``, or None."""
        return self.task_store.get(id)

    def close(self) -> None:
        """Close this process's database connections (a later call opens new ones)."""
        self.task_store.dispose()

    def __enter__(self) -> DatabaseTaskStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


SqlTaskStore = DatabaseTaskStore
"""Another name for :class:`DatabaseTaskStore`."""


# --------------------------------------------------------------------------- worker side


def _parent_watch(on_death: Callable[[], None]) -> None:
    """Call ``on_death`` (in a thread) when the process that started this one is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        on_death()

    threading.Thread(target=watch, name="lilota-parent-watch", daemon=True).start()


def _child_setup(log_queue: Any, levels: Mapping[str, int]) -> None:
    # Ctrl-C reaches the whole process group; the runner's process decides what to do.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)


def _memory_worker_main(
    store: Any,
    classes: dict[str, _ClassRef],
    tasks: Any,
    log_queue: Any,
    levels: dict[str, int],
) -> None:
    """Body of an in-memory worker process: run the task ids put on ``tasks``."""
    _child_setup(log_queue, levels)
    _parent_watch(lambda: os._exit(WorkerExit.PARENT_DIED))
    running: dict[int, Task] = {}
    registry = _registry_of(classes, running.get, progress_on_failure=False)
    pid = os.getpid()
    while True:
        task_id = tasks.get()
        if task_id is None:
            return
        try:
            started = store.start_task(task_id, pid)
        except (OSError, EOFError) as e:
            log.error("the task store stopped answering (%s); this worker stops", e)
            os._exit(_EXIT_STORE_GONE)
        if started is None:
            continue  # deleted, or no longer pending
        claim, info = started
        definition = registry.get(claim.name)
        running[claim.id] = info

        def write(percentage: int, claim: Claim = claim) -> None:
            if not store.set_progress(claim.id, claim.attempt, percentage):
                log.warning("task %d: progress %d%% not recorded", claim.id, percentage)

        progress = TaskProgress(claim.id, write)
        outcome = run_task(definition, claim, progress=progress)
        del running[claim.id]
        try:
            store.finish([outcome])
        except (OSError, EOFError) as e:
            log.error("the task store stopped answering (%s); this worker stops", e)
            os._exit(_EXIT_STORE_GONE)


def _database_worker_main(
    db_url: str,
    classes: dict[str, _ClassRef],
    stop: Any,
    log_queue: Any,
    levels: dict[str, int],
) -> None:
    """Body of a database worker process: the engine's WorkerLoop on these classes."""
    _child_setup(log_queue, levels)
    store = TaskStore(db_url)
    store.ensure_schema()
    registry = _registry_of(classes, store.get, progress_on_failure=True)
    loop = WorkerLoop(store, registry, WorkerSettings())
    _parent_watch(lambda: loop.abandon(WorkerExit.PARENT_DIED))

    def wait_for_stop() -> None:
        stop.wait()
        loop.request_stop()

    threading.Thread(target=wait_for_stop, name="lilota-stop-watch", daemon=True).start()
    store.register_worker(loop.worker_id, registry.names)
    try:
        loop.run()
    finally:
        with contextlib.suppress(LilotaError):
            store.unregister_worker(loop.worker_id)


# --------------------------------------------------------------------------- runner side


class _Backend:
    """How a TaskRunner adds tasks and what its worker processes run."""

    def add(self, name: str, description: str | None, input_json: str | None) -> int:
        raise NotImplementedError

    def prepare(self) -> None:
        pass


class _MemoryBackend(_Backend):
    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    def add(self, name: str, description: str | None, input_json: str | None) -> int:
        return int(self.proxy.create_task(name, description, input_json))

    def reachable(self) -> bool:
        try:
            return bool(self.proxy.ping())
        except Exception:
            return False


class _DatabaseBackend(_Backend):
    def __init__(self, store: DatabaseTaskStore) -> None:
        self.store = store

    def add(self, name: str, description: str | None, input_json: str | None) -> int:
        return self.store.task_store.add(
            NewTask(name=name, input=input_json, description=description)
        )

    def prepare(self) -> None:
        self.store.task_store.ensure_schema()


_MEMORY_METHODS = ("create_task", "start_task", "set_progress", "finish", "fail_tasks_of", "ping")


def _backend_for(store: object) -> _Backend:
    if isinstance(store, DatabaseTaskStore):
        return _DatabaseBackend(store)
    if isinstance(store, (TaskStore, str)):
        return _DatabaseBackend(DatabaseTaskStore(store))
    if isinstance(store, BaseProxy):
        missing = [m for m in _MEMORY_METHODS if not hasattr(store, m)]
        if missing:
            raise ConfigurationError(
                f"the store {store!r} lacks {', '.join(missing)}: register MemoryTaskStore "
                "(or a subclass) with the StoreManager"
            )
        return _MemoryBackend(store)
    if isinstance(store, MemoryTaskStore):
        raise ConfigurationError(
            "a MemoryTaskStore must be shared with the worker processes through a "
            "StoreManager: StoreManager.register('Store', MemoryTaskStore); "
            "manager = StoreManager(); manager.start(); store = manager.Store()"
        )
    raise ConfigurationError(
        f"TaskRunner needs a store: a MemoryTaskStore served by a StoreManager, or "
        f"DatabaseTaskStore(db_url); got {type(store).__name__}"
    )


def _level_snapshot() -> dict[str, int]:
    """Levels set in this process, for worker processes to send the same records."""
    levels = {"": logging.getLogger().level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _forward_logs(log_queue: Any) -> None:
    """Hand the log records of worker processes to this process's loggers."""
    while True:
        try:
            record = log_queue.get()
        except (EOFError, OSError):
            return
        if record is None:
            return
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


@dataclass
class _Slot:
    index: int
    process: multiprocessing.process.BaseProcess | None = None
    started_at: float = 0.0
    crashes: int = 0
    restart_at: float | None = None
    retired: bool = False


@dataclass
class _Pool:
    """Worker processes of one started TaskRunner, replaced when one dies."""

    ctx: multiprocessing.context.SpawnContext
    target: Callable[..., None]
    args: tuple[Any, ...]
    size: int
    on_exit: Callable[[int, int], bool]  # (pid, exit code) -> may another start?
    log_queue: Any
    slots: list[_Slot] = field(default_factory=list)
    stopping: bool = False
    closed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        with self.cond:
            self.slots = [_Slot(i) for i in range(self.size)]
            for slot in self.slots:
                self._spawn(slot)
        for target, name in (
            (self._monitor, "lilota-runner-monitor"),
            (lambda: _forward_logs(self.log_queue), "lilota-runner-logs"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _spawn(self, slot: _Slot) -> None:
        process = self.ctx.Process(
            target=self.target, args=self.args, name=f"lilota-runner-{slot.index}"
        )
        process.start()
        slot.process = process
        slot.started_at = time.monotonic()
        slot.restart_at = None

    @property
    def pids(self) -> list[int]:
        with self.cond:
            return [
                s.process.pid
                for s in self.slots
                if s.process is not None and s.process.pid is not None and s.process.is_alive()
            ]

    def _monitor(self) -> None:
        while True:
            with self.cond:
                if self.closed:
                    return
                live = {
                    s.process.sentinel: s
                    for s in self.slots
                    if s.process is not None and not s.retired and s.restart_at is None
                }
            if live:
                multiprocessing.connection.wait(list(live), timeout=_MONITOR_TICK)
            else:
                time.sleep(_MONITOR_TICK)
            self._reap()

    def _reap(self) -> None:
        now = time.monotonic()
        with self.cond:
            slots = list(self.slots)
        for slot in slots:
            process = slot.process
            if slot.retired:
                continue
            if slot.restart_at is not None:
                if now >= slot.restart_at:
                    with self.cond:
                        if not self.closed:
                            self._spawn(slot)
                continue
            if process is None or process.exitcode is None:
                continue
            process.join()
            code = process.exitcode
            assert process.pid is not None
            may_restart = self.on_exit(process.pid, code)
            with self.cond:
                if (code == 0 and self.stopping) or not may_restart or self.closed:
                    slot.retired = True
                else:
                    log.error(
                        "worker process %d ended unexpectedly (exit code %s); starting another",
                        process.pid,
                        code,
                    )
                    lived = now - slot.started_at
                    slot.crashes = 1 if lived > _HEALTHY_AFTER else slot.crashes + 1
                    delay = 0.0 if slot.crashes <= 1 else min(0.5 * 2 ** (slot.crashes - 2), 10)
                    slot.restart_at = now + delay
                self.cond.notify_all()

    def wait_retired(self, deadline: float | None) -> bool:
        """Wait until every worker has exited after being told to stop."""
        with self.cond:
            while not all(s.retired for s in self.slots):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(_MONITOR_TICK if left is None else min(left, _MONITOR_TICK))
        return True

    def terminate(self) -> list[int]:
        """Kill the workers still running; returns their pids."""
        killed = []
        with self.cond:
            self.closed = True
            processes = [s.process for s in self.slots if s.process is not None]
        for process in processes:
            if process.is_alive():
                process.kill()
                if process.pid is not None:
                    killed.append(process.pid)
            process.join(timeout=5)
        return killed

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(timeout=5)
        with contextlib.suppress(Exception):
            self.log_queue.put(None)
        for thread in self.threads:
            thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.log_queue.close()
            self.log_queue.join_thread()


class TaskRunner:
    """Runs :class:`TaskBase` tasks in worker processes and records them in a store.

    ``store`` is a :class:`MemoryTaskStore` served by a :class:`StoreManager` (the proxy
    ``manager.Store()``), or a :class:`DatabaseTaskStore` (also a ``TaskStore`` or a
    database URL). ``number_of_workers`` processes run tasks (default: one per CPU).
    """

    def __init__(self, store: Any, number_of_workers: int | None = None) -> None:
        self._backend = _backend_for(store)
        if number_of_workers is None:
            number_of_workers = os.cpu_count() or 1
        number_of_workers = require_int(
            number_of_workers, "number_of_workers", 1, ConfigurationError
        )
        self.store = store
        self.number_of_workers = number_of_workers
        self._classes: dict[str, _ClassRef] = {}
        self._registry = Registry()
        self._lock = threading.RLock()
        self._pool: _Pool | None = None
        self._tasks: Any = None  # memory: queue of task ids for the workers
        self._stop_event: Any = None  # database: tells the workers to stop
        self._waiting: list[int] = []  # memory: ids added before start()
        self._ids: set[int] = set()  # database: ids stop() waits for
        self._stopped = False

    # ------------------------------------------------------------------ registering

    def register(self, name: str, task_class: type[TaskBase]) -> None:
        """Make ``task_class`` (a TaskBase subclass with ``run()``) the task ``name``.

        Raises :class:`~lilota.errors.RegistrationError` for a class that cannot be a task
        or a bad name, :class:`~lilota.errors.TaskAlreadyRegistered` for a name used before.
        """
        ref = _ClassRef.of(name, task_class)
        with self._lock:
            if self._pool is not None:
                raise RegistrationError(
                    f"task {name!r}: register tasks before start(); the worker processes "
                    "are already running"
                )
            self._registry.register(
                name,
                _LegacyCall(name, ref, lambda _id: None, progress_on_failure=False),
                max_attempts=1,
            )
            self._classes[name] = ref

    @property
    def task_names(self) -> frozenset[str]:
        return self._registry.names

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker processes (returns at once; tasks wait until they are up)."""
        with self._lock:
            if self._pool is not None:
                return
            self._backend.prepare()
            ctx = multiprocessing.get_context("spawn")
            log_queue = ctx.Queue()
            classes = dict(self._classes)
            levels = _level_snapshot()
            if isinstance(self._backend, _MemoryBackend):
                self._tasks = ctx.Queue()
                args: tuple[Any, ...] = (
                    self._backend.proxy,
                    classes,
                    self._tasks,
                    log_queue,
                    levels,
                )
                target: Callable[..., None] = _memory_worker_main
            else:
                assert isinstance(self._backend, _DatabaseBackend)
                self._stop_event = ctx.Event()
                args = (self._backend.store.db_url, classes, self._stop_event, log_queue, levels)
                target = _database_worker_main
            pool = _Pool(
                ctx=ctx,
                target=target,
                args=args,
                size=self.number_of_workers,
                on_exit=self._worker_exited,
                log_queue=log_queue,
            )
            pool.start()
            self._pool = pool
            self._stopped = False
            waiting, self._waiting = self._waiting, []
            for task_id in waiting:
                self._tasks.put(task_id)
            atexit.register(self._at_exit)
        log.info(
            "TaskRunner started %d worker processes for %s",
            self.number_of_workers,
            ", ".join(sorted(self._classes)) or "no tasks",
        )

    def _worker_exited(self, pid: int, code: int) -> bool:
        """A worker process ended: fail what it was running (memory store); may another
        start in its place?"""
        backend = self._backend
        if isinstance(backend, _MemoryBackend):
            if code == _EXIT_STORE_GONE or not backend.reachable():
                log.error(
                    "the task store does not answer (was store_manager.shutdown() called "
                    "before runner.stop()?); worker process %d is not replaced",
                    pid,
                )
                return False
            try:
                ended = backend.proxy.fail_tasks_of(
                    pid,
                    f"worker process {pid} running task {{task_id}} ended unexpectedly "
                    f"(exit code {code})",
                )
            except Exception as e:
                log.error("could not record the tasks of worker process %d: %s", pid, e)
                return False
            for task_id in ended:
                log.error(
                    "task %d failed: its worker process %d ended (code %s)", task_id, pid, code
                )
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Wait for the tasks added so far to end, then stop the worker processes.

        After ``timeout`` seconds, workers still running are killed (with the in-memory
        store their tasks end failed; with a database they are recovered like any lost
        task). Afterwards ``add()`` raises :class:`~lilota.errors.LilotaStopped` until
        ``start()`` is called again.
        """
        with self._lock:
            pool, self._pool = self._pool, None
            self._stopped = True
        if pool is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with pool.cond:
            pool.stopping = True
        if isinstance(self._backend, _MemoryBackend):
            for _ in range(pool.size):
                self._tasks.put(None)
        else:
            self._wait_for_added(deadline)
            self._stop_event.set()
        if not pool.wait_retired(deadline):
            killed = pool.terminate()
            log.warning("TaskRunner.stop(): killed worker processes %s after the timeout", killed)
            if isinstance(self._backend, _MemoryBackend):
                for pid in killed:
                    self._worker_exited(pid, -9)  # SIGKILL
        pool.close()
        if self._tasks is not None:
            # The workers are gone: what is left in the queue (after a timeout) is dropped,
            # and its tasks stay pending in the store.
            self._tasks.cancel_join_thread()
            self._tasks.close()
            self._tasks = None
        atexit.unregister(self._at_exit)
        log.info("TaskRunner stopped")

    def _wait_for_added(self, deadline: float | None) -> None:
        assert isinstance(self._backend, _DatabaseBackend)
        store = self._backend.store.task_store
        with self._lock:
            ids = set(self._ids)
        pause = 0.005
        while ids:
            try:
                ids = store.unfinished(ids, due_only=True)
            except DatabaseError as e:
                log.error("TaskRunner.stop(): cannot read the tasks (%s); stopping now", e)
                break
            if not ids or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        with self._lock:
            self._ids.clear()

    def _at_exit(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            log.warning("TaskRunner was not stopped before exit; ending its worker processes")
            pool.terminate()
            pool.close()

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
        pool = self._pool
        return [] if pool is None else pool.pids

    # ------------------------------------------------------------------ adding

    def add(self, name: str, description: str | None = None, input: Any = None) -> int:
        """Add a task to run and return its id.

        ``input`` is stored as JSON (any value :mod:`lilota.serialization` accepts, usually
        a dict); the task reads it back as ``self.task_info.input``. Raises, storing
        nothing: :class:`~lilota.errors.TaskNotRegistered` for an unknown name,
        :class:`~lilota.errors.LilotaStopped` after ``stop()``,
        :class:`~lilota.errors.SerializationError` for input that cannot be stored.
        """
        if self._stopped:
            raise LilotaStopped("this TaskRunner was stopped; call start() again to add tasks")
        if not isinstance(name, str) or name not in self._classes:
            known = ", ".join(sorted(self._classes)) or "none"
            raise TaskNotRegistered(
                f"no task named {name!r} is registered with this TaskRunner (registered: {known})"
            )
        if description is not None and not isinstance(description, str):
            raise InvalidInput(
                f"description must be a string or None, got {type(description).__name__}"
            )
        input_json = serialization.dumps(input, root="input")
        task_id = self._backend.add(name, description, input_json)
        with self._lock:
            if isinstance(self._backend, _MemoryBackend):
                if self._pool is None:
                    self._waiting.append(task_id)
                else:
                    self._tasks.put(task_id)
            else:
                assert isinstance(self._backend, _DatabaseBackend)
                self._ids.add(task_id)
                if len(self._ids) > _PRUNE_AT:
                    self._ids = self._backend.store.task_store.unfinished(self._ids)
        return task_id


__all__ = [
    "TASK_LOGGER",
    "DatabaseTaskStore",
    "LegacyUsageError",
    "MemoryTaskStore",
    "SqlTaskStore",
    "StoreManager",
    "TaskBase",
    "TaskInfo",
    "TaskRunner",
    "task_logger",
]
