"""Traces in one process (lilota[otel]): what schedule() stores with and without an active
trace, the attempt's span around execute(), a stored context that cannot be read, and a
worker without the OpenTelemetry API. Across real worker processes:
tests/integration/test_observability.py."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lilota import Lilota, execution, tracing
from lilota.models import Claim
from lilota.store import NewTask, TaskStore

LEASE = timedelta(minutes=5)
_exporter = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if not getattr(provider, "_lilota_unit_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        provider._lilota_unit_exporter = True  # type: ignore[attr-defined]
    _exporter.clear()
    yield _exporter
    _exporter.clear()


@pytest.fixture
def app(lilota_db_url: str) -> Iterator[Lilota]:
    lilota = Lilota(lilota_db_url, number_of_workers=0)

    @lilota.register("double")
    def double(data: dict) -> int:
        with trace.get_tracer("test").start_as_current_span("inside"):
            return int(data["n"]) * 2

    yield lilota
    lilota.store.dispose()


def claim_one(store: TaskStore, name: str) -> Claim:
    (claim,) = store.claim(worker_id="w", names=[name], limit=1, lease=LEASE)
    return claim


def run(app: Lilota, claim: Claim) -> str:
    definition = app.registry.get(claim.name)
    call = execution.prepare(claim, definition, store=app.store, cancel_event=threading.Event())
    return execution.execute(call).status


def test_without_an_active_trace_nothing_is_stored_and_no_span_made(
    app: Lilota, spans: InMemorySpanExporter
) -> None:
    app.schedule("double", {"n": 1})
    assert claim_one(app.store, "double").trace_context is None
    assert spans.get_finished_spans() == ()


def test_the_attempt_span_is_a_child_of_the_schedule_span_and_current_in_the_task(
    app: Lilota, spans: InMemorySpanExporter
) -> None:
    with trace.get_tracer("test").start_as_current_span("request") as request:
        task_id = app.schedule("double", {"n": 21})
    claim = claim_one(app.store, "double")
    stored = json.loads(claim.trace_context or "")
    trace_id = format(request.get_span_context().trace_id, "032x")
    assert set(stored) == {"traceparent"} and stored["traceparent"].split("-")[1] == trace_id
    assert run(app, claim) == "completed"
    got = {s.name: s for s in spans.get_finished_spans()}
    assert set(got) == {"request", "schedule double", "run double", "inside"}
    parents = {name: s.parent.span_id if s.parent else None for name, s in got.items()}
    ids = {name: s.get_span_context().span_id for name, s in got.items()}
    assert parents["schedule double"] == ids["request"]
    assert parents["run double"] == ids["schedule double"]
    assert parents["inside"] == ids["run double"]
    assert got["run double"].attributes["messaging.message.id"] == str(task_id)
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached after the attempt


def test_aschedule_and_aschedule_many_store_the_context_of_the_awaiting_request(
    app: Lilota, spans: InMemorySpanExporter
) -> None:
    async def endpoint() -> tuple[int, list[int]]:
        with trace.get_tracer("test").start_as_current_span("request"):
            one = await app.aschedule("double", {"n": 1})
            many = await app.aschedule_many("double", [{"n": 2}, {"n": 3}])
        await app.aclose()  # this event loop's async connections
        return one, many

    one, many = asyncio.run(endpoint())
    got = {s.name: s for s in spans.get_finished_spans()}
    request = got["request"].get_span_context()
    schedules = [s for s in spans.get_finished_spans() if s.name == "schedule double"]
    assert len(schedules) == 2  # one per call, the batch in one span
    assert {s.parent.span_id for s in schedules if s.parent} == {request.span_id}
    claims = app.store.claim(worker_id="w", names=["double"], limit=3, lease=LEASE)
    assert {c.id for c in claims} == {one, *many}
    for claim in claims:
        traceparent = json.loads(claim.trace_context or "")["traceparent"]
        assert traceparent.split("-")[1] == format(request.trace_id, "032x")


def test_an_unreadable_stored_context_is_logged_and_the_task_runs_in_a_new_trace(
    app: Lilota, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    app.store.add(NewTask(name="double", input='{"n": 2}', trace_context="not json"))
    claim = claim_one(app.store, "double")
    with caplog.at_level(logging.WARNING, "lilota.tracing"):
        assert run(app, claim) == "completed"
    assert f"task {claim.id}: its stored trace context is unreadable" in caplog.text
    (attempt,) = [s for s in spans.get_finished_spans() if s.name == "run double"]
    assert attempt.parent is None


def test_a_worker_without_the_api_runs_a_traced_task_untraced(
    app: Lilota, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trace.get_tracer("test").start_as_current_span("request"):
        app.schedule("double", {"n": 3})
    spans.clear()
    claim = claim_one(app.store, "double")
    # As in a process where opentelemetry is not installed: the import fails.
    monkeypatch.setitem(sys.modules, tracing.TRACE_MODULE, None)
    monkeypatch.setattr(tracing, "_missing", False)
    monkeypatch.setattr(trace, "get_tracer", lambda *a, **k: pytest.fail("traced"))
    with tracing.attempt_span(claim) as span:
        pass
    assert span.span is None and tracing._missing
    assert spans.get_finished_spans() == ()
