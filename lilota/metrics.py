"""Prometheus metrics (the ``lilota[metrics]`` extra): counts from the database, run times
from the workers.

Two sources, so that what is shown is right however many hosts run workers:

* Counts are read from the database when Prometheus scrapes (:class:`DatabaseCollector`,
  two grouped queries of :mod:`lilota.store.gauges`): tasks by name and status, the queue
  lag of each name (now minus the ``run_at`` of its oldest due pending task), attempts
  beyond the first (retries) and lost-worker recoveries of the tasks in the table, and
  the live worker processes. Every endpoint, on any host, serves the same numbers.
* Run times are observed where the tasks run (:class:`RunTimes`, an observer of every
  attempt of a worker process, :mod:`lilota.hooks`; it also sees an attempt the lease
  keeper or the async lane ends for a timeout or a forced cancel): the histogram
  ``lilota_task_duration_seconds`` by task name and outcome. Worker processes are separate
  processes, so it uses prometheus_client's multiprocess mode: each process writes its
  samples to files in the directory named by ``PROMETHEUS_MULTIPROC_DIR``, and the
  endpoint adds them up. ``lilota worker --metrics-port`` makes that directory (a new
  temporary one, removed at exit, unless ``PROMETHEUS_MULTIPROC_DIR`` is set already) and
  hands it to the worker processes; a process without the variable observes nothing, at
  the cost of one check per attempt.

:func:`serving` is what ``lilota worker --metrics-port`` runs; :func:`registry_for` is
what the dashboard's ``/metrics`` serves. prometheus_client is imported only by those
and by a process that observes; without it they raise :class:`MetricsUnavailable`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from lilota.errors import ConfigurationError
from lilota.hooks import add_observer
from lilota.validation import check_int

if TYPE_CHECKING:
    from lilota.hooks import TaskInfo, TaskOutcome
    from lilota.store import TaskStore

log = logging.getLogger(__name__)

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it
DEFAULT_HOST = "127.0.0.1"
# A worker is live if its heartbeat is at most this old: an idle worker beats every lease
# / 3 (10 s with the default 30 s lease), a busy one every second.
LIVE_WITHIN = timedelta(seconds=60)
# Run times from a hundredth of a second to two hours: lilota runs long tasks.
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
# The outcome label of an attempt by the status it ended in ("pending": it will run again).
_OUTCOMES = {"pending": "retried"}


class MetricsUnavailable(ConfigurationError):
    """The ``metrics`` extra (prometheus_client) is not installed."""


def _client() -> Any:
    """prometheus_client, or :class:`MetricsUnavailable` naming the extra."""
    try:
        import prometheus_client
    except ImportError as missing:
        raise MetricsUnavailable(
            "lilota's metrics need prometheus_client: pip install 'lilota[metrics]'"
        ) from missing
    return prometheus_client


# ---------------------------------------------------------------------- in workers

# The histogram of this process: None until the first attempt ends; False when this
# process does not observe (no PROMETHEUS_MULTIPROC_DIR, or no prometheus_client).
_histogram: Any = None
_histogram_lock = threading.Lock()


def observe_attempt(name: str, status: str, seconds: float) -> None:
    """Count one attempt of task ``name`` that ended in ``status`` after ``seconds``."""
    histogram = _histogram if _histogram is not None else _make_histogram()
    if histogram is not False:
        histogram.labels(name, _OUTCOMES.get(status, status)).observe(seconds)


class RunTimes:
    """The observer (:class:`lilota.hooks.Observer`) counting each attempt's run time."""

    def task_started(self, task: TaskInfo) -> None:
        pass

    def task_ended(self, task: TaskInfo, outcome: TaskOutcome) -> None:
        observe_attempt(task.name, outcome.status, outcome.duration)


_run_times = RunTimes()


def observe_run_times() -> None:
    """Count the run times of this worker process's attempts (see :class:`RunTimes`)."""
    add_observer(_run_times)


def _make_histogram() -> Any:
    """This process's histogram, made once (other threads wait for it meanwhile)."""
    global _histogram
    with _histogram_lock:
        if _histogram is None:
            _histogram = _new_histogram()
        return _histogram


def _new_histogram() -> Any:
    if not os.environ.get(ENV_DIR):
        return False
    try:
        client = _client()
    except MetricsUnavailable as e:
        log.warning("run times are not recorded: %s", e)
        return False
    return client.Histogram(
        "lilota_task_duration_seconds",
        "How long attempts of tasks ran, by task name and outcome.",
        ["name", "outcome"],
        buckets=BUCKETS,
        registry=None,  # collected from the files, by the endpoint
    )


# ---------------------------------------------------------------------- at the endpoint


class DatabaseCollector:
    """A prometheus_client collector that reads the counts from ``store`` at each scrape."""

    def __init__(self, store: TaskStore, live_within: timedelta = LIVE_WITHIN) -> None:
        self.store = store
        self.live_within = live_within

    def describe(self) -> list[Any]:
        return []  # nothing is read at registration; the samples come at each scrape

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        seen = self.store.gauges(self.live_within)
        tasks = GaugeMetricFamily(
            "lilota_tasks", "Tasks in the database, by name and status.", labels=["name", "status"]
        )
        lag = GaugeMetricFamily(
            "lilota_queue_lag_seconds",
            "Now minus the run_at of the oldest due pending task, by name (0: none due).",
            labels=["name"],
        )
        retries = GaugeMetricFamily(
            "lilota_task_retries",
            "Attempts beyond the first of the tasks in the database, by name.",
            labels=["name"],
        )
        recoveries = GaugeMetricFamily(
            "lilota_task_recoveries",
            "Runs of the tasks in the database that lost their worker, by name.",
            labels=["name"],
        )
        for name, counts in sorted(seen.by_name.items()):
            for status, count in sorted(counts.tasks.items()):
                tasks.add_metric([name, status], count)
            lag.add_metric([name], counts.lag_seconds)
            retries.add_metric([name], counts.retries)
            recoveries.add_metric([name], counts.recoveries)
        workers = GaugeMetricFamily(
            "lilota_workers_live",
            f"Worker processes with a heartbeat in the last {self.live_within.seconds} s.",
            value=seen.live_workers,
        )
        yield from (tasks, lag, retries, recoveries, workers)


def registry_for(store: TaskStore, directory: str | None = None) -> Any:
    """A registry of the database counts of ``store``, and the run times of the worker
    processes that write to ``directory`` (default: ``$PROMETHEUS_MULTIPROC_DIR``, if
    set). Raises :class:`MetricsUnavailable` without prometheus_client."""
    client = _client()
    from prometheus_client import multiprocess

    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(store))
    directory = directory or os.environ.get(ENV_DIR) or None
    if directory is not None:
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return registry


def check_port(port: object) -> int:
    """``port`` if it is a TCP port number (1 to 65535), else InvalidArgument(Type)."""
    return check_int(port, "the metrics port", 1, 65535)


@contextlib.contextmanager
def serving(store: TaskStore, host: str, port: int) -> Iterator[str]:
    """Serve ``store``'s metrics, and the run times of the worker processes started
    inside the block, on http://``host``:``port``/metrics until the block ends; yields
    the multiprocess directory (see the module docstring). Raises
    :class:`MetricsUnavailable` without prometheus_client, and
    :class:`~lilota.errors.ConfigurationError` when the port cannot be listened on."""
    check_port(port)
    client = _client()
    made = None
    directory = os.environ.get(ENV_DIR)
    if not directory:
        directory = made = tempfile.mkdtemp(prefix="lilota-metrics-")
        os.environ[ENV_DIR] = directory  # the worker processes inherit it
    try:
        try:
            server, thread = client.start_http_server(
                port, addr=host, registry=registry_for(store, directory)
            )
        except OSError as e:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e}"
            ) from e
        log.info("metrics on http://%s:%d/metrics", host, port)
        try:
            yield directory
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
    finally:
        if made is not None:
            os.environ.pop(ENV_DIR, None)
            shutil.rmtree(made, ignore_errors=True)


__all__ = [
    "BUCKETS",
    "ENV_DIR",
    "LIVE_WITHIN",
    "DatabaseCollector",
    "MetricsUnavailable",
    "check_port",
    "observe_attempt",
    "registry_for",
    "serving",
]
