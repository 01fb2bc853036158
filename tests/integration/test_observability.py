"""Metrics and traces across real processes, on both backends: ``lilota worker
--metrics-port`` scraped over HTTP after real tasks ran in its worker processes (sync
lane, async lane, cpu_bound pool), and a web request's trace continued by the worker
process that ran the task it scheduled (spans exported by the worker to a file, see
tests/integration/apps/observed_tasks.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from lilota import Lilota
from tests.integration.apps.observed_tasks import ENV_SPANS
from tests.integration.apps.observed_tasks import app as observed
from tests.integration.test_cli import PATIENCE, REPO, Worker, assert_one_line_error, run_cli

TARGET = "tests.integration.apps.observed_tasks:app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=PATIENCE) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_finished(app: Lilota, ids: list[int]) -> None:
    deadline = time.monotonic() + PATIENCE
    while app.store.unfinished(ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not app.store.unfinished(ids)


@pytest.fixture
def start_worker() -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Worker:
        saved = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})  # start_cli copies this process's environment
        try:
            worker = Worker(TARGET, *args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def test_worker_metrics_endpoint_counts_tasks_and_run_times_after_real_tasks(
    lilota_db_url: str, start_worker: Callable[..., Worker]
) -> None:
    port = free_port()
    worker = start_worker("--db-url", lilota_db_url, "--metrics-port", str(port))
    worker.wait_for(f"metrics on http://127.0.0.1:{port}/metrics")
    worker.wait_for("worker processes running")
    app = Lilota(lilota_db_url, registry=observed.registry, number_of_workers=0)
    ids = [app.schedule("ok", {"n": n}) for n in range(3)]
    ids += [app.schedule("flaky", {"n": 1}), app.schedule("async-ok", {"n": 2})]
    ids += [app.schedule("cpu-ok", {"n": 1000})]
    wait_finished(app, ids)

    got = scrape(port)

    def tasks(name: str, status: str) -> float:
        return got[("lilota_tasks", (("name", name), ("status", status)))]

    assert [tasks("ok", "completed"), tasks("flaky", "failed")] == [3, 1]
    assert [tasks("async-ok", "completed"), tasks("cpu-ok", "completed")] == [1, 1]
    assert got[("lilota_task_retries", (("name", "flaky"),))] == 1
    assert got[("lilota_task_retries", (("name", "ok"),))] == 0
    assert got[("lilota_queue_lag_seconds", (("name", "ok"),))] == 0  # none due and waiting
    assert got[("lilota_workers_live", ())] == 1

    def runs(name: str, outcome: str) -> float:
        key = (("name", name), ("outcome", outcome))
        return got.get(("lilota_task_duration_seconds_count", key), 0)

    # Each attempt observed once, in the process that ran it: the worker's sync lane, its
    # async lane, its cpu_bound pool process.
    assert runs("ok", "completed") == 3
    assert (runs("flaky", "retried"), runs("flaky", "failed")) == (1, 1)
    assert (runs("async-ok", "completed"), runs("cpu-ok", "completed")) == (1, 1)
    assert (
        got[("lilota_task_duration_seconds_sum", (("name", "ok"), ("outcome", "completed")))]
        >= 0.15
    )
    app.store.dispose()


def test_worker_metrics_bad_input_gets_one_line_errors(lilota_sqlite_url: str) -> None:
    url = ["--db-url", lilota_sqlite_url]
    for port, message in [
        ("0", "invalid port '0': expected 1 to 65535"),
        ("http", "invalid port 'http': expected a number"),
    ]:
        result = run_cli("worker", TARGET, "--metrics-port", port, *url)
        assert message in assert_one_line_error(result, code=2)
    burst = run_cli("worker", TARGET, "--burst", "--metrics-port", "9100", *url)
    assert "--metrics-port does not apply to --burst" in assert_one_line_error(burst, code=2)


def test_worker_metrics_port_in_use_is_one_line_error(lilota_sqlite_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "worker", TARGET, "--metrics-port", str(port), "--db-url", lilota_sqlite_url
        )
    line = assert_one_line_error(result)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in line


def test_worker_metrics_without_the_extra_is_one_line_error_naming_it(
    lilota_sqlite_url: str, tmp_path: Path
) -> None:
    # As where prometheus_client is not installed: its import fails in the command.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['prometheus_client'] = None\n"
    )
    path = os.pathsep.join([str(tmp_path), str(REPO)])
    result = run_cli(
        "worker",
        TARGET,
        "--metrics-port",
        str(free_port()),
        "--db-url",
        lilota_sqlite_url,
        env={"PYTHONPATH": path},
    )
    line = assert_one_line_error(result)
    assert line == (
        "lilota: error: lilota's metrics need prometheus_client: pip install 'lilota[metrics]'"
    )


# ---------------------------------------------------------------------- traces

_exporter = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans finished in this process (the SDK is set up once per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if not getattr(provider, "_lilota_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        provider._lilota_test_exporter = True  # type: ignore[attr-defined]
    _exporter.clear()
    yield _exporter
    _exporter.clear()


def read_spans(path: Path, expected: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= expected:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)
    pytest.fail(f"{path} holds fewer than {expected} spans")


def test_a_request_trace_continues_in_the_worker_process_that_runs_its_tasks(
    lilota_db_url: str,
    start_worker: Callable[..., Worker],
    spans: InMemorySpanExporter,
    tmp_path: Path,
) -> None:
    exported = tmp_path / "spans.jsonl"
    worker = start_worker("--db-url", lilota_db_url, env={ENV_SPANS: str(exported)})
    worker.wait_for("worker processes running")
    app = Lilota(lilota_db_url, registry=observed.registry, number_of_workers=0)
    tracer = trace.get_tracer("web")
    with tracer.start_as_current_span("GET /report") as request:
        parent_id = app.schedule("parent", {"n": 5})
        flaky_id = app.schedule("flaky", {"n": 1})
        many = app.schedule_many("async-ok", [{"n": 1}, {"n": 2}])
        cpu_id = app.schedule("cpu-ok", {"n": 10})
    untraced = app.schedule("ok", {"n": 0})  # no trace active: nothing stored, no span
    wait_finished(app, [parent_id, flaky_id, cpu_id, untraced, *many])
    child_id = app.get_task_by_id(parent_id).output

    trace_id = format(request.get_span_context().trace_id, "032x")
    here = {s.name: s for s in spans.get_finished_spans()}
    assert set(here) == {
        "GET /report",
        "schedule parent",
        "schedule flaky",
        "schedule async-ok",
        "schedule cpu-ok",
    }
    scheduled = here["schedule parent"]
    assert scheduled.parent is not None
    assert scheduled.parent.span_id == request.get_span_context().span_id
    assert scheduled.kind is trace.SpanKind.PRODUCER
    assert dict(scheduled.attributes or {}) == {
        "messaging.system": "lilota",
        "messaging.operation.type": "send",
        "messaging.operation.name": "schedule",
        "messaging.destination.name": "parent",
        "messaging.message.id": str(parent_id),
    }
    assert here["schedule async-ok"].attributes["messaging.batch.message_count"] == 2

    def span_id(name: str) -> str:
        return format(here[name].get_span_context().span_id, "016x")

    # In the worker processes: parent, flaky twice, async-ok twice, cpu-ok, and the child
    # the parent scheduled (its schedule span and its run), all in the request's trace;
    # the task scheduled with no trace active runs in a trace of its own (the worker
    # process uses OpenTelemetry), with no parent.
    there = read_spans(exported, 9)
    assert len(there) == 9
    by_name: dict[str, list[dict[str, Any]]] = {}
    for s in there:
        by_name.setdefault(s["name"], []).append(s)
    (alone,) = [s for s in there if s["trace_id"] != trace_id]
    assert alone["name"] == "run ok" and alone["parent_id"] is None
    assert alone["attributes"]["messaging.message.id"] == str(untraced)
    (run_parent,) = by_name["run parent"]
    assert run_parent["parent_id"] == span_id("schedule parent")
    assert run_parent["kind"] == "CONSUMER" and run_parent["status"] == "UNSET"
    assert run_parent["attributes"] == {
        "messaging.system": "lilota",
        "messaging.operation.type": "process",
        "messaging.operation.name": "run",
        "messaging.destination.name": "parent",
        "messaging.message.id": str(parent_id),
        "lilota.task.attempt": 1,
        "lilota.task.recoveries": 0,
        "lilota.task.outcome": "completed",
    }
    # The follow-up scheduled by the task (ctx.schedule) is a child of its run.
    (schedule_child,) = by_name["schedule ok"]
    assert schedule_child["parent_id"] == run_parent["span_id"]
    (run_child,) = [s for s in by_name["run ok"] if s is not alone]
    assert run_child["parent_id"] == schedule_child["span_id"]
    assert run_child["attributes"]["messaging.message.id"] == str(child_id)
    # Both attempts of the flaky task continue the request; each failed attempt is an error.
    flaky = sorted(by_name["run flaky"], key=lambda s: s["attributes"]["lilota.task.attempt"])
    assert [s["parent_id"] for s in flaky] == [span_id("schedule flaky")] * 2
    assert [s["attributes"]["lilota.task.outcome"] for s in flaky] == ["retried", "failed"]
    assert [s["status"] for s in flaky] == ["ERROR", "ERROR"]
    # The async lane and the cpu_bound pool process continue it too.
    assert [s["parent_id"] for s in by_name["run async-ok"]] == [span_id("schedule async-ok")] * 2
    (run_cpu,) = by_name["run cpu-ok"]
    assert run_cpu["parent_id"] == span_id("schedule cpu-ok")
    assert run_cpu["pid"] != run_parent["pid"]  # in the pool process
    app.store.dispose()


def test_a_stored_trace_context_survives_a_restart_of_the_worker(
    lilota_db_url: str,
    start_worker: Callable[..., Worker],
    spans: InMemorySpanExporter,
    tmp_path: Path,
) -> None:
    app = Lilota(lilota_db_url, registry=observed.registry, number_of_workers=0)
    with trace.get_tracer("web").start_as_current_span("POST /later"):
        task_id = app.schedule("ok", {"n": 1})
    (scheduled,) = [s for s in spans.get_finished_spans() if s.name == "schedule ok"]
    # No worker ran yet: the context waits in the database until one starts.
    exported = tmp_path / "spans.jsonl"
    worker = start_worker("--db-url", lilota_db_url, env={ENV_SPANS: str(exported)})
    worker.wait_for("worker processes running")
    wait_finished(app, [task_id])
    (run,) = read_spans(exported, 1)
    assert run["name"] == "run ok"
    assert run["trace_id"] == format(scheduled.get_span_context().trace_id, "032x")
    assert run["parent_id"] == format(scheduled.get_span_context().span_id, "016x")
    app.store.dispose()


# ---------------------------------------------------------------------- the README's examples

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def readme_block(first_line: str) -> str:
    """The README's Python block whose first line is ``first_line``."""
    for block in re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL):
        if block.startswith(first_line):
            return str(block)
    pytest.fail(f"no README block starts with {first_line!r}")


def test_the_readme_tracing_example_runs_and_continues_the_trace_in_the_worker(
    tmp_path: Path,
) -> None:
    (tmp_path / "traced.py").write_text(readme_block("# traced.py"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "traced.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "42"
    spans = {}
    for text in re.findall(r"^\{\n.*?^\}$", result.stdout, flags=re.DOTALL | re.MULTILINE):
        span = json.loads(text)
        spans[span["name"]] = span
    assert set(spans) == {"GET /double", "schedule double", "run double", "compute"}
    assert len({s["context"]["trace_id"] for s in spans.values()}) == 1
    for child, parent in [
        ("schedule double", "GET /double"),
        ("run double", "schedule double"),
        ("compute", "run double"),
    ]:
        assert spans[child]["parent_id"] == spans[parent]["context"]["span_id"]


def test_the_readme_own_app_metrics_example_serves_the_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.testclient import TestClient

    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(readme_block("from prometheus_client import make_asgi_app"), namespace)
    namespace["lilota"].store.ensure_schema()
    with TestClient(namespace["app"]) as client:
        answer = client.get("/metrics/")
    assert answer.status_code == 200
    assert "lilota_workers_live 0.0" in answer.text
    namespace["lilota"].store.dispose()
