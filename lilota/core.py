"""Lilota: the application's handle on its tasks (schedule, read, start/stop workers)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, overload

from typing_extensions import Unpack

from lilota import validation
from lilota.asyncapi import AsyncProducer
from lilota.errors import ConfigurationError, LilotaStopped, TaskNotFound
from lilota.handles import (
    In,
    Out,
    Registering,
    ScheduleManyOptions,
    ScheduleOptions,
    TaskHandle,
    TaskRef,
    new_batch,
)
from lilota.hooks import HookDecorators
from lilota.logs import ENV_LOG_LEVEL, log_level_number
from lilota.models import Task, TaskStatus
from lilota.registry import Registry
from lilota.settings import (
    DEFAULT_DB_URL,
    ENV_SETTINGS,
    WorkerSettings,
    check_overrides,
    default_db_url,
    set_logging_level,
)
from lilota.store import TaskStore, is_memory_sqlite, parse_url
from lilota.supervisor import (
    BOOT_INSTANCE_ARGV,
    BOOT_SCRIPT_ARGV,
    ENV_BOOT,
    ENV_SCRIPT,
    Supervisor,
    is_worker_process,
    wait_until_finished,
)
from lilota.validation import check_int
from lilota.worker import LilotaWorker

log = logging.getLogger(__name__)


# Pruning the set of ids this instance scheduled (kept so stop() can wait for them):
# past this many, finished ones are dropped, so a long-running web app holds only its
# unfinished tasks in memory.
_PRUNE_AT = 10_000


class Lilota(Registering, AsyncProducer, HookDecorators):
    """Schedules tasks, reads them back, and runs worker processes.

    ``Lilota(db_url)`` alone is a scheduler (a web app); ``start()`` also starts
    ``number_of_workers`` worker processes that run either ``script_path`` (a script that
    registers tasks on a :class:`~lilota.worker.LilotaWorker` and calls its ``start()``)
    or, without a script, the tasks registered on this instance with :meth:`register`
    (and its hooks: ``@lilota.worker_init``, ``before_task``, ``after_task``,
    ``on_failure``; see :mod:`lilota.hooks`).

    ``log_level`` (``logging_level``, the earlier release's name): the level of the
    ``lilota`` logger here and in the worker processes this instance starts (their log
    lines go to stderr unless the application configured logging; see :mod:`lilota.logs`).
    """

    def __init__(
        self,
        db_url: str | None = None,
        script_path: str | os.PathLike[str] | None = None,
        number_of_workers: int | None = None,
        set_progress_manually: bool = False,
        *,
        lease: timedelta | None = None,
        cancel_grace: timedelta | None = None,
        startup_timeout: float = 60.0,
        registry: Registry | None = None,
        async_concurrency: int | None = None,
        cpu_bound_processes: int | None = None,
        log_level: int | str | None = None,
        logging_level: int | str | None = None,
    ) -> None:
        # The level of the "lilota" logger here, and in the worker processes (shipped).
        self.log_level = set_logging_level(log_level, "log_level", earlier=logging_level)
        if db_url is None:
            db_url = default_db_url()
        self.db_url = str(db_url)
        self._url = parse_url(db_url)
        if script_path is not None:
            if not isinstance(script_path, (str, os.PathLike)):
                raise ConfigurationError(
                    f"script_path must be a path (str or os.PathLike), got {script_path!r}"
                )
            path = os.path.abspath(os.fspath(script_path))
            if not os.path.isfile(path):
                raise ConfigurationError(
                    f"script_path {os.fspath(script_path)!r} is not a file (looked at {path})"
                )
            self.script_path: str | None = path
        else:
            self.script_path = None
        if number_of_workers is None:
            number_of_workers = os.cpu_count() or 1
        self.number_of_workers = check_int(
            number_of_workers, "number_of_workers", 0, error=ConfigurationError
        )
        self.set_progress_manually = bool(set_progress_manually)
        # Worker settings (None: the default of lilota.worker.WorkerSettings): how long a
        # task's claim lasts without renewal (30 s), how long a running task gets to stop
        # by itself after cancel() before its process is replaced (10 s), and per worker
        # process, async tasks at once (10) and pool processes for cpu_bound tasks (1).
        check_overrides(
            lease=lease,
            cancel_grace=cancel_grace,
            async_concurrency=async_concurrency,
            cpu_bound_processes=cpu_bound_processes,
            startup_timeout=startup_timeout,
            registry=registry,
        )
        self.lease = lease
        self.cancel_grace = cancel_grace
        self.async_concurrency = async_concurrency
        self.cpu_bound_processes = cpu_bound_processes
        self.startup_timeout = startup_timeout
        # Tasks can be shared with another instance (its registry), e.g. one per database.
        self.registry = registry if registry is not None else Registry()
        self._store: TaskStore | None = None
        self._async_store = None
        self._supervisor: Supervisor | None = None
        self._scheduled: set[int] = set()
        self._lock = threading.Lock()
        self._stopped = False
        # Where this instance was created: worker processes import that module to find it.
        self._origin = sys._getframe(1).f_globals.get("__name__", "__main__")

    # ------------------------------------------------------------------ tasks

    def _started(self) -> bool:
        return self._supervisor is not None

    @property
    def store(self) -> TaskStore:
        """The task store (created on first use)."""
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = TaskStore(self._url)
        return self._store

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the tables if needed and start the worker processes.

        Returns once every worker is ready to take tasks. Without ``script_path`` and
        registered tasks, or with ``number_of_workers=0``, no process is started (a
        scheduler only). Raises :class:`~lilota.errors.WorkerStartupError` if the workers
        cannot start (the message carries their output).
        """
        if is_worker_process():
            raise ConfigurationError(
                "Lilota.start() was called inside a worker process: the module that creates "
                "the Lilota instance starts it at import time. Call start() under "
                '`if __name__ == "__main__":` (worker processes import your main module).'
            )
        if self.log_level is None and os.environ.get(ENV_LOG_LEVEL):  # checked once, here
            log_level_number(os.environ[ENV_LOG_LEVEL], f"${ENV_LOG_LEVEL}")
        self.store.ensure_schema()
        self._stopped = False
        if self._supervisor is not None:
            return
        if self.number_of_workers == 0:
            log.info("lilota started without worker processes (number_of_workers=0)")
            return
        argv, env = self._worker_command()
        if argv is None:
            log.info("lilota started without worker processes (scheduling only)")
            return
        if is_memory_sqlite(self._url):
            raise ConfigurationError(
                "an in-memory SQLite database cannot be shared with worker processes; use a "
                "file, e.g. db_url='sqlite:///lilota.db'"
            )
        supervisor = Supervisor(
            argv, self.number_of_workers, env=env, startup_timeout=self.startup_timeout
        )
        supervisor.start()
        self._supervisor = supervisor

    def _worker_command(self) -> tuple[list[str] | None, dict[str, str]]:
        settings = WorkerSettings.from_env(
            lease=self.lease,
            cancel_grace=self.cancel_grace,
            async_concurrency=self.async_concurrency,
            cpu_bound_processes=self.cpu_bound_processes,
        )
        env: dict[str, str] = {ENV_SETTINGS: settings.to_json()}
        if self.log_level is not None:
            env[ENV_LOG_LEVEL] = str(self.log_level)
        if self.script_path is not None:
            env[ENV_SCRIPT] = self.script_path
            return list(BOOT_SCRIPT_ARGV), env
        if not len(self.registry):
            return None, env
        env[ENV_BOOT] = json.dumps(self._boot_spec())
        return list(BOOT_INSTANCE_ARGV), env

    def _boot_spec(self) -> dict[str, Any]:
        module_name, attr = self._locate()
        main = sys.modules.get("__main__")
        main_spec = getattr(main, "__spec__", None)
        spec: dict[str, Any] = {
            "module": module_name,
            "attr": attr,
            "sys_path": list(sys.path),
            "db_url": self._url.render_as_string(hide_password=False),
            "set_progress_manually": self.set_progress_manually,
        }
        if main_spec is not None and getattr(main_spec, "name", None):
            spec["main_module"] = main_spec.name.removesuffix(".__main__")
        elif getattr(main, "__file__", None):
            spec["main_path"] = os.path.abspath(main.__file__)  # type: ignore[union-attr,arg-type]
        if module_name == "__main__" and "main_module" not in spec and "main_path" not in spec:
            raise ConfigurationError(
                "tasks registered in an interactive session cannot run in worker processes; "
                "put them in a module or script, or pass script_path="
            )
        return spec

    def _locate(self) -> tuple[str, str]:
        """The module and global name under which worker processes find this instance's
        tasks: the instance itself, or a module-level object sharing its registry."""
        first = [sys.modules.get("__main__"), sys.modules.get(self._origin)]
        for module in [*first, *list(sys.modules.values())]:
            if module is None:
                continue
            try:
                names = list(vars(module).items())
            except TypeError:
                continue
            for attr, value in names:
                # isinstance first: getattr on arbitrary objects (proxies, pytest.mark)
                # can have side effects.
                if value is self or (
                    isinstance(value, (Lilota, LilotaWorker)) and value.registry is self.registry
                ):
                    return module.__name__, attr
        raise ConfigurationError(
            "worker processes find the tasks of a Lilota instance by importing the module "
            "that holds it, but this instance is not a module-level variable. Create it at "
            "module level (lilota = Lilota(...)), or use script_path= with a LilotaWorker script."
        )

    def stop(self, timeout: float | None = None) -> None:
        """Stop the workers gracefully; returns when they have exited.

        Waits until every due task this instance scheduled has ended and every running
        task is finished, then the workers exit. ``timeout`` (seconds) bounds the whole
        wait; what is still running then is killed and its tasks go back to pending when
        their leases expire. An instance without workers stops at once. After stop(),
        ``schedule`` raises :class:`~lilota.errors.LilotaStopped`; reading still works.
        """
        timeout = validation.seconds(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        supervisor, self._supervisor = self._supervisor, None
        self._stopped = True
        if supervisor is None:
            return
        try:
            self._wait_for_scheduled(deadline)
        finally:  # the database may be gone: the workers are stopped all the same
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            supervisor.stop(timeout=left)

    def _wait_for_scheduled(self, deadline: float | None) -> None:
        with self._lock:
            ids = set(self._scheduled)
        wait_until_finished(lambda left: self.store.unfinished(left, due_only=True), ids, deadline)
        with self._lock:
            self._scheduled.clear()

    def __enter__(self) -> Lilota:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ scheduling

    def _known_names(self) -> frozenset[str] | None:
        """The names schedule() accepts; None (any name) when this instance knows no tasks
        (a scheduler beside workers it does not run): they are stored for those workers."""
        names = self.registry.names
        if self._supervisor is not None:
            names = names | self._supervisor.task_names
        return names or None

    def _clock(self) -> datetime:
        # Looked up when a delay needs it: the store is created on first use.
        return self.store.clock()

    def _check_open(self) -> None:
        if self._stopped:
            raise LilotaStopped(
                "this Lilota instance was stopped; call start() again to schedule tasks"
            )

    # By name: the id; by handle (lilota.schedule(report, ReportInput(...))): a TaskRef.
    @overload
    def schedule(
        self, name: TaskHandle[..., Any, In, Out], input: In, **o: Unpack[ScheduleOptions]
    ) -> TaskRef[Out]: ...
    @overload
    def schedule(self, name: str, input: Any = None, **o: Unpack[ScheduleOptions]) -> int: ...

    def schedule(
        self,
        name: str | TaskHandle[..., Any, Any, Any],
        input: Any = None,
        *,
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        priority: int = 0,
        unique_key: str | None = None,
        description: str | None = None,
        max_attempts: int | None = None,
        connection: object = None,
    ) -> int:
        """Store a new pending task and return its id; a worker starts it right away.

        ``input`` is a model instance (dataclass, pydantic, ``as_dict()``) or a dict.
        ``run_at`` (a datetime; naive means UTC) or ``delay`` postpone it; higher
        ``priority`` runs first; with ``unique_key``, while a pending or running task has
        the same key, its id is returned and nothing is added. With ``connection`` (a
        SQLAlchemy ``Connection`` or ORM ``Session`` of the application, on this
        instance's database) the task is written in that transaction: workers see it once
        the application commits, and it is gone if it rolls back.

        Raises, writing nothing: :class:`~lilota.errors.TaskNotRegistered` for an unknown
        name (when this instance knows its tasks), :class:`~lilota.errors.InvalidInput` for
        input that does not fit the input model, :class:`~lilota.errors.SerializationError`
        for input that cannot be stored as JSON, :class:`~lilota.errors.DatabaseUnavailable`,
        :class:`~lilota.errors.InvalidArgumentType` for an argument of the wrong type (a
        ``priority`` that is not an int...) and :class:`~lilota.errors.InvalidArgument` for
        one out of range (``run_at`` with ``delay``, a ``priority`` beyond 32 bits, a
        ``delay`` past the year 9999...), alike on every database. The checks are
        :func:`lilota.registry.new_task`'s. With ``connection``: also
        :class:`~lilota.errors.InvalidArgumentType` for an object that is not a
        ``Connection`` or ``Session``, :class:`~lilota.errors.InvalidArgument` for a closed
        one or one to another database, :class:`~lilota.errors.ConfigurationError` if
        lilota's tables are not created yet (``start()`` creates them).
        """
        options: dict[str, Any] = {"run_at": run_at, "delay": delay, "priority": priority}
        options |= {"unique_key": unique_key, "description": description}
        with new_batch(self, name, input, many=False, max_attempts=max_attempts, **options) as b:
            b.ids = [self.store.add(b.tasks[0], connection=connection)]
        return b.result()[0]  # type: ignore[no-any-return]

    @overload
    def schedule_many(
        self,
        name: TaskHandle[..., Any, In, Out],
        inputs: Iterable[In],
        **o: Unpack[ScheduleManyOptions],
    ) -> list[TaskRef[Out]]: ...
    @overload
    def schedule_many(
        self, name: str, inputs: Iterable[Any], **o: Unpack[ScheduleManyOptions]
    ) -> list[int]: ...

    def schedule_many(
        self,
        name: str | TaskHandle[..., Any, Any, Any],
        inputs: Iterable[Any],
        *,
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        connection: object = None,
    ) -> list[int] | list[TaskRef[Any]]:
        """Schedule one task per input in a single statement; returns their ids in order.

        Every input is checked first: one bad input raises and none is stored. Raises as
        :meth:`schedule` does, and :class:`~lilota.errors.InvalidArgumentType` for
        ``inputs`` that are not an iterable (or are a str, bytes or a mapping). With
        ``connection``, in that transaction, as :meth:`schedule` says.
        """
        options: dict[str, Any] = {"run_at": run_at, "delay": delay, "priority": priority}
        with new_batch(self, name, inputs, many=True, max_attempts=max_attempts, **options) as b:
            b.ids = self.store.add_many(b.tasks, connection=connection)
        return b.result()

    def _remember(self, ids: Sequence[int]) -> None:
        if self._supervisor is None:
            return  # nothing to drain: this instance runs no workers
        with self._lock:
            self._scheduled.update(ids)
            prune = len(self._scheduled) > _PRUNE_AT
        if prune:
            with self._lock:
                snapshot = set(self._scheduled)
            left = self.store.unfinished(snapshot)
            with self._lock:
                self._scheduled -= snapshot - left

    # ------------------------------------------------------------------ reading

    def get_task_by_id(self, task_id: int | str | uuid.UUID) -> Task | None:
        """The task as stored now, or None if there is no task with that id (an int no
        task can have included). A UUID (or its text) finds a task moved over from lilota
        1.x (``lilota migrate --from-1x``) by its 1.x id. Raises
        :class:`~lilota.errors.InvalidArgumentType` for another id that is not an int
        (``"1"``, ``1.5``, ``None``, ``True``)."""
        found = validation.task_key(task_id)
        return None if found is None else self.store.get(found)

    def get_tasks(
        self, *, status: str | TaskStatus | None = None, name: str | None = None, limit: int = 50
    ) -> list[Task]:
        """Tasks newest first, optionally only one status and/or name; at most ``limit``
        (an int >= 0). Raises :class:`~lilota.errors.InvalidArgumentType` for an argument
        of the wrong type, :class:`~lilota.errors.InvalidArgument` for an unknown status or
        a negative ``limit``."""
        wanted = validation.status(status)
        validation.optional_str(name, "name")
        validation.check_int(limit, "limit", 0, validation.MAX_ID)
        return self.store.list_tasks(status=wanted, name=name, limit=limit)

    def wait(self, task_id: int, timeout: float | None = None) -> Task:
        """Block until the task is completed, failed or cancelled; return it.

        Raises TimeoutError after ``timeout`` seconds,
        :class:`~lilota.errors.TaskNotFound` for an unknown id, and
        :class:`~lilota.errors.InvalidArgumentType` / :class:`~lilota.errors.InvalidArgument`
        for an id that is not an int or a ``timeout`` that is not a number >= 0.
        """
        validation.task_id(task_id)
        timeout = validation.seconds(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while True:
            task = self.get_task_by_id(task_id)
            if task is None:
                raise TaskNotFound(f"no task with id {task_id}")
            if task.is_final:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"task {task_id} ({task.name}) is still {task.status} at "
                    f"{task.progress_percentage}% after {timeout} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    # ------------------------------------------------------------------ actions

    def cancel(self, task_id: int) -> TaskStatus:
        """Cancel a task. A pending one becomes cancelled at once and never runs (returns
        ``CANCELLED``); a running one is asked to stop (returns ``RUNNING``): within a
        heartbeat (1 s) its ``TaskProgress.cancelled`` and ``TaskContext.cancelled`` turn
        true, and however it then ends (early, raising, or finishing anyway) it ends
        cancelled and is not retried. If it has not ended within the grace period
        (``cancel_grace``, default 10 s) its process is replaced and it ends cancelled.

        Raises :class:`~lilota.errors.TaskNotFound` (an int no task has),
        :class:`~lilota.errors.TaskAlreadyFinished` for a completed, failed or cancelled
        task, :class:`~lilota.errors.InvalidArgumentType` for an id that is not an int.
        """
        return self.store.cancel(self._existing_id(task_id))

    def retry(self, task_id: int) -> None:
        """Schedule a failed or cancelled task again, keeping its id. Raises
        :class:`~lilota.errors.TaskNotFound`, :class:`~lilota.errors.TaskNotRetryable` for a
        pending, running or completed task, :class:`~lilota.errors.InvalidArgumentType`
        for an id that is not an int."""
        self.store.retry(self._existing_id(task_id))

    @staticmethod
    def _existing_id(task_id: object) -> int:
        found = validation.task_id(task_id)
        if found is None:  # no task can have it: what the store says of a missing id
            raise TaskNotFound(f"no task with id {task_id}")
        return found

    def cleanup(self, older_than: timedelta) -> int:
        """Delete finished tasks that ended more than ``older_than`` ago; returns how many.
        Raises :class:`~lilota.errors.InvalidArgumentType` for ``older_than`` that is not a
        timedelta, :class:`~lilota.errors.InvalidArgument` for a negative one."""
        return self.store.cleanup(validation.duration(older_than, "older_than"))

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of this instance's live worker processes."""
        return [] if self._supervisor is None else self._supervisor.pids


__all__ = ["DEFAULT_DB_URL", "Lilota"]
