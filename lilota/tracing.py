"""OpenTelemetry spans for scheduling a task and for each of its attempts (``lilota[otel]``).

A trace that is active where a task is scheduled continues in the worker that runs it, on
any host and after any restart: :func:`scheduling` opens a producer span around the
insert and the task stores that span's W3C trace context (``traceparent``/``tracestate``
as JSON, the ``trace_context`` column); :func:`attempt_span`, entered by
:mod:`lilota.execution` around every attempt, opens a consumer span whose parent is the
stored context and makes it current while the task runs, so the task's own spans, and
the tasks it schedules with ``ctx.schedule()``, are its children.

Nothing here imports OpenTelemetry unless it is in use: scheduling looks for
``opentelemetry.trace`` among the modules the process imported already and for a valid
current span, and otherwise costs a dictionary lookup; a worker imports the API only for
a task that carries a stored context, or when the process imported it itself. Which
tracer provider and exporter the spans go to is the application's choice (the
OpenTelemetry SDK, set up where the application or its worker processes start); without
one the API's spans record nothing.

Attributes follow OpenTelemetry's messaging conventions: ``messaging.system`` is
``lilota``, the destination is the task name, the message id the task id, and
``lilota.task.attempt`` counts attempts; an attempt that fails or is retried ends with an
error status and an ``exception`` event.
"""

from __future__ import annotations

import json
import logging
import sys
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lilota.models import Claim, Outcome

log = logging.getLogger(__name__)

TRACE_MODULE = "opentelemetry.trace"
SYSTEM = "lilota"
_TRACER_NAME = "lilota"

# After a failed import of the API (not installed), none is tried again in this process.
_missing = False


def _api(import_it: bool) -> ModuleType | None:
    """``opentelemetry.trace`` if this process imported it (with ``import_it``: or it can
    be imported), else None."""
    global _missing
    trace = sys.modules.get(TRACE_MODULE)
    if trace is not None or not import_it or _missing:
        return trace
    try:
        import opentelemetry.trace as trace
    except ImportError:
        _missing = True
        log.debug("a task carries a trace context but opentelemetry-api is not installed")
        return None
    return trace


def _tracer(trace: ModuleType) -> Any:
    from lilota import __version__

    return trace.get_tracer(_TRACER_NAME, __version__)


# ---------------------------------------------------------------------- scheduling


class Scheduling:
    """A producer span around storing tasks (a context manager). ``context`` is the trace
    context to store with them (None: no trace is active, and nothing is recorded)."""

    __slots__ = ("context", "span")

    def __init__(self, span: Any, context: str | None) -> None:
        self.span = span
        self.context = context

    def __enter__(self) -> Scheduling:
        return self

    def scheduled(self, ids: Sequence[int]) -> None:
        """Name the task ids stored (one id: the message id; more: a batch count)."""
        if self.span is None:
            return
        if len(ids) == 1:
            self.span.set_attribute("messaging.message.id", str(ids[0]))
        else:
            self.span.set_attribute("messaging.batch.message_count", len(ids))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.span is None:
            return
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self.span.end()


_NOT_TRACED = Scheduling(None, None)


def scheduling(name: object) -> Scheduling:
    """The span for scheduling tasks named ``name``, if a trace is active here (a shared
    do-nothing one otherwise)."""
    trace = sys.modules.get(TRACE_MODULE)
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return _NOT_TRACED
    from opentelemetry import propagate

    destination = name if isinstance(name, str) else repr(name)
    span = _tracer(trace).start_span(
        f"schedule {destination}",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "schedule",
            "messaging.destination.name": destination,
        },
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return Scheduling(span, json.dumps(carrier, separators=(",", ":")) if carrier else None)


# ---------------------------------------------------------------------- attempts


class Attempt:
    """A consumer span around one attempt, current while it runs (a context manager).
    :meth:`ended` records how it ended."""

    __slots__ = ("claim", "span", "token", "trace")

    def __init__(self, trace: ModuleType | None, claim: Claim | None) -> None:
        self.trace = trace
        self.claim = claim
        self.span: Any = None
        self.token: Any = None

    def __enter__(self) -> Attempt:
        trace, claim = self.trace, self.claim
        if trace is None or claim is None:
            return self
        from opentelemetry import context, propagate

        parent = None
        if claim.trace_context is not None:
            try:
                parent = propagate.extract(json.loads(claim.trace_context))
            except (ValueError, TypeError, AttributeError) as e:
                log.warning("task %d: its stored trace context is unreadable: %s", claim.id, e)
        self.span = _tracer(trace).start_span(
            f"run {claim.name}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "run",
                "messaging.destination.name": claim.name,
                "messaging.message.id": str(claim.id),
                "lilota.task.attempt": claim.attempt,
                "lilota.task.recoveries": claim.recoveries,
            },
        )
        self.token = context.attach(trace.set_span_in_context(self.span))
        return self

    def ended(self, outcome: Outcome) -> Outcome:
        """Record ``outcome`` on the span (an error status unless it completed, or was
        cancelled on request); returns it."""
        if self.span is None:
            return outcome
        from opentelemetry.trace import Status, StatusCode

        retried = outcome.status == "pending"
        self.span.set_attribute("lilota.task.outcome", "retried" if retried else outcome.status)
        if outcome.exception is not None and outcome.status != "cancelled":
            record = json.loads(outcome.exception)
            kind, message = record.get("type", "Exception"), record.get("message", "")
            self.span.add_event("exception", {"exception.type": kind, "exception.message": message})
            self.span.set_status(Status(StatusCode.ERROR, f"{kind}: {message}"))
        return outcome

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.span is None:
            return
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        if error is not None:  # cancelled by a timeout, the process stopping...
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        context.detach(self.token)
        self.span.end()


def attempt_span(claim: Claim) -> Attempt:
    """The span of one attempt of ``claim``: traced when the task carries a trace context
    and the OpenTelemetry API is installed, or when this process uses OpenTelemetry."""
    trace = _api(import_it=claim.trace_context is not None)
    return Attempt(trace, claim if trace is not None else None)


__all__ = ["Attempt", "Scheduling", "attempt_span", "scheduling"]
