"""Prometheus metrics (lilota[metrics]): the database collector on both backends, the
dashboard's /metrics and its guard, the worker-side histogram, and what bad input and a
missing extra get. The worker command's endpoint is tested for real in
tests/integration/test_observability.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

import lilota.dashboard as dashboard
from lilota import metrics
from lilota.errors import ConfigurationError, InvalidArgument, InvalidArgumentType
from lilota.models import TaskStatus
from lilota.store import NewTask, Outcome, TaskStore

LEASE = timedelta(minutes=5)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


@pytest.fixture
def store(lilota_db_url: str) -> Iterator[TaskStore]:
    task_store = TaskStore(lilota_db_url)
    task_store.ensure_schema()
    yield task_store
    task_store.dispose()


def fill(store: TaskStore) -> None:
    """report: 2 completed (one after a retry), 1 running, 1 pending due a minute ago, 1
    pending due tomorrow; mail: 1 failed, 1 recovered from a lost worker (pending)."""
    now = store.clock()
    for _ in range(2):
        store.add(NewTask(name="report", max_attempts=3))
    (a, b) = store.claim(worker_id="w", names=["report"], limit=2, lease=LEASE)
    store.finish([Outcome(id=a.id, fence=a.fence, status="completed", output="1")])
    store.finish([Outcome(id=b.id, fence=b.fence, status="pending", run_at=now)])
    (b,) = store.claim(worker_id="w", names=["report"], limit=1, lease=LEASE)
    store.finish([Outcome(id=b.id, fence=b.fence, status="completed", output="1")])
    store.add(NewTask(name="report"))
    store.claim(worker_id="w", names=["report"], limit=1, lease=LEASE)  # left running
    store.add(NewTask(name="report", run_at=now - timedelta(minutes=1)))
    store.add(NewTask(name="report", run_at=now + timedelta(days=1)))
    store.add(NewTask(name="mail"))
    (m,) = store.claim(worker_id="w", names=["mail"], limit=1, lease=LEASE)
    store.finish([Outcome(id=m.id, fence=m.fence, status="failed", exception=None)])
    store.add(NewTask(name="mail", run_at=now + timedelta(hours=1)))
    lost = store.add(NewTask(name="mail", run_at=now + timedelta(days=2)))
    store._run(
        lambda conn: conn.exec_driver_sql(
            f"UPDATE lilota_task SET run_at = created_at WHERE id = {lost}"
        )
    )
    store.claim(worker_id="gone", names=["mail"], limit=1, lease=timedelta(0))
    assert store.recover_expired(before=store.clock() + timedelta(seconds=1)) == [(lost, "pending")]
    store.register_worker("live-1", ["report"])
    store.register_worker("live-2", ["mail"])


def test_the_collector_reads_counts_lag_retries_recoveries_and_workers(store: TaskStore) -> None:
    fill(store)
    got = samples(generate_latest(metrics.registry_for(store)).decode())

    def tasks(name: str) -> dict[str, float]:
        return {
            s.value: got[("lilota_tasks", (("name", name), ("status", s.value)))]
            for s in TaskStatus
        }

    assert tasks("report") == {
        "pending": 2,
        "running": 1,
        "completed": 2,
        "failed": 0,
        "cancelled": 0,
    }
    assert tasks("mail") == {
        "pending": 2,
        "running": 0,
        "completed": 0,
        "failed": 1,
        "cancelled": 0,
    }
    assert got[("lilota_task_retries", (("name", "report"),))] == 1
    assert got[("lilota_task_retries", (("name", "mail"),))] == 0
    assert got[("lilota_task_recoveries", (("name", "mail"),))] == 1
    assert got[("lilota_task_recoveries", (("name", "report"),))] == 0
    # report's oldest due pending task was due a minute ago; mail's recovered task is due
    # since it was created, moments ago; its other pending task is not due.
    assert 60 <= got[("lilota_queue_lag_seconds", (("name", "report"),))] < 600
    assert 0 <= got[("lilota_queue_lag_seconds", (("name", "mail"),))] < 60
    assert got[("lilota_workers_live", ())] == 2


def test_an_empty_database_has_live_workers_zero_and_no_task_series(store: TaskStore) -> None:
    got = samples(generate_latest(metrics.registry_for(store)).decode())
    assert got == {("lilota_workers_live", ()): 0}


def test_the_histogram_is_observed_only_in_a_process_with_a_multiprocess_directory(
    tmp_path: Path,
) -> None:
    # Fresh processes: the histogram is made at a process's first observation.
    program = (
        "from lilota import metrics\n"
        "metrics.observe_attempt('report', 'completed', 0.2)\n"
        "metrics.observe_attempt('report', 'pending', 3.0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(metrics.ENV_DIR, None)
    directory = tmp_path / "metrics"
    directory.mkdir()
    subprocess.run([sys.executable, "-c", program], env=env, check=True)
    assert list(directory.iterdir()) == []
    for _ in range(2):  # two processes: their samples add up
        env[metrics.ENV_DIR] = str(directory)
        subprocess.run([sys.executable, "-c", program], env=env, check=True)
    store = TaskStore(f"sqlite:///{tmp_path / 'empty.db'}")
    got = samples(generate_latest(metrics.registry_for(store, str(directory))).decode())
    store.dispose()
    count = "lilota_task_duration_seconds_count"
    assert got[(count, (("name", "report"), ("outcome", "completed")))] == 2
    assert got[(count, (("name", "report"), ("outcome", "retried")))] == 2  # pending: a retry
    bucket = "lilota_task_duration_seconds_bucket"
    assert got[(bucket, (("le", "0.25"), ("name", "report"), ("outcome", "completed")))] == 2
    assert got[(bucket, (("le", "2.5"), ("name", "report"), ("outcome", "retried")))] == 0


TOKEN = "metrics-token-for-tests"


def test_the_dashboard_serves_metrics_behind_its_token(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(dashboard.ENV_TOKEN, raising=False)
    fill(store)
    with TestClient(dashboard.create_app(store=store, token=TOKEN)) as c:
        refused = c.get("/metrics")
        assert refused.status_code == 401
        assert refused.json() == {"error": "authentication required: log in or send a bearer token"}
        assert c.get("/metrics", headers={"authorization": "Bearer wrong"}).status_code == 401
        scraped = c.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=")
    got = samples(scraped.text)
    assert got[("lilota_tasks", (("name", "report"), ("status", "completed")))] == 2
    assert got[("lilota_workers_live", ())] == 2


def test_the_dashboard_without_prometheus_client_answers_501_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(dashboard.ENV_TOKEN, raising=False)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    store = TaskStore(f"sqlite:///{tmp_path / 'm.db'}")
    store.ensure_schema()
    with TestClient(dashboard.create_app(store=store)) as c:
        answer = c.get("/metrics")
    assert answer.status_code == 501
    assert answer.json() == {
        "error": "lilota's metrics need prometheus_client: pip install 'lilota[metrics]'"
    }
    store.dispose()


@pytest.mark.parametrize(
    ("port", "error", "message"),
    [
        (0, InvalidArgument, "the metrics port must be"),
        (65536, InvalidArgument, "the metrics port must be"),
        ("9100", InvalidArgumentType, "the metrics port must be"),
        (True, InvalidArgumentType, "the metrics port must be"),
    ],
)
def test_a_bad_port_is_refused_naming_it(
    port: Any, error: type[Exception], message: str, tmp_path: Path
) -> None:
    store = TaskStore(f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(error, match=message), metrics.serving(store, "127.0.0.1", port):
        pass
    store.dispose()


def test_a_port_in_use_is_a_configuration_error_naming_it(tmp_path: Path) -> None:
    import socket

    store = TaskStore(f"sqlite:///{tmp_path / 'm.db'}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"),
            metrics.serving(store, "127.0.0.1", port),
        ):
            pass
    assert metrics.ENV_DIR not in os.environ  # the directory it made is gone with it
    store.dispose()


def test_without_prometheus_client_each_entry_point_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    store = TaskStore(f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(metrics.MetricsUnavailable, match=r"pip install 'lilota\[metrics\]'"):
        metrics.registry_for(store)
    with (
        pytest.raises(metrics.MetricsUnavailable, match=r"lilota\[metrics\]"),
        metrics.serving(store, "127.0.0.1", 9100),
    ):
        pass
    store.dispose()


def test_importing_lilota_imports_neither_prometheus_nor_opentelemetry() -> None:
    program = (
        "import sys, lilota, lilota.core, lilota.worker, lilota.execution, lilota.cli\n"
        "from lilota import Lilota\n"
        "app = Lilota('sqlite://')\n"
        "app.schedule('x', {'a': 1})\n"
        "app.schedule_many('x', [1, 2])\n"
        "loaded = [m for m in sys.modules if m.startswith(('prometheus', 'opentelemetry'))]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", program], env=env, check=True)
