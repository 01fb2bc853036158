"""What the dashboard's JSON API returns: a task as a list row or a page, a worker, errors.

Built on :meth:`lilota.models.Task.to_json` (the one conversion of a task, shared with the
``lilota`` command), with two additions for the browser: task values made strict JSON
that JavaScript reads without loss (:func:`plain`), and short previews for the list.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal
from typing import Any

from starlette.responses import Response

from lilota.models import Task

# How much of a task's input (and error) a row of the list shows; the task page has it all.
PREVIEW_CHARS = 160
# Deeper nesting than this is shown as "…": the browser does not need it, and a recursion
# limit must not turn a task's odd value into a 500.
MAX_DEPTH = 200
# Bytes are shown as their repr, cut after this many: a blob is not for reading.
MAX_BYTES = 1024
# JavaScript numbers are doubles: wider ints would be shown rounded, so they go as text.
MAX_SAFE_INT = 2**53

# The fields of Task.to_json() a row of the task list shows, in the order it sends them.
_ROW_FIELDS = (
    "id",
    "name",
    "status",
    "progress",
    "description",
    "attempts",
    "max_attempts",
    "priority",
    "created_at",
    "run_at",
    "started_at",
    "ended_at",
)
# What the task page adds to the row's fields (input and output are sent through plain()).
_PAGE_FIELDS = ("exception", "worker_id", "pid", "unique_key", "lease_expires_at")


class JSON(Response):
    """A strict JSON response (no NaN; what JSON has no type for is sent as text)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, default=str).encode()


def error(status_code: int, message: str) -> JSON:
    """``{"error": message}`` with ``status_code``: every refusal of the API looks like this."""
    return JSON({"error": message}, status_code=status_code)


def plain(value: Any, depth: int = 0) -> Any:
    """A decoded task input/output as JSON the browser reads without loss or error."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if abs(value) <= MAX_SAFE_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth > MAX_DEPTH:
        return "…"
    if isinstance(value, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return [plain(v, depth + 1) for v in sorted(value, key=repr)]
    if isinstance(value, (datetime, date, dt_time)):
        return value.isoformat()
    if isinstance(value, (timedelta, Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        text = repr(bytes(value[:MAX_BYTES]))
        return text if len(value) <= MAX_BYTES else text + "…"
    return str(value)


def preview(value: Any) -> str:
    """``value`` as one line of JSON, cut to PREVIEW_CHARS (ending in "…" when cut)."""
    if value is None:
        return ""
    text = json.dumps(plain(value), ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _row(task: Task, data: dict[str, Any]) -> dict[str, Any]:
    row = {key: data[key] for key in _ROW_FIELDS}
    row["duration"] = data["duration_seconds"]
    row["cancel_requested"] = data["cancel_requested"]
    row["input_preview"] = preview(task.input)
    row["error"] = None if task.exception is None else str(task.exception)[:PREVIEW_CHARS]
    return row


def task_summary(task: Task) -> dict[str, Any]:
    """What a row of the task list shows."""
    return _row(task, task.to_json())


def task_detail(task: Task) -> dict[str, Any]:
    """Everything the task page shows."""
    data = task.to_json()
    detail = _row(task, data)
    detail["input"] = plain(data["input"])
    detail["output"] = plain(data["output"])
    detail.update((key, data[key]) for key in _PAGE_FIELDS)
    return detail


def worker_view(worker: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A live worker: who, where, since when and how long since its last heartbeat
    (``now`` and the worker's times are the store's naive UTC)."""
    started_at: datetime | None = worker["started_at"]
    return {
        "id": worker["id"],
        "hostname": worker["hostname"],
        "pid": worker["pid"],
        "started_at": None if started_at is None else started_at.isoformat(),
        "seconds_since_heartbeat": (now - worker["heartbeat_at"]).total_seconds(),
        "task_names": list(worker["task_names"]),
    }
