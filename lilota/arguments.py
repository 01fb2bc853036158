"""The types of the ``lilota`` command's arguments: each turns the text of one argument
into its value, or raises :class:`argparse.ArgumentTypeError` saying what is accepted (a
usage error, exit status 2)."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

from lilota.models import TaskStatus
from lilota.render import DURATION_UNITS

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w`` (also ``1.5h``, ``1h30m``) as a timedelta.

    Raises ValueError with a message saying what is accepted.
    """
    compact = re.sub(r"\s+", "", text.lower()) if isinstance(text, str) else ""
    if not compact or _DURATION_PART.sub("", compact):
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (s, m, h, d or w), "
            "e.g. 30s, 15m, 12h, 7d, 2w"
        )
    seconds = 0.0
    seen: set[str] = set()
    for number, unit in _DURATION_PART.findall(compact):
        if unit in seen:
            raise ValueError(f"invalid duration {text!r}: the unit {unit!r} appears twice")
        seen.add(unit)
        seconds += float(number) * DURATION_UNITS[unit]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"invalid duration {text!r}: too long") from None


def duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def task_id_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid task id {text!r}: expected a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid task id {text!r}: ids start at 1")
    return value


def positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def status_arg(text: str) -> list[str]:
    known = [s.value for s in TaskStatus]
    statuses = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not statuses:
        raise argparse.ArgumentTypeError(f"expected a status ({', '.join(known)})")
    for status in statuses:
        if status not in known:
            raise argparse.ArgumentTypeError(
                f"unknown status {status!r} (choose from {', '.join(known)})"
            )
    return statuses


def port_arg(text: str) -> int:
    """A TCP port number, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected a number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 1 to 65535")
    return value


__all__ = [
    "duration_arg",
    "parse_duration",
    "port_arg",
    "positive_int_arg",
    "status_arg",
    "task_id_arg",
]
