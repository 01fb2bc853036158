"""The TaskRunner API of lilota's earlier releases, as an adapter over the current engine.

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

The API is three modules, the old releases' names: this one adapts ``TaskBase`` classes
(re-exported from :mod:`lilota.models`), :mod:`lilota.runner` holds ``TaskRunner`` and
:mod:`lilota.stores` the stores (``MemoryTaskStore``, ``StoreManager``,
``DatabaseTaskStore``); this module re-exports them all.

Nothing here runs a task. A ``TaskBase`` class is adapted to an ordinary task function of
a :class:`~lilota.registry.Registry`; a ``TaskRunner`` starts its worker processes with the
engine's :class:`~lilota.supervisor.Supervisor`, and each is a
:class:`~lilota.worker.LilotaWorker` (claims, leases, fenced writes, outcomes) on that
registry. Both stores are the engine's :class:`~lilota.store.TaskStore`: a
``DatabaseTaskStore`` on the given database, a ``MemoryTaskStore`` on a temporary SQLite
file that the manager's process creates and removes when it shuts down. So inputs and
outputs are JSON (never pickle), and a task that raises ends ``failed`` with the engine's
:class:`~lilota.models.TaskError`. Worker processes are fresh Python processes (never
forks) that import the main module as multiprocessing's "spawn" does, so a ``TaskBase``
subclass must be importable: defined at module level, in ``__main__`` too, whose code
below ``if __name__ == "__main__":`` is not run again in the workers. Their log records
reach the loggers of the runner's process.

Old behaviours kept on purpose: a task's progress is 100 once it has ended, whether it
completed or failed; tasks added before ``start()`` run once it is called; on the
in-memory store, the tasks of a worker process that dies end failed at once, and another
process takes its place.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lilota import serialization
from lilota.errors import LilotaError, RegistrationError
from lilota.models import Task, TaskProgress
from lilota.registry import Registry
from lilota.stores import DatabaseTaskStore, MemoryTaskStore, SqlTaskStore, StoreManager, TaskInfo

TASK_LOGGER = "lilota.task"
"""Parent of the loggers of ``TaskBase`` tasks: ``lilota.task.<task name>``."""


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
class ClassRef:
    """Where a worker process imports a TaskBase subclass from (module and qualname)."""

    module: str
    qualname: str

    @classmethod
    def of(cls, name: str, task_class: object) -> ClassRef:
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


class LegacyCall:
    """A TaskBase subclass as a task function of the engine: ``f(input, progress)``."""

    def __init__(self, name: str, ref: ClassRef, describe: Callable[[int], Task | None]) -> None:
        self.name = name
        self.ref = ref
        self.describe = describe
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
            # Old behaviour: an ended task is at 100 %. The store keeps the progress of a
            # failed attempt, so set it before the failure is recorded.
            with contextlib.suppress(Exception):
                progress.set(100)
            raise


def registry_of(
    classes: Mapping[str, ClassRef], describe: Callable[[int], Task | None]
) -> Registry:
    registry = Registry()
    for name, ref in classes.items():
        # The old API runs a task once: no retries.
        registry.register(name, LegacyCall(name, ref, describe), max_attempts=1)
    return registry


__all__ = [
    "TASK_LOGGER",
    "DatabaseTaskStore",
    "LegacyUsageError",
    "MemoryTaskStore",
    "SqlTaskStore",
    "StoreManager",
    "TaskBase",
    "TaskInfo",
    "task_logger",
]
