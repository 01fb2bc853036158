"""TaskContext: what a running task can know about itself and do."""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from lilota.models import TaskProgress

if TYPE_CHECKING:
    from lilota.models import Claim


class _TaskLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds the task id to every record's message, and as ``extra`` fields the task id,
    name and attempt (``lilota_task_id``, ``lilota_task_name``, ``lilota_attempt``, the
    names of lilota's own task records; ``task_id``, ``task_name``, ``attempt`` too)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[task {extra['task_id']}] {msg}", kwargs


@dataclass(frozen=True, kw_only=True)
class TaskContext:
    """Handed to a task function that declares a parameter typed ``TaskContext`` (or named
    ``ctx``/``context``).

    ``task_id``, ``name`` and ``attempt`` (1 for the first run) identify the run;
    ``recoveries`` says how many times the task ran before on a worker that was lost (so
    ``attempt > 1 or recoveries`` means it may have run, in part, before);
    ``logger`` writes records that carry the task id; ``progress`` is the task's
    :class:`~lilota.models.TaskProgress`; ``cancelled`` turns true when cancellation
    was requested; ``schedule(...)`` queues a follow-up task in the same database.
    """

    task_id: int
    name: str
    attempt: int
    max_attempts: int
    progress: TaskProgress
    logger: logging.LoggerAdapter  # type: ignore[type-arg]
    # Makes and stores a task (lilota.execution gives the store's and registry's).
    _schedule: Callable[..., int]
    recoveries: int = 0

    @classmethod
    def for_claim(
        cls,
        claim: Claim,
        *,
        progress: TaskProgress,
        schedule: Callable[..., int],
    ) -> TaskContext:
        logger = _TaskLogger(
            logging.getLogger(f"lilota.task.{claim.name}"),
            {
                "task_id": claim.id,
                "task_name": claim.name,
                "attempt": claim.attempt,
                "lilota_task_id": claim.id,
                "lilota_task_name": claim.name,
                "lilota_attempt": claim.attempt,
            },
        )
        return cls(
            task_id=claim.id,
            name=claim.name,
            attempt=claim.attempt,
            max_attempts=claim.max_attempts,
            recoveries=claim.recoveries,
            progress=progress,
            logger=logger,
            _schedule=schedule,
        )

    @property
    def cancelled(self) -> bool:
        """True once someone asked to cancel this task."""
        return self.progress.cancelled

    def schedule(
        self,
        name: str,
        input: Any = None,
        *,
        run_at: datetime | None = None,
        delay: timedelta | None = None,
        priority: int = 0,
        unique_key: str | None = None,
    ) -> int:
        """Queue another task (like :meth:`lilota.core.Lilota.schedule`); returns its id.

        The input is checked against the task's input model when this worker knows the
        task; a name this worker does not know is stored as given if a live worker
        announced it, else refused with :class:`~lilota.errors.TaskNotRegistered`.
        Raises as ``Lilota.schedule`` does, writing nothing.
        """
        return self._schedule(
            name, input, run_at=run_at, delay=delay, priority=priority, unique_key=unique_key
        )

    # seed 004's spelling: ctx.task_manager.queue("name", **params)
    @property
    def task_manager(self) -> TaskContext:
        return self

    def queue(self, name: str, **params: Any) -> int:
        """Queue ``name`` with keyword parameters as its input dict (seed 004's API)."""
        return self.schedule(name, params or None)
