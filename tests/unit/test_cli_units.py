"""Pure parts of the command line: durations, startup messages, task JSON."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lilota.cli import (
    CommandError,
    _startup_reason,
    build_parser,
    format_duration,
    parse_duration,
    task_to_dict,
)
from lilota.errors import WorkerStartupError
from lilota.models import Task, TaskError, TaskStatus


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("0s", timedelta(0)),
        ("1.5h", timedelta(minutes=90)),
        ("1h30m", timedelta(minutes=90)),
        ("1d 12h", timedelta(hours=36)),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_parse_duration_accepts_number_unit_pairs(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "7", "d", "7x", "7 days", "-1d", "1h1h", "1,5h", "7d!", "1e3s", "h7", "9" * 400 + "w"],
)
def test_parse_duration_rejects_anything_else_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


@given(
    st.dictionaries(
        st.sampled_from("smhdw"), st.integers(min_value=0, max_value=10_000), min_size=1
    )
)
def test_parse_duration_adds_up_its_parts(parts: dict[str, int]) -> None:
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = "".join(f"{n}{unit}" for unit, n in parts.items())
    assert parse_duration(text) == timedelta(
        seconds=sum(n * seconds[unit] for unit, n in parts.items())
    )


def test_bad_duration_on_the_command_line_is_a_usage_error() -> None:
    with pytest.raises(CommandError) as info:
        build_parser().parse_args(["cleanup", "--older-than", "soon"])
    assert info.value.code == 2
    assert "invalid duration 'soon'" in str(info.value)


def test_parser_takes_db_url_before_or_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--db-url", "sqlite:///a.db", "tasks"])
    after = parser.parse_args(["tasks", "--db-url", "sqlite:///b.db"])
    neither = parser.parse_args(["tasks"])
    assert (before.db_url, after.db_url, neither.db_url) == (
        "sqlite:///a.db",
        "sqlite:///b.db",
        None,
    )
    assert isinstance(neither, argparse.Namespace)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(milliseconds=850), "850ms"),
        (timedelta(seconds=12.34), "12.3s"),
        (timedelta(minutes=4, seconds=5), "4m05s"),
        (timedelta(hours=2, minutes=3, seconds=59), "2h03m"),
        (timedelta(days=3, hours=4), "3d04h"),
        (None, ""),
    ],
)
def test_format_duration_is_short(value: timedelta | None, text: str) -> None:
    assert format_duration(value) == text


def test_startup_reason_keeps_the_exit_status_and_the_workers_last_line() -> None:
    error = WorkerStartupError(
        "worker process 12 (python -c boot) could not start: exit status 1\n"
        "--- end of its output ---\nTraceback (most recent call last):\n"
        "  File \"t.py\", line 1\nModuleNotFoundError: No module named 'x'\n"
    )
    assert _startup_reason(error) == "exit status 1: ModuleNotFoundError: No module named 'x'"
    assert _startup_reason(
        WorkerStartupError("worker 0 was not ready within 60 s (it printed nothing)")
    ) == ("worker 0 was not ready within 60 s (it printed nothing)")


def test_task_to_dict_is_json_with_utc_iso_times() -> None:
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    task = Task(
        id=7,
        name="add",
        status=TaskStatus.FAILED,
        input={"a": 1},
        exception=TaskError(type="ValueError", message="bad", traceback="tb"),
        created_at=start,
        start_date_time=start,
        end_date_time=start + timedelta(seconds=1.5),
        attempts=2,
        max_attempts=3,
    )
    data = json.loads(json.dumps(task_to_dict(task)))
    assert data["status"] == "failed"
    assert data["started_at"] == "2026-01-02T03:04:05+00:00"
    assert data["duration_seconds"] == 1.5
    assert data["exception"] == {"type": "ValueError", "message": "bad", "traceback": "tb"}
    assert (data["attempts"], data["max_attempts"], data["input"]) == (2, 3, {"a": 1})
