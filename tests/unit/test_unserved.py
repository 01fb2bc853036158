"""Pending tasks no live worker runs are visible: in the store, `lilota stats`, the
dashboard's workers API, and a worker's log (issue 14 item 4)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from conftest import FakeClock
from lilota.ledger import LeaseKeeper, Ledger
from lilota.render import collect_stats
from lilota.store import NewTask, TaskStore

LIVE = timedelta(minutes=10)


def test_pending_tasks_of_names_no_live_worker_announced_are_counted(
    store: TaskStore, clock: FakeClock
) -> None:
    store.register_worker("gone", ["old-report"])
    clock.advance(seconds=LIVE.total_seconds() + 1)
    store.register_worker("w1", ["add"])
    for name in ("add", "parse", "parse", "old-report"):
        store.add(NewTask(name=name))
    started = store.add(NewTask(name="typo"))
    store.cancel(started)  # not pending: not counted
    assert store.unserved(LIVE) == {"parse": 2, "old-report": 1}
    stats = collect_stats(store, LIVE)
    assert stats["unserved"] == {"parse": 2, "old-report": 1}
    store.register_worker("w2", ["parse", "old-report"])
    assert store.unserved(LIVE) == {}


def test_a_worker_logs_them_once_per_change(
    store: TaskStore, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = LeaseKeeper(
        store,
        Ledger(),
        worker_id="w1",
        lease=timedelta(seconds=30),
        heartbeat=timedelta(seconds=1),
        cancel_grace=timedelta(seconds=10),
        end_process=lambda code: None,
    )
    store.register_worker("w1", ["add"])
    store.add(NewTask(name="parse"))
    with caplog.at_level(logging.WARNING, logger="lilota"):
        keeper.warn_unserved()
        keeper.warn_unserved()
        store.add(NewTask(name="parse"))
        keeper.warn_unserved()
    messages = [r.getMessage() for r in caplog.records if "no live worker" in r.getMessage()]
    assert messages == [
        "1 pending task named 'parse': no live worker registered 'parse'; they wait until "
        "a worker that registers it starts (or cancel them)",
        "2 pending tasks named 'parse': no live worker registered 'parse'; they wait until "
        "a worker that registers it starts (or cancel them)",
    ]
