"""What the metrics collector reads from the task table at each scrape.

Two grouped queries in one read-only transaction, so a scrape costs the same whoever
asks: tasks counted by name and status, with the attempts beyond the first, the
recoveries, and, for pending tasks already due, the oldest ``run_at``; and the count of
workers with a recent heartbeat. The first reads every row of the table once (the
counts by name and status have no cheaper source); scrape every 15 s or more on a table
of millions of rows, or run ``cleanup()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lilota.dialects.transactions import transaction
from lilota.models import TaskStatus
from lilota.store.schema import task_table, worker_table

if TYPE_CHECKING:
    from lilota.store import TaskStore

_t = task_table.c
PENDING = TaskStatus.PENDING.value


@dataclass
class NameGauges:
    """The gauges of one task name."""

    tasks: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in TaskStatus})
    retries: int = 0  # attempts beyond the first
    recoveries: int = 0  # runs that lost their worker
    lag_seconds: float = 0.0  # now - run_at of the oldest due pending task; 0 if none


@dataclass
class Gauges:
    """The counts of a scrape: by task name, and the live workers."""

    by_name: dict[str, NameGauges]
    live_workers: int


@transaction(read_only=True, schema=True)
def read_gauges(store: TaskStore, conn: Connection, live_within: timedelta) -> Gauges:
    """The gauges of ``store`` now; workers are live if they beat within ``live_within``."""
    now = store.clock()
    due = sa.and_(_t.status == PENDING, _t.run_at <= now)
    query = sa.select(
        _t.name,
        _t.status,
        sa.func.count(),
        sa.func.sum(sa.case((_t.attempts > 1, _t.attempts - 1), else_=0)),
        sa.func.sum(_t.recoveries),
        sa.func.min(sa.case((due, _t.run_at), else_=None)),
    ).group_by(_t.name, _t.status)
    by_name: dict[str, NameGauges] = {}
    for name, status, count, retries, recoveries, oldest in conn.execute(query):
        gauges = by_name.setdefault(name, NameGauges())
        gauges.tasks[status] = int(count)
        gauges.retries += int(retries or 0)
        gauges.recoveries += int(recoveries or 0)
        if oldest is not None:
            gauges.lag_seconds = max(0.0, (now - oldest).total_seconds())
    beats = worker_table.c.heartbeat_at >= now - live_within
    live = conn.execute(sa.select(sa.func.count()).where(beats)).scalar_one()
    return Gauges(by_name=by_name, live_workers=int(live))


__all__ = ["Gauges", "NameGauges", "read_gauges"]
