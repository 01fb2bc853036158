"""The checks of the public calls' arguments, in one place, alike on every backend.

A value is checked here before any SQL runs, against the range of the PostgreSQL column
that stores it (SQLite would store a larger int, a longer string or NUL, PostgreSQL
refuses them), so the same call gets the same error on SQLite and on PostgreSQL. A wrong
type is an :class:`~lilota.errors.InvalidArgumentType`, a value out of range an
:class:`~lilota.errors.InvalidArgument`; the message names the argument.

The column ranges are those of ``lilota.store``'s schema: ``priority`` and
``max_attempts`` are ``INTEGER`` (32-bit), task ids ``BIGINT`` (64-bit), ``unique_key`` a
``VARCHAR(255)`` and ``name`` a ``VARCHAR(200)``.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from lilota.errors import InvalidArgument, InvalidArgumentType, LilotaError
from lilota.models import TaskStatus, to_naive_utc

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1  # INTEGER: priority, max_attempts
MAX_ID = 2**63 - 1  # BIGINT: task ids start at 1 and never reach this
# unique_key and schedule_key are VARCHAR(255).
MAX_UNIQUE_KEY = 255
# Task names go into logs, URLs and CLI arguments: printable and bounded (VARCHAR(200)).
NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-/]{1,200}$")
NAME_RULE = "1-200 characters of letters, digits and _ . : - /"


def _type_name(value: object) -> str:
    return type(value).__name__


def _int_rule(minimum: int | None, maximum: int | None) -> str:
    if maximum is None:
        return "an int" if minimum is None else f"an int >= {minimum}"
    return f"an int <= {maximum}" if minimum is None else f"an int from {minimum} to {maximum}"


def check_int(
    value: object,
    name: str,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    error: type[LilotaError] | None = None,
) -> int:
    """Return ``value`` if it is an int (a bool is not) in ``minimum..maximum`` (a bound
    None is open); else raise ``error`` (default: :class:`InvalidArgumentType` for a
    non-int, :class:`InvalidArgument` for an int out of range) naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise (error or InvalidArgumentType)(
            f"{name} must be {_int_rule(minimum, maximum)}, got {value!r} ({_type_name(value)})"
        )
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise (error or InvalidArgument)(
            f"{name} must be {_int_rule(minimum, maximum)}, got {value!r}"
        )
    return value


def task_id(value: object, name: str = "task_id") -> int | None:
    """``value`` as a task id to look up, or None when no task can have it (an int out of
    1..2**63-1, the range of the id column): the caller answers as for a missing id.
    A non-int (a str, a float, None, a bool) is an :class:`InvalidArgumentType`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"{name} must be an int, got {value!r} ({_type_name(value)})")
    return value if 1 <= value <= MAX_ID else None


def task_key(value: object, name: str = "task_id") -> int | str | None:
    """As :func:`task_id`, and a UUID (or its text) names a task moved over from lilota 1.x:
    returned as its canonical text."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise InvalidArgumentType(
                f"{name} must be an int, got {value!r} (str); a str is taken only as the "
                "UUID of a task moved over from lilota 1.x"
            ) from None
    return task_id(value, name)


def optional_str(value: object, name: str) -> str | None:
    """``value`` if it is None or a str, else an :class:`InvalidArgumentType`."""
    if value is not None and not isinstance(value, str):
        raise InvalidArgumentType(
            f"{name} must be a string or None, got {value!r} ({_type_name(value)})"
        )
    return value


def task_name(value: object) -> str:
    """A task name to schedule: a str a task can be registered under."""
    if not isinstance(value, str):
        raise InvalidArgumentType(
            f"name must be a task name (a string), got {value!r} ({_type_name(value)})"
        )
    if not NAME_RE.match(value):
        raise InvalidArgument(f"name must be {NAME_RULE}, got {value!r}")
    return value


def seconds(value: object, name: str) -> float | None:
    """A timeout in seconds: None (no limit) or a real number >= 0 (``inf`` is no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(
            f"{name} must be a number of seconds or None, got {value!r} ({_type_name(value)})"
        )
    if math.isnan(value) or value < 0:
        raise InvalidArgument(f"{name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def duration(value: object, name: str, *, negative: bool = False) -> timedelta:
    """``value`` if it is a timedelta (>= 0 unless ``negative``)."""
    if not isinstance(value, timedelta):
        raise InvalidArgumentType(
            f"{name} must be a timedelta, got {value!r} ({_type_name(value)})"
        )
    if not negative and value < timedelta(0):
        raise InvalidArgument(f"{name} must be a timedelta >= 0, got {value!r}")
    return value


def before(now: datetime, older_than: object, name: str) -> datetime:
    """``now - older_than`` for a timedelta >= 0 (``datetime.min`` when that is before the
    year 1: nothing is older)."""
    delta = duration(older_than, name)
    try:
        return now - delta
    except OverflowError:
        return datetime.min


def when(run_at: object, delay: object, clock: Callable[[], datetime] | None) -> datetime | None:
    """The naive UTC time a new task is due (None: at once), from ``run_at`` (naive means
    UTC) or ``delay`` counted from ``clock()``. Raises :class:`InvalidArgument` for both at
    once, or a time that falls outside the years 1-9999 (what a datetime can hold)."""
    if run_at is not None and delay is not None:
        raise InvalidArgument("pass run_at or delay, not both")
    if run_at is not None:
        if not isinstance(run_at, datetime):
            raise InvalidArgumentType(
                f"run_at must be a datetime, got {run_at!r} ({_type_name(run_at)})"
            )
        try:
            return to_naive_utc(run_at)
        except OverflowError:
            raise InvalidArgument(
                f"run_at {run_at.isoformat()} is outside the years 1-9999 in UTC"
            ) from None
    if delay is None:
        return None
    delta = duration(delay, "delay", negative=True)
    if clock is None:
        raise TypeError("new_task() needs a clock to turn a delay into a time")
    try:
        return clock() + delta
    except OverflowError:
        raise InvalidArgument(
            f"delay {delta} puts the task outside the years 1-9999; pass a shorter delay"
        ) from None


def unique_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentType(
            f"unique_key must be a string or None, got {value!r} ({_type_name(value)})"
        )
    if not 0 < len(value) <= MAX_UNIQUE_KEY:
        raise InvalidArgument(
            f"unique_key must be a string of 1-{MAX_UNIQUE_KEY} characters, got {value!r}"
        )
    return value


def inputs(value: object) -> list[Any]:
    """The inputs of ``schedule_many`` as a list: any iterable but a str, bytes or mapping
    (whose items are characters, bytes or keys, hardly meant as inputs)."""
    if isinstance(value, (str, bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise InvalidArgumentType(
            f"inputs must be an iterable of task inputs (a list...), got {_type_name(value)}"
        )
    return list(value)


def status(value: object) -> str | None:
    """A status filter: None, a :class:`~lilota.models.TaskStatus` or its value."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentType(
            f"status must be a TaskStatus, its name or None, got {value!r} ({_type_name(value)})"
        )
    try:
        return TaskStatus(value).value
    except ValueError:
        known = ", ".join(s.value for s in TaskStatus)
        raise InvalidArgument(f"status must be one of {known}, got {value!r}") from None


__all__ = ["INT32_MAX", "INT32_MIN", "MAX_ID", "MAX_UNIQUE_KEY", "NAME_RE", "check_int"]
