"""Inline mode: run pending tasks in the test's own process and thread, no worker processes.

:func:`run_pending` claims the due pending tasks of a ``Lilota``'s registry one by one, as
a worker claims them, and runs each through the worker's own step,
``lilota.worker.WorkerLoop.run_once``: the same input rebuilding, output and error
serialization, TaskProgress (written to the store) and TaskContext (follow-up tasks go to
the store and are run too), the same retry outcome, the same hooks (``worker_init`` once
in this process, then ``before_task``, ``on_failure``, ``after_task``) and task log
records. :func:`eager` makes ``schedule()`` run them before it returns. Not enforced
inline: task timeouts, and cancellation of a task while it runs (a task cancelled before
it is picked up never runs, as with a worker).

Part of the pytest plugin: import these from :mod:`lilota.testing`, which re-exports them
(and adds the ``lilota_inline`` fixture). A runaway ``run_pending`` fails the test with
``pytest.fail``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from lilota.validation import check_int

if TYPE_CHECKING:
    from lilota.core import Lilota
    from lilota.models import Outcome, Task

__all__ = ["DEFAULT_MAX_RUNS", "eager", "run_pending"]

# The plugin's logger: records of inline runs read as the plugin's, as before this module.
logger = logging.getLogger("lilota.testing")

#: Most task runs of one ``run_pending()`` call without ``limit``: a guard against tasks that
#: schedule tasks forever.
DEFAULT_MAX_RUNS = 1000
# Inline claims are never renewed: a long lease keeps a real worker on the same database
# from taking one back while the test runs it.
_INLINE_LEASE_SECONDS = 3600.0


def _inline_names(lilota: Lilota, names: str | Iterable[str] | None) -> frozenset[str]:
    from lilota.errors import ConfigurationError

    registered = lilota.registry.names
    if not registered:
        raise ConfigurationError(
            "run_pending runs the tasks registered in this process, and this Lilota has "
            "none: create it with registry=<your module-level Lilota>.registry (tasks that "
            "live only in a worker script, script_path=..., cannot run inline)"
        )
    if names is None:
        return registered
    wanted = frozenset([names] if isinstance(names, str) else names)
    unknown = wanted - registered
    if unknown:
        raise ConfigurationError(
            f"run_pending: {', '.join(sorted(unknown))} not registered on this Lilota "
            f"(registered: {', '.join(sorted(registered))})"
        )
    return wanted


def run_pending(
    lilota: Lilota,
    *,
    names: str | Iterable[str] | None = None,
    limit: int | None = None,
    retry_now: bool = True,
    max_runs: int = DEFAULT_MAX_RUNS,
) -> list[Task]:
    """Run the due pending tasks of ``lilota``'s registry in this thread, until none is left.

    Each task is claimed from the database like a worker claims it (highest priority
    first, then run_at, then id), run by the worker's own code (``WorkerLoop.run_once``:
    input rebuilt as the input model, ``TaskProgress`` writing to the database,
    ``TaskContext``), and its outcome recorded: output, or the exception with its
    traceback, or a retry. Tasks scheduled meanwhile (follow-ups from ``ctx.schedule``)
    are run too. Returns the task as recorded after each run, in run order (a task retried
    at once appears once per attempt).

    ``names``: only these task names (default: every name of ``lilota.registry``; other
    tasks stay pending). ``limit``: at most this many runs. ``retry_now``: a task that
    raises with attempts left gets its retry as with a worker (pending again, the
    exception recorded), but due at once, so this call runs it until it completes or has
    used ``max_attempts``; with ``retry_now=False`` the retry is due after its
    ``retry_delay``, as with a worker, and this call leaves it pending. Tasks whose
    ``run_at`` is in the future are not run. Without ``limit``, the test fails if more
    than ``max_runs`` runs would be needed (a task that schedules itself forever).

    Not enforced: the task's ``timeout``, and cancellation while a task runs. ``async``
    tasks run in ``asyncio.run``: call ``run_pending`` from a synchronous test (or through
    ``asyncio.to_thread``), not from inside a running event loop.
    """
    __tracebackhide__ = True
    wanted = _inline_names(lilota, names)
    if limit is not None:
        check_int(limit, "limit", 0)
    store = lilota.store
    store.ensure_schema()
    from datetime import timedelta

    from lilota.settings import WorkerSettings
    from lilota.worker import WorkerLoop

    settings = WorkerSettings(lease=timedelta(seconds=_INLINE_LEASE_SECONDS))
    worker_id = f"inline:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    loop = WorkerLoop(store, lilota.registry, settings, worker_id=worker_id)
    lilota.registry.hooks.run_worker_init()  # once in this process, as in a worker

    def due_now(outcome: Outcome) -> Outcome:
        if outcome.status == "pending" and outcome.run_at is not None:
            return dataclasses.replace(outcome, run_at=store.clock())
        return outcome

    cap = limit if limit is not None else max_runs
    runs: list[Task] = []
    while len(runs) < cap:
        outcomes = loop.run_once(limit=1, names=wanted, adjust=due_now if retry_now else None)
        if not outcomes:
            return runs
        task = store.get(outcomes[0].id)
        if task is None:
            raise LookupError(f"task {outcomes[0].id} disappeared while it ran inline")
        runs.append(task)
    if limit is None and store.has_runnable(wanted):
        counts = collections.Counter(task.name for task in runs)
        pytest.fail(
            f"run_pending ran {len(runs)} tasks and more are still due "
            f"({', '.join(f'{name}: {n}' for name, n in counts.most_common(5))}): does a task "
            "schedule itself (or another) on every run? Pass max_runs= if this many is expected",
            pytrace=False,
        )
    return runs


@contextlib.contextmanager
def eager(
    lilota: Lilota, *, retry_now: bool = True, max_runs: int = DEFAULT_MAX_RUNS
) -> Iterator[Lilota]:
    """Within the ``with`` block, ``lilota.schedule()`` and ``schedule_many()`` store the
    task(s) and then run the due pending tasks inline (:func:`run_pending`) before they
    return the id(s), like Celery's eager mode. A task that fails is recorded as failed,
    not raised: read it with ``lilota.get_task_by_id(task_id)``.

    Patches this one instance (for instance your app's module-level ``Lilota``); the
    original methods come back at the end of the block. A task that schedules through the
    same instance while it runs inline gets its follow-up run after it, not inside it.
    A task scheduled in your transaction (``connection=``) is not run then (it is not
    committed yet): call :func:`run_pending` after the commit; nor are those of
    ``aschedule``. ``retry_now`` and ``max_runs`` are those of :func:`run_pending`.
    """
    state = threading.local()
    original_schedule = lilota.schedule
    original_schedule_many = lilota.schedule_many
    attributes = vars(lilota)
    missing = object()
    saved = {name: attributes.get(name, missing) for name in ("schedule", "schedule_many")}

    def drain() -> None:
        if getattr(state, "running", False):
            return  # the run_pending below this one picks the new task up
        state.running = True
        try:
            run_pending(lilota, retry_now=retry_now, max_runs=max_runs)
        finally:
            state.running = False

    def schedule(*args: Any, **kwargs: Any) -> int:
        task_id: int = original_schedule(*args, **kwargs)
        if kwargs.get("connection") is None:  # else not committed yet: nothing to run
            drain()
        return task_id

    def schedule_many(*args: Any, **kwargs: Any) -> list[int]:
        ids = original_schedule_many(*args, **kwargs)
        if kwargs.get("connection") is None:
            drain()
        return ids

    _inline_names(lilota, None)  # fail now, not at the first schedule()
    attributes["schedule"] = schedule
    attributes["schedule_many"] = schedule_many
    try:
        yield lilota
    finally:
        for name, value in saved.items():
            if value is missing:
                attributes.pop(name, None)
            else:
                attributes[name] = value
