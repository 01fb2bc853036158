"""Real network partitions between worker hosts and PostgreSQL.

Each "host" is a Linux network namespace made by the test (tests/integration/netns.py):
the PostgreSQL server in one, worker hosts (a Lilota with its worker processes) in
others, each joined to the server by its own veth pair. A link taken down is a partition
the workers cannot tell from a dead database or a dead switch; nothing is mocked. The
test process reads the task table through the server's Unix socket, which no cut reaches.

Needs root and ``ip netns``; skipped with the reason elsewhere, but never in CI as root.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from lilota import Lilota, TaskStatus
from lilota.pgcluster import running_in_ci
from tests.integration.apps.partition_tasks import app, read_notes
from tests.integration.netns import Lab, unavailable

pytestmark = [pytest.mark.netns, pytest.mark.slow]

# Short leases keep each test well under a minute: a worker cut off for longer than this
# loses its tasks to the others (heartbeat: a third of it).
LEASE = 2.0
# The message of the store when a worker records an outcome whose lease was taken over.
REFUSED = "were not recorded: their lease had been taken over"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = unavailable()
    if reason is not None:
        if running_in_ci() and os.geteuid() == 0:
            pytest.fail(f"the partition tests must run in CI as root: {reason}")
        pytest.skip(reason)
    lab = Lab(tmp_path_factory.mktemp("lab"), hosts=("b", "c"))
    yield lab
    lab.close()


@dataclass
class Partition:
    lab: Lab
    scheduler: Lilota  # in the test process, through the Unix socket: never cut off
    host_url: Callable[[str], str]
    marks: Path
    tmp_path: Path

    def start(self, host: str, workers: int = 1) -> None:
        self.lab.start_host(
            host,
            self.host_url(host),
            workers=workers,
            lease=LEASE,
            env={"LILOTA_TEST_MARKS": str(self.marks)},
        )

    def notes(self, key: str, event: str) -> list[dict[str, Any]]:
        return [n for n in read_notes(self.marks) if n["key"] == key and n["event"] == event]


@pytest.fixture
def partition(lab: Lab, tmp_path: Path) -> Iterator[Partition]:
    """A fresh database on the lab's server; the hosts are stopped and healed after."""
    lab.base = tmp_path
    url, host_url = lab.new_database()
    marks = tmp_path / "marks"
    marks.mkdir()
    scheduler = Lilota(url, number_of_workers=0, registry=app.registry)
    scheduler.store.ensure_schema()
    try:
        yield Partition(lab, scheduler, host_url, marks, tmp_path)
    finally:
        for name in lab.hosts:
            lab.heal(name)
            lab.stop_host(name, timeout=15)
        scheduler.store.dispose()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.05)
    return result


# ----------------------------------------------------------------------------- one host


def test_a_worker_cut_off_longer_than_its_lease_loses_its_task_and_its_late_completion_is_refused(
    partition: Partition,
) -> None:
    p, lab = partition, partition.lab
    p.start("b")
    release = p.tmp_path / "release"
    task_id = p.scheduler.schedule("stamp", {"key": "x", "release": str(release)})
    (first,) = wait_until(lambda: p.notes("x", "start"), "host b to start the task")
    assert (first["host"], first["attempt"]) == ("b", 1)

    lab.cut("b")  # b's link goes down while its task runs
    p.start("c")
    # b cannot renew its lease: once it ran out, c takes the task over (its second run)
    wait_until(lambda: len(p.notes("x", "start")) == 2, "host c to take the task over")
    release.touch()  # both runs return: c's is recorded, b's waits for the database
    done = p.scheduler.wait(task_id, timeout=30)
    wait_until(lambda: p.notes("x", "end") and len(p.notes("x", "end")) == 2, "both runs to end")
    assert done.status is TaskStatus.COMPLETED
    assert (done.attempts, done.recoveries) == (1, 1)  # a recovery, not a retry
    assert (done.output["host"], done.output["attempt"]) == ("c", 2)
    assert REFUSED not in lab.log("b")

    lab.stop_host("c")  # from here on only b can run tasks
    lab.heal("b")
    # b's completion of attempt 1 reaches the database and is refused, fenced...
    wait_until(lambda: REFUSED in lab.log("b"), "host b to record its late completion")
    # ...so the row is still c's, exactly as it was
    assert p.scheduler.get_task_by_id(task_id) == done
    # b noticed and carries on: the same worker process runs the next task
    after = p.scheduler.wait(p.scheduler.schedule("stamp", {"key": "y"}), timeout=30)
    assert after.status is TaskStatus.COMPLETED
    assert (after.output["host"], after.output["pid"]) == ("b", first["pid"])
    assert "Traceback" not in lab.log("b")


# ----------------------------------------------------------------------------- every host


def overlapping_runs(notes: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """Runs of one task, next to each other by start time, whose [start, end] overlap
    (empty exactly when no two runs of a task overlap); a run with no end (its process
    was killed) lasts for ever."""
    runs: dict[tuple[str, str, int, int], list[float]] = {}
    for n in notes:
        run = runs.setdefault((n["key"], n["host"], n["pid"], n["attempt"]), [0.0, float("inf")])
        run[0 if n["event"] == "start" else 1] = n["at"]
    by_key: dict[str, list[tuple[float, float, Any]]] = {}
    for (key, *who), (began, ended) in runs.items():
        by_key.setdefault(key, []).append((began, ended, who))
    found = []
    for key, spans in by_key.items():
        spans.sort(key=lambda s: s[0])
        found += [(key, a[2], b[2]) for a, b in itertools.pairwise(spans) if b[0] < a[1]]
    return found


def test_when_no_worker_can_reach_the_database_for_longer_than_a_lease_no_task_is_lost_or_run_twice_at_once(
    partition: Partition,
) -> None:
    p, lab = partition, partition.lab
    p.start("b", workers=2)
    p.start("c", workers=2)
    pids = {host: lab.worker_pids(host) for host in ("b", "c")}
    during, after = p.tmp_path / "release-during", p.tmp_path / "release-after"
    # Four tasks hold the four workers: two end during the outage, two well after it.
    held = [
        p.scheduler.schedule("stamp", {"key": f"held{i}", "release": str(release)})
        for i, release in enumerate([during, during, after, after])
    ]
    wait_until(lambda: len(read_notes(p.marks)) == 4, "every worker to start a task")
    queued = p.scheduler.schedule_many(
        "stamp", [{"key": f"queued{i}", "seconds": 0.05} for i in range(20)]
    )

    cut_at = time.monotonic()
    for host in ("b", "c"):
        lab.cut(host, at="db")  # the database host's links go down: packets vanish
    during.touch()
    wait_until(
        lambda: all(p.notes(f"held{i}", "end") for i in (0, 1)), "two held tasks to end meanwhile"
    )

    def every_lease_ran_out() -> bool:
        now = datetime.now(timezone.utc)
        tasks = p.scheduler.store.get_many(held).values()
        return all(t.lease_expires_at is not None and t.lease_expires_at < now for t in tasks)

    wait_until(
        lambda: time.monotonic() - cut_at > LEASE and every_lease_ran_out(),
        "the outage to outlast the leases of the held tasks",
    )
    for host in ("b", "c"):
        lab.heal(host)
    # The other two held tasks run on while every queued task is run after the outage:
    # time enough for a worker to take them over, were their holders not let renew.
    wait_until(lambda: not p.scheduler.store.unfinished(queued), "the queued tasks to end")
    after.touch()

    ids = [*held, *queued]
    wait_until(lambda: not p.scheduler.store.unfinished(ids), "every task to end", timeout=60)
    tasks = p.scheduler.store.get_many(ids)
    assert {t.status for t in tasks.values()} == {TaskStatus.COMPLETED}  # none lost
    counts = p.scheduler.store.count_by_status()
    assert counts["pending"] == counts["running"] == 0
    notes = read_notes(p.marks)
    assert overlapping_runs(notes) == []  # none ran twice at the same time
    for task in tasks.values():  # each row is one real run's output
        key = task.input["key"]
        ran = {(n["host"], n["pid"], n["attempt"]) for n in notes if n["key"] == key}
        assert (task.output["host"], task.output["pid"], task.output["attempt"]) in ran
    # the held tasks were not taken away from their workers: each ran once
    assert all(len(p.notes(f"held{i}", "start")) == 1 for i in range(4))
    assert {host: lab.worker_pids(host) for host in ("b", "c")} == pids  # none replaced
