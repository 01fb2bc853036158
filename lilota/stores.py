"""Stores of the earlier TaskRunner API (see :mod:`lilota.legacy`), over the engine's store.

Both are the engine's :class:`~lilota.store.TaskStore`, read with the old API's methods
(``get_all_tasks()``, ``get_unfinished_tasks()``, ``get_task_by_id(id)``).
``MemoryTaskStore``, served by a ``StoreManager``, keeps tasks for the manager's lifetime
in a temporary SQLite file; ``DatabaseTaskStore(db_url)`` (also named ``SqlTaskStore``)
keeps them in the database that :class:`lilota.Lilota` uses, so
``TaskRunner(DatabaseTaskStore("sqlite:///lilota.db"))`` moves old code to a real database.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.util
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.managers import BaseManager
from types import TracebackType
from typing import Any

from lilota import validation
from lilota.errors import ConfigurationError
from lilota.models import Task, TaskStatus
from lilota.store import TaskStore, is_memory_sqlite, parse_url

TaskInfo = Task
"""The record of a task as the TaskRunner API shows it: the engine's :class:`Task`."""


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
        self._task_store = db_url if isinstance(db_url, TaskStore) else TaskStore(url)

    @property
    def task_store(self) -> TaskStore:
        """The engine's store behind this one (where a TaskRunner adds tasks)."""
        return self._task_store

    @property
    def db_url(self) -> str:
        """The database's URL, password included (worker processes connect with it)."""
        return self.task_store.url.render_as_string(hide_password=False)

    def get_all_tasks(self) -> list[Task]:
        """Every task of the table, oldest first."""
        return self._oldest_first(None)

    def get_unfinished_tasks(self) -> list[Task]:
        """Pending and running tasks, oldest first."""
        return self._oldest_first([TaskStatus.PENDING.value, TaskStatus.RUNNING.value])

    def _oldest_first(self, statuses: list[str] | None) -> list[Task]:
        tasks: list[Task] = []
        before: int | None = None
        while True:
            page = self.task_store.list_tasks(status=statuses, limit=1000, before_id=before)
            tasks.extend(page)
            if len(page) < 1000:
                break
            before = page[-1].id
        tasks.reverse()
        return tasks

    def get_task_by_id(self, id: int) -> Task | None:
        """The task with ``id``, or None. Raises
        :class:`~lilota.errors.InvalidArgumentType` for an id that is not an int."""
        found = validation.task_id(id, "id")
        return None if found is None else self.task_store.get(found)

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


class MemoryTaskStore(DatabaseTaskStore):
    """Tasks for the lifetime of a :class:`StoreManager`, shared with every process.

    ``StoreManager.register("Store", MemoryTaskStore)``, then ``store = manager.Store()``.
    The store lives in the manager's process: there it creates a temporary SQLite file,
    which the TaskRunner and its workers open too (the engine's one store and claim
    path), and removes it when the manager shuts down. ``get_all_tasks()``,
    ``get_task_by_id(id)`` and ``get_unfinished_tasks()`` return
    :class:`~lilota.models.Task` records (``TaskInfo``).
    """

    def __init__(self) -> None:
        # Not DatabaseTaskStore.__init__: the file is made on first use, in the manager's
        # process, so that a MemoryTaskStore made anywhere else leaves nothing behind.
        self._lock = threading.Lock()
        self._file: TaskStore | None = None

    @property
    def task_store(self) -> TaskStore:
        with self._lock:
            if self._file is None:
                directory = tempfile.mkdtemp(prefix="lilota-memory-store-")
                self._file = TaskStore(f"sqlite:///{os.path.join(directory, 'tasks.db')}")
                self._file.ensure_schema()
                # multiprocessing's finalizer, not atexit: the manager's process ends
                # through os._exit after running these. It also runs when the store is
                # dropped.
                multiprocessing.util.Finalize(
                    self, _remove_store, args=(self._file, directory), exitpriority=10
                )
            return self._file

    def database_url(self) -> str:
        """The URL of the temporary SQLite file (what a TaskRunner and its workers open)."""
        return self.db_url


def _remove_store(task_store: TaskStore, directory: str) -> None:
    task_store.dispose()
    shutil.rmtree(directory, ignore_errors=True)


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
        it down) and ends, removing its stores' files, when that process is gone."""
        super().start(_store_server_init, (initializer, tuple(initargs)))


def _store_server_init(
    initializer: Callable[..., object] | None, initargs: tuple[Any, ...]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (the manager's terminate(), or the parent's death below) ends the server's
    # loop like shutdown() does, so that the stores' finalizers run.
    signal.signal(signal.SIGTERM, _exit_server)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_end_with, args=(parent.sentinel,), name="lilota-parent-watch", daemon=True
        ).start()
    if initializer is not None:
        initializer(*initargs)


def _end_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_server(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


__all__ = ["DatabaseTaskStore", "MemoryTaskStore", "SqlTaskStore", "StoreManager", "TaskInfo"]
