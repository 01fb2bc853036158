"""Tasks for tests/integration/test_observability.py: one of each kind (a plain function,
one that retries, an ``async def``, a ``cpu_bound`` one, one that schedules a follow-up).

Run by ``lilota worker tests.integration.apps.observed_tasks:app``. When the test names a
file in ``$LILOTA_TEST_SPANS``, importing this module sets up OpenTelemetry's SDK in each
process that imports it (worker processes, their pool processes) with an exporter that
appends every finished span to that file as one JSON line, as an application sets up its
own exporter where its worker processes start.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from lilota import Lilota
from lilota.context import TaskContext

ENV_SPANS = "LILOTA_TEST_SPANS"

app = Lilota(number_of_workers=0)


class Flaky(Exception):
    pass


@app.register("ok")
def ok(data: dict) -> int:
    time.sleep(0.05)
    return int(data["n"])


@app.register("flaky", max_attempts=2, retry_on=Flaky, retry_delay=timedelta(milliseconds=10))
def flaky(data: dict, ctx: TaskContext) -> None:
    raise Flaky(f"attempt {ctx.attempt} of {data['n']}")


@app.register("async-ok")
async def async_ok(data: dict) -> int:
    await asyncio.sleep(0.01)
    return int(data["n"])


@app.register("cpu-ok", cpu_bound=True)
def cpu_ok(data: dict) -> int:
    return sum(range(int(data["n"])))


@app.register("parent")
def parent(data: dict, ctx: TaskContext) -> int:
    return ctx.schedule("ok", {"n": data["n"]})


def span_record(span: Any) -> dict[str, Any]:
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "pid": os.getpid(),
    }


def _export_spans_to(path: str) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class JsonLines(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            with open(path, "a", encoding="utf-8") as out:
                for span in spans:
                    out.write(json.dumps(span_record(span)) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines()))
    trace.set_tracer_provider(provider)


if os.environ.get(ENV_SPANS):
    _export_spans_to(os.environ[ENV_SPANS])
