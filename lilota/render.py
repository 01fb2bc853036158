"""What the ``lilota`` command shows: tables, task pages, the progress bar, JSON, errors.

:mod:`lilota.cli` parses the command line and runs the commands; everything they print
is drawn here: rich tables and panels for people, ``--json`` for programs, one line on
stderr for a failure (:class:`CommandError`), and the exit statuses. Times are shown in
UTC, durations as ``4m05s``. rich is imported only when something is drawn with it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from lilota.models import Task, TaskStatus

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from lilota.store import TaskStore

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TASK_FAILED = 3
EXIT_TASK_CANCELLED = 4
EXIT_INTERRUPTED = 130

# Seconds in each unit a duration is written with (``parse_duration`` reads the same).
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_UNIT_NAMES = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week"}

# `stats` shows how many tasks finished in each of these windows (minutes): a short one
# for "right now", a long one for a trend; each is one indexed range count.
FINISHED_WINDOWS = (5, 15, 60)

# Below this console width the task list leaves out "started": three full timestamps
# do not fit, and `lilota show` has it (ended and duration say the rest).
WIDE_TABLE = 130

STATUS_STYLE = {
    "pending": "yellow",
    "running": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}


class CommandError(Exception):
    """A failure reported as one line ``lilota: error: <message>`` and exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- plain text


def one_line(message: str) -> str:
    """``message`` with its lines joined by spaces (an error must fit one line)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def report_error(message: str) -> None:
    """Write ``lilota: error: <message>`` as one line on stderr."""
    sys.stderr.write(f"lilota: error: {one_line(message) or 'unknown error'}\n")
    sys.stderr.flush()


def say(line: str) -> None:
    """Write one line on stdout at once (a pipe sees it while the command still runs)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout; what JSON has no type for is written as text."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def iso(value: datetime | None) -> str | None:
    """ISO 8601 with the offset; the store's own naive values are UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def format_duration(value: timedelta | None) -> str:
    """A short human duration: ``850ms``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    if value is None:
        return ""
    seconds = value.total_seconds()
    if seconds < 0:
        return "-" + format_duration(-value)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def describe_duration(value: timedelta) -> str:
    """A duration in words, in its largest whole unit: ``1 hour``, ``90 minutes``."""
    seconds = value.total_seconds()
    for unit in ("w", "d", "h", "m", "s"):
        size = DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {_UNIT_NAMES[unit]}{'' if count == 1 else 's'}"
    return f"{seconds:g} seconds"


def final_line(task: Task) -> str:
    """``task 7 (add) failed after 1.5s: ValueError: bad``: how a task ended."""
    line = f"task {task.id} ({task.name}) {task.status.value}"
    if task.duration is not None:
        line += f" after {format_duration(task.duration)}"
    if task.exception is not None and task.status.value != "completed":
        line += f": {one_line(str(task.exception))}"
    return line


# ---------------------------------------------------------------------- rich pieces


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr); 200 columns wide when not a terminal."""
    try:
        from rich.console import Console
    except ImportError:  # pragma: no cover - rich is a dependency
        raise CommandError("this command needs rich: pip install 'rich>=13'") from None
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if not stream.isatty() and "COLUMNS" not in os.environ:
        width = 200  # piped into grep or a file: do not squeeze the columns to 80
    return Console(file=stream, width=width, stderr=stderr, highlight=False)


def _text(value: object, style: str = "") -> Text:
    # Text, not a str: rich would read "[...]" in a task's name or input as markup.
    from rich.text import Text

    return Text("" if value is None else str(value), style=style)


def _status_text(status: str) -> Text:
    return _text(status, STATUS_STYLE.get(status, ""))


def _when(value: datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _elapsed(task: Task, now: datetime) -> str:
    if task.duration is not None:
        return format_duration(task.duration)
    if task.status.value == "running" and task.start_date_time is not None:
        return format_duration(now - task.start_date_time) + "+"
    return ""


# ---------------------------------------------------------------------- tasks, show


def print_tasks(tasks: Sequence[Task], filters: str, limit: int) -> None:
    """The task list as a table (``filters`` describes the selection, e.g. `` (name add)``)."""
    out = console()
    if not tasks:
        out.print("no tasks" + filters)
        return
    wide = out.width >= WIDE_TABLE
    out.print(_tasks_table(tasks, f"Tasks{filters}, newest first (times in UTC)", wide))
    if len(tasks) == limit:
        out.print(f"(first {limit}; use --limit to see more)", style="dim")


def _tasks_table(tasks: Sequence[Task], title: str, wide: bool) -> Table:
    from rich.table import Table

    now = datetime.now(timezone.utc)
    table = Table(title=title)
    table.add_column(
        "id", justify="right", no_wrap=True, min_width=max(len(str(t.id)) for t in tasks)
    )
    # no_wrap like the others: rich shrinks a wrapping column first, and in a terminal
    # narrower than the timestamps it squeezed the name, the column read first, to nothing.
    table.add_column("name", no_wrap=True, min_width=min(24, max(len(t.name) for t in tasks)))
    table.add_column("status", no_wrap=True)
    table.add_column("progress", justify="right", no_wrap=True)
    table.add_column("attempts", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    if wide:
        table.add_column("started", no_wrap=True)
    table.add_column("ended", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    for t in tasks:
        started = [_text(_when(t.start_date_time))] if wide else []
        table.add_row(
            _text(t.id),
            _text(t.name),
            _status_text(t.status.value),
            _text(f"{t.progress_percentage}%"),
            _text(f"{t.attempts}/{t.max_attempts}"),
            _text(_when(t.created_at)),
            *started,
            _text(_when(t.end_date_time)),
            _text(_elapsed(t, now)),
        )
    return table


def print_task(task: Task) -> None:
    """One task in full: a panel of its fields, then its input, output and exception."""
    from rich.panel import Panel
    from rich.table import Table

    out = console()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in _task_fields(task, datetime.now(timezone.utc)):
        grid.add_row(key, value)
    out.print(Panel(grid, title=f"task {task.id}", title_align="left", expand=False))
    _print_values(out, task)


def _utc(value: datetime | None) -> str:
    """A time with " UTC", or nothing for no time."""
    return _when(value) and _when(value) + " UTC"


def _task_fields(task: Task, now: datetime) -> list[tuple[str, Text]]:
    rows: list[tuple[str, Text]] = [
        ("id", _text(task.id)),
        ("name", _text(task.name)),
        ("status", _status_text(task.status.value)),
        ("progress", _text(f"{task.progress_percentage}%")),
        ("attempts", _text(f"{task.attempts} of {task.max_attempts}")),
        ("priority", _text(task.priority)),
    ]
    if task.description:
        rows.append(("description", _text(task.description)))
    if task.unique_key:
        rows.append(("unique key", _text(task.unique_key)))
    rows += [
        # created and run at are always set: " UTC" even if a row lacked them, as before
        ("created", _text(_when(task.created_at) + " UTC")),
        ("run at", _text(_when(task.run_at) + " UTC")),
        ("started", _text(_utc(task.start_date_time))),
        ("ended", _text(_utc(task.end_date_time))),
        ("duration", _text(_elapsed(task, now))),
    ]
    if task.status.value == "running":
        rows += [
            ("worker", _text(task.worker_id)),
            ("pid", _text(task.pid)),
            ("lease until", _text(_when(task.lease_expires_at) + " UTC")),
        ]
    if task.cancel_requested:
        rows.append(("cancel requested", _text("yes")))
    return rows


def _print_values(out: Console, task: Task) -> None:
    """Input, output (when there is one, or the task completed) and exception."""
    out.print(_text("input", "bold"))
    out.print(_text(json.dumps(task.input, indent=2, ensure_ascii=False, default=str)))
    if task.output is not None or task.status.value == "completed":
        out.print(_text("output", "bold"))
        out.print(_text(json.dumps(task.output, indent=2, ensure_ascii=False, default=str)))
    if task.exception is not None:
        label = "exception" if task.status.value == "failed" else "last exception"
        out.print(_text(label, "bold red"))
        out.print(_text(str(task.exception)))
        if task.exception.traceback:
            out.print(_text(task.exception.traceback.rstrip(), "dim"))


# ---------------------------------------------------------------------- watch


def watch_task(task: Task, refresh: Callable[[Task], Task], interval: float) -> Task:
    """Show ``task`` until it is final, reading it again (``refresh``) every ``interval``
    seconds: a progress bar in a terminal, else a line per change. Then print how it ended
    and return the final task."""
    out = console()
    if not task.is_final:
        if out.is_terminal:
            task = _watch_bar(task, refresh, interval, out)
        else:
            task = _watch_lines(task, refresh, interval)
    out.print(_text(final_line(task), STATUS_STYLE.get(task.status.value, "")))
    return task


def _watch_bar(task: Task, refresh: Callable[[Task], Task], interval: float, out: Console) -> Task:
    """A rich progress bar, redrawn in place, until the task is final."""
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(
        TextColumn("task {task.fields[task_id]} [bold]{task.fields[task_name]}[/]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        console=out,
    ) as progress:
        bar = progress.add_task(
            "watch",
            total=100,
            completed=task.progress_percentage,
            task_id=task.id,
            task_name=escape(task.name),
            status=task.status.value,
        )
        while not task.is_final:
            time.sleep(interval)
            task = refresh(task)
            progress.update(
                bar,
                completed=100 if task.status.value == "completed" else task.progress_percentage,
                status=task.status.value,
            )
    return task


def _watch_lines(task: Task, refresh: Callable[[Task], Task], interval: float) -> Task:
    """Not a terminal (a log, a pipe): one line per change of status or progress."""
    last: tuple[str, int] | None = None
    while not task.is_final:
        state = (task.status.value, task.progress_percentage)
        if state != last:
            say(f"task {task.id} ({task.name}): {state[0]} {state[1]}%")
            last = state
        time.sleep(interval)
        task = refresh(task)
    return task


# ---------------------------------------------------------------------- stats


def collect_stats(store: TaskStore, seen_within: timedelta) -> dict[str, Any]:
    """Counts by status and name, finishing rates and live workers, as JSON-ready values."""
    by_status = store.count_by_status()
    by_name = store.count_by_name()
    now = store.clock()
    finished: dict[str, dict[str, float]] = {}
    for minutes in FINISHED_WINDOWS:
        count = store.finished_since(now - timedelta(minutes=minutes))
        finished[f"{minutes}m"] = {"count": count, "per_minute": round(count / minutes, 2)}
    workers = [
        {
            "id": w["id"],
            "hostname": w["hostname"],
            "pid": w["pid"],
            "started_at": iso(w["started_at"]),
            "heartbeat_at": iso(w["heartbeat_at"]),
            "task_names": list(w["task_names"]),
        }
        for w in store.workers(seen_within=seen_within)
    ]
    return {
        "database": store.safe_url,
        "total": sum(by_status.values()),
        "by_status": by_status,
        "by_name": dict(sorted(by_name.items())),
        "finished": finished,
        "workers_seen_within_seconds": seen_within.total_seconds(),
        "workers": workers,
        # Pending tasks by name that none of those workers runs: they wait for ever.
        "unserved": store.unserved(seen_within),
    }


def print_stats(stats: dict[str, Any], seen_within: timedelta) -> None:
    """The tables of ``lilota stats`` for what :func:`collect_stats` returned."""
    from rich.table import Table

    out = console()
    statuses = [s.value for s in TaskStatus]
    out.print(_text(f"{stats['database']}: {stats['total']} tasks", "bold"))

    table = Table(title="Tasks by status")
    for status in statuses:
        table.add_column(status, justify="right", style=STATUS_STYLE.get(status, ""))
    table.add_row(*(str(stats["by_status"][s]) for s in statuses))
    out.print(table)
    if stats["by_name"]:
        out.print(_by_name_table(stats["by_name"], statuses))
    out.print(_finished_table(stats["finished"]))

    seen = describe_duration(seen_within)
    for name, count in sorted(stats["unserved"].items()):
        out.print(
            _text(
                f"warning: {count} pending task{'' if count == 1 else 's'} named {name!r}: "
                f"no live worker registered {name!r} (none in the last {seen})",
                "bold yellow",
            )
        )
    if not stats["workers"]:
        out.print(f"no live workers (none with a heartbeat in the last {seen})")
        return
    out.print(_workers_table(stats["workers"], seen))


def _by_name_table(by_name: dict[str, dict[str, int]], statuses: list[str]) -> Table:
    from rich.table import Table

    table = Table(title="Tasks by name")
    table.add_column("name", overflow="fold")
    for status in statuses:
        table.add_column(status, justify="right")
    table.add_column("total", justify="right")
    for name, counts in by_name.items():
        table.add_row(
            _text(name),
            *(str(counts[s]) for s in statuses),
            str(sum(counts.values())),
        )
    return table


def _finished_table(finished: dict[str, dict[str, float]]) -> Table:
    from rich.table import Table

    table = Table(title="Finished tasks")
    table.add_column("in the last", justify="right")
    table.add_column("tasks", justify="right")
    table.add_column("per minute", justify="right")
    for window, values in finished.items():
        minutes = int(window.removesuffix("m"))  # the keys collect_stats writes: "15m"
        table.add_row(
            describe_duration(timedelta(minutes=minutes)),
            str(values["count"]),
            f"{values['per_minute']:.2f}",
        )
    return table


def _workers_table(workers: list[dict[str, Any]], seen: str) -> Table:
    from rich.table import Table

    table = Table(title=f"Live workers (heartbeat in the last {seen}; times in UTC)")
    table.add_column("host")
    table.add_column("pid", justify="right")
    table.add_column("started", no_wrap=True)
    table.add_column("heartbeat", no_wrap=True)
    table.add_column("tasks", overflow="fold")
    for w in workers:
        table.add_row(
            _text(w["hostname"]),
            _text(w["pid"]),
            _text(_when(datetime.fromisoformat(w["started_at"]))),
            _text(_when(datetime.fromisoformat(w["heartbeat_at"]))),
            _text(", ".join(w["task_names"])),
        )
    return table
