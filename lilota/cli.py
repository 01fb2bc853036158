"""The ``lilota`` command: run workers and look at tasks from a shell.

``lilota worker``, ``tasks``, ``show``, ``watch``, ``cancel``, ``retry``, ``stats``,
``cleanup``, ``migrate`` and ``dashboard``; ``lilota --help`` and ``lilota COMMAND --help``
describe them.

The database is ``--db-url`` (before or after the command), else the ``LILOTA_DB_URL``
environment variable, else ``sqlite:///lilota.db``. Commands other than ``worker`` and
``migrate`` never create a database or tables: they say so and exit 1.

``lilota worker TARGET``: TARGET is a script (``tasks.py``: its ``LilotaWorker`` names
the database; the command exports the URL it chose as ``LILOTA_DB_URL`` for it), or a
module (``pkg.mod`` or ``pkg.mod:attr``) holding a ``Lilota`` instance whose registered
tasks the workers run, on ``--db-url``, else ``$LILOTA_DB_URL``, else the instance's own
``db_url``. The first SIGTERM/SIGINT drains (running tasks finish), a second one stops
at once: workers give their tasks back (pending again) and exit, or are killed.

Every failure is one line on stderr, ``lilota: error: ...``, and a non-zero exit status
(``--debug`` shows the traceback instead). Exit statuses:

* 0: success (``watch``: the task completed; ``worker``: stopped gracefully)
* 1: an error: unreachable database, unknown task id, a task that cannot be cancelled
* 2: a usage error: unknown option, bad duration, unknown status, malformed id
* 3: ``watch``: the task failed
* 4: ``watch``: the task was cancelled
* 128 + signal number: ``worker`` stopped by a second signal (130 SIGINT, 143 SIGTERM);
  130 also for any other command interrupted by Ctrl-C

Importing :mod:`lilota` does not import this module; rich is imported only to draw.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from lilota.core import Lilota
    from lilota.models import Task
    from lilota.store import TaskStore

log = logging.getLogger(__name__)

ENV_DB_URL = "LILOTA_DB_URL"
DEFAULT_DB_URL = "sqlite:///lilota.db"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TASK_FAILED = 3
EXIT_TASK_CANCELLED = 4
EXIT_INTERRUPTED = 130

# How often `watch` reads the task. Progress is a percentage a person looks at: four
# reads a second look smooth and cost one indexed primary-key read each.
WATCH_INTERVAL = 0.25
# After a second signal, workers get this long to give their tasks back and exit before
# they are killed (a task blocked in C code does not see the signal until it returns).
FORCE_GRACE = 3.0
# `stats` lists workers whose heartbeat is at most this old by default. An idle worker
# beats every lease/3 (10 s with the default 30 s lease), a busy one every second.
DEFAULT_SEEN_WITHIN = timedelta(seconds=60)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_NAMES = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week"}


class CommandError(Exception):
    """A failure reported as one line ``lilota: error: <message>`` and exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- parsing values


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
        seconds += float(number) * _UNITS[unit]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"invalid duration {text!r}: too long") from None


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


def _describe_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {_UNIT_NAMES[unit]}{'' if count == 1 else 's'}"
    return f"{seconds:g} seconds"


def _duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _task_id_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid task id {text!r}: expected a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid task id {text!r}: ids start at 1")
    return value


def _positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _status_arg(text: str) -> list[str]:
    from lilota.models import TaskStatus

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


# ---------------------------------------------------------------------- output helpers


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _error(message: str) -> None:
    sys.stderr.write(f"lilota: error: {_one_line(message) or 'unknown error'}\n")
    sys.stderr.flush()


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # the store's own naive UTC values
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def task_to_dict(task: Task) -> dict[str, Any]:
    """A task as JSON-ready values: ISO 8601 UTC datetimes, durations in seconds."""
    duration = task.duration
    return {
        "id": task.id,
        "name": task.name,
        "status": task.status.value,
        "progress": task.progress_percentage,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "priority": task.priority,
        "description": task.description,
        "unique_key": task.unique_key,
        "created_at": _iso(task.created_at),
        "run_at": _iso(task.run_at),
        "started_at": _iso(task.start_date_time),
        "ended_at": _iso(task.end_date_time),
        "duration_seconds": None if duration is None else duration.total_seconds(),
        "input": task.input,
        "output": task.output,
        "exception": None if task.exception is None else task.exception.as_dict(),
        "worker_id": task.worker_id,
        "pid": task.pid,
        "lease_expires_at": _iso(task.lease_expires_at),
        "cancel_requested": task.cancel_requested,
    }


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _console(*, stderr: bool = False) -> Console:
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
    from rich.text import Text

    return Text("" if value is None else str(value), style=style)


_STATUS_STYLE = {
    "pending": "yellow",
    "running": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}


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


# ---------------------------------------------------------------------- database


def _db_url(args: argparse.Namespace) -> str:
    explicit = getattr(args, "db_url", None)
    if explicit:
        return str(explicit)
    return os.environ.get(ENV_DB_URL) or DEFAULT_DB_URL


def _open_store(args: argparse.Namespace, *, need_schema: bool = True) -> TaskStore:
    """A TaskStore for the chosen database; with ``need_schema``, one that has lilota's tables
    (so that reading never creates a database or tables as a side effect)."""
    from lilota.store import TaskStore, is_memory_sqlite

    url = _db_url(args)
    store = TaskStore(url)
    if not need_schema:
        return store
    if store.is_sqlite and not is_memory_sqlite(store.url):
        path = store.url.database or ""
        if not path.startswith("file:") and not os.path.exists(path):
            raise CommandError(
                f"no SQLite database at {os.path.abspath(path)} ({store.safe_url}); pass "
                f"--db-url or set {ENV_DB_URL}, or create it with `lilota migrate`"
            )
    if store.schema_version() is None:
        raise CommandError(
            f"{store.safe_url} has no lilota tables; check --db-url / {ENV_DB_URL}, or "
            "create them with `lilota migrate`"
        )
    store.ensure_schema()  # SchemaVersionError for a database of a newer lilota
    return store


def _get_task(store: TaskStore, task_id: int) -> Task:
    task = store.get(task_id)
    if task is None:
        raise CommandError(f"no task with id {task_id} in {store.safe_url}")
    return task


# ---------------------------------------------------------------------- tasks, show


def cmd_tasks(args: argparse.Namespace) -> int:
    store = _open_store(args)
    tasks = store.list_tasks(status=args.status, name=args.name, limit=args.limit)
    if args.json:
        _print_json([task_to_dict(t) for t in tasks])
        return EXIT_OK
    console = _console()
    if not tasks:
        console.print("no tasks" + _filters_text(args))
        return EXIT_OK
    from rich.table import Table

    now = datetime.now(timezone.utc)
    table = Table(title=f"Tasks{_filters_text(args)}, newest first (times in UTC)")
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
    # Three full timestamps do not fit a narrow terminal: there, "started" is left to
    # `lilota show` (ended and duration say the rest).
    wide = console.width >= 130
    if wide:
        table.add_column("started", no_wrap=True)
    table.add_column("ended", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    for t in tasks:
        started = [_text(_when(t.start_date_time))] if wide else []
        table.add_row(
            _text(t.id),
            _text(t.name),
            _text(t.status.value, _STATUS_STYLE.get(t.status.value, "")),
            _text(f"{t.progress_percentage}%"),
            _text(f"{t.attempts}/{t.max_attempts}"),
            _text(_when(t.created_at)),
            *started,
            _text(_when(t.end_date_time)),
            _text(_elapsed(t, now)),
        )
    console.print(table)
    if len(tasks) == args.limit:
        console.print(f"(first {args.limit}; use --limit to see more)", style="dim")
    return EXIT_OK


def _filters_text(args: argparse.Namespace) -> str:
    parts = []
    if args.status:
        parts.append("status " + "/".join(args.status))
    if args.name:
        parts.append(f"name {args.name}")
    return f" ({', '.join(parts)})" if parts else ""


def cmd_show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    task = _get_task(store, args.id)
    if args.json:
        _print_json(task_to_dict(task))
        return EXIT_OK
    from rich.panel import Panel
    from rich.table import Table

    console = _console()
    now = datetime.now(timezone.utc)
    status = task.status.value
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    rows: list[tuple[str, Text]] = [
        ("id", _text(task.id)),
        ("name", _text(task.name)),
        ("status", _text(status, _STATUS_STYLE.get(status, ""))),
        ("progress", _text(f"{task.progress_percentage}%")),
        ("attempts", _text(f"{task.attempts} of {task.max_attempts}")),
        ("priority", _text(task.priority)),
    ]
    if task.description:
        rows.append(("description", _text(task.description)))
    if task.unique_key:
        rows.append(("unique key", _text(task.unique_key)))
    rows += [
        ("created", _text(_when(task.created_at) + " UTC")),
        ("run at", _text(_when(task.run_at) + " UTC")),
        ("started", _text(_when(task.start_date_time) and _when(task.start_date_time) + " UTC")),
        ("ended", _text(_when(task.end_date_time) and _when(task.end_date_time) + " UTC")),
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
    for key, value in rows:
        grid.add_row(key, value)
    console.print(Panel(grid, title=f"task {task.id}", title_align="left", expand=False))
    console.print(_text("input", "bold"))
    console.print(_text(json.dumps(task.input, indent=2, ensure_ascii=False, default=str)))
    if task.output is not None or task.status.value == "completed":
        console.print(_text("output", "bold"))
        console.print(_text(json.dumps(task.output, indent=2, ensure_ascii=False, default=str)))
    if task.exception is not None:
        label = "exception" if status == "failed" else "last exception"
        console.print(_text(label, "bold red"))
        console.print(_text(str(task.exception)))
        if task.exception.traceback:
            console.print(_text(task.exception.traceback.rstrip(), "dim"))
    return EXIT_OK


# ---------------------------------------------------------------------- watch


def _watch_code(task: Task) -> int:
    return {
        "completed": EXIT_OK,
        "failed": EXIT_TASK_FAILED,
        "cancelled": EXIT_TASK_CANCELLED,
    }[task.status.value]


def _final_line(task: Task) -> str:
    line = f"task {task.id} ({task.name}) {task.status.value}"
    if task.duration is not None:
        line += f" after {format_duration(task.duration)}"
    if task.exception is not None and task.status.value != "completed":
        line += f": {_one_line(str(task.exception))}"
    return line


def cmd_watch(args: argparse.Namespace) -> int:
    store = _open_store(args)
    task = _get_task(store, args.id)
    console = _console()
    if not task.is_final:
        if console.is_terminal:
            task = _watch_bar(store, task, console)
        else:
            task = _watch_lines(store, task)
    style = _STATUS_STYLE.get(task.status.value, "")
    console.print(_text(_final_line(task), style))
    return _watch_code(task)


def _watch_bar(store: TaskStore, task: Task, console: Console) -> Task:
    """A rich progress bar, redrawn in place, until the task is final."""
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(
        TextColumn("task {task.fields[task_id]} [bold]{task.fields[task_name]}[/]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
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
            time.sleep(WATCH_INTERVAL)
            task = _get_task(store, task.id)
            progress.update(
                bar,
                completed=100 if task.status.value == "completed" else task.progress_percentage,
                status=task.status.value,
            )
    return task


def _watch_lines(store: TaskStore, task: Task) -> Task:
    """Not a terminal (a log, a pipe): one line per change of status or progress."""
    last: tuple[str, int] | None = None
    while not task.is_final:
        state = (task.status.value, task.progress_percentage)
        if state != last:
            print(f"task {task.id} ({task.name}): {state[0]} {state[1]}%", flush=True)
            last = state
        time.sleep(WATCH_INTERVAL)
        task = _get_task(store, task.id)
    return task


# ---------------------------------------------------------------------- cancel, retry


def cmd_cancel(args: argparse.Namespace) -> int:
    from lilota.errors import TaskAlreadyFinished, TaskNotFound
    from lilota.models import TaskStatus

    store = _open_store(args)
    try:
        status = store.cancel(args.id)
    except TaskNotFound:
        raise CommandError(f"no task with id {args.id} in {store.safe_url}") from None
    except TaskAlreadyFinished as e:
        raise CommandError(str(e)) from None
    if status is TaskStatus.CANCELLED:
        print(f"task {args.id} cancelled")
    else:
        print(
            f"task {args.id} is running: asked it to stop; it ends cancelled when it checks "
            "TaskProgress.cancelled, or when its worker replaces it after the grace period"
        )
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from lilota.errors import TaskNotFound

    store = _open_store(args)
    try:
        store.retry(args.id)
    except TaskNotFound:
        raise CommandError(f"no task with id {args.id} in {store.safe_url}") from None
    except ValueError as e:  # pending, running or completed
        raise CommandError(str(e)) from None
    print(f"task {args.id} scheduled again")
    return EXIT_OK


# ---------------------------------------------------------------------- stats


def collect_stats(store: TaskStore, seen_within: timedelta) -> dict[str, Any]:
    """Counts by status and name, finishing rates and live workers, as JSON-ready values."""
    by_status = store.count_by_status()
    by_name = store.count_by_name()
    now = store.clock()
    finished: dict[str, dict[str, float]] = {}
    for minutes in (5, 15, 60):
        count = store.finished_since(now - timedelta(minutes=minutes))
        finished[f"{minutes}m"] = {"count": count, "per_minute": round(count / minutes, 2)}
    workers = [
        {
            "id": w["id"],
            "hostname": w["hostname"],
            "pid": w["pid"],
            "started_at": _iso(w["started_at"]),
            "heartbeat_at": _iso(w["heartbeat_at"]),
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
    }


def cmd_stats(args: argparse.Namespace) -> int:
    from lilota.models import TaskStatus

    store = _open_store(args)
    stats = collect_stats(store, args.seen_within)
    if args.json:
        _print_json(stats)
        return EXIT_OK
    from rich.table import Table

    console = _console()
    statuses = [s.value for s in TaskStatus]
    console.print(_text(f"{stats['database']}: {stats['total']} tasks", "bold"))

    table = Table(title="Tasks by status")
    for status in statuses:
        table.add_column(status, justify="right", style=_STATUS_STYLE.get(status, ""))
    table.add_row(*(str(stats["by_status"][s]) for s in statuses))
    console.print(table)

    if stats["by_name"]:
        table = Table(title="Tasks by name")
        table.add_column("name", overflow="fold")
        for status in statuses:
            table.add_column(status, justify="right")
        table.add_column("total", justify="right")
        for name, counts in stats["by_name"].items():
            table.add_row(
                _text(name),
                *(str(counts[s]) for s in statuses),
                str(sum(counts.values())),
            )
        console.print(table)

    table = Table(title="Finished tasks")
    table.add_column("in the last", justify="right")
    table.add_column("tasks", justify="right")
    table.add_column("per minute", justify="right")
    for window, values in stats["finished"].items():
        table.add_row(
            _describe_duration(parse_duration(window)),
            str(values["count"]),
            f"{values['per_minute']:.2f}",
        )
    console.print(table)

    seen = _describe_duration(args.seen_within)
    if not stats["workers"]:
        console.print(f"no live workers (none with a heartbeat in the last {seen})")
        return EXIT_OK
    table = Table(title=f"Live workers (heartbeat in the last {seen}; times in UTC)")
    table.add_column("host")
    table.add_column("pid", justify="right")
    table.add_column("started", no_wrap=True)
    table.add_column("heartbeat", no_wrap=True)
    table.add_column("tasks", overflow="fold")
    for w in stats["workers"]:
        table.add_row(
            _text(w["hostname"]),
            _text(w["pid"]),
            _text(_when(datetime.fromisoformat(w["started_at"]))),
            _text(_when(datetime.fromisoformat(w["heartbeat_at"]))),
            _text(", ".join(w["task_names"])),
        )
    console.print(table)
    return EXIT_OK


# ---------------------------------------------------------------------- cleanup, migrate


def cmd_cleanup(args: argparse.Namespace) -> int:
    store = _open_store(args)
    count = store.cleanup(args.older_than)
    print(
        f"deleted {count} finished task{'' if count == 1 else 's'} that ended more than "
        f"{_describe_duration(args.older_than)} ago"
    )
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    store = _open_store(args, need_schema=False)
    before = store.schema_version()
    store.ensure_schema()
    after = store.schema_version()
    if before is None:
        print(f"created the lilota tables in {store.safe_url}: schema version {after}")
    elif before != after:
        print(f"upgraded {store.safe_url} from schema version {before} to {after}")
    else:
        print(f"{store.safe_url} is up to date: schema version {after}")
    return EXIT_OK


def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        from lilota.dashboard import ENV_TOKEN, serve

        store = _open_store(args)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        token = args.token or os.environ.get(ENV_TOKEN) or None
        serve(store=store, host=args.host, port=args.port, token=token)
    except ImportError as e:  # the dashboard extra is not installed
        raise CommandError(str(e)) from e
    return EXIT_OK


# ---------------------------------------------------------------------- worker


class _StopNow(BaseException):
    """Raised by the signal handler for a second signal while workers are starting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """Counts SIGINT/SIGTERM. Handlers only record; the main thread acts on them."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0
        self.received = threading.Event()
        self.starting = False

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.last = signum
        self.received.set()
        if self.count >= 2 and self.starting:
            raise _StopNow(signum)

    def name(self) -> str:
        return signal.Signals(self.last).name if self.last else "a signal"


def _looks_like_script(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or os.path.isfile(target)


def _check_script(path: str) -> str:
    """The script's absolute path, after checking it exists and compiles."""
    if not os.path.exists(path):
        raise CommandError(f"cannot load {path}: no such file")
    if not os.path.isfile(path):
        raise CommandError(f"cannot load {path}: not a file")
    try:
        with open(path, "rb") as f:
            source = f.read()
        compile(source, path, "exec")
    except SyntaxError as e:
        where = f"{e.filename or path}, line {e.lineno}" if e.lineno else path
        raise CommandError(f"cannot load {path}: {e.msg} ({where})") from None
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot load {path}: {e}") from None
    return os.path.abspath(path)


def _find_instance(target: str) -> tuple[Lilota, str]:
    """Import ``package.module[:attr]`` and return its Lilota instance and a display name."""
    from lilota.core import Lilota

    module_name, _, attr = target.partition(":")
    if not module_name or not all(part.isidentifier() for part in module_name.split(".")):
        raise CommandError(
            f"{target!r} is neither a .py script nor a module (package.module or "
            "package.module:attribute)"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:  # like `python -m`: modules of the current directory import
        sys.path.insert(0, cwd)
    try:
        module: ModuleType = importlib.import_module(module_name)
    except SyntaxError as e:
        raise CommandError(
            f"cannot import {module_name}: {e.msg} ({e.filename}, line {e.lineno})"
        ) from None
    except Exception as e:
        raise CommandError(f"cannot import {module_name}: {type(e).__name__}: {e}") from None
    if attr:
        if not attr.isidentifier():
            raise CommandError(f"{attr!r} in {target!r} is not an attribute name")
        instance = getattr(module, attr, None)
        if instance is None:
            raise CommandError(f"module {module_name} has no attribute {attr!r}")
        if not isinstance(instance, Lilota):
            raise CommandError(
                f"{module_name}:{attr} is a {type(instance).__name__}, not a Lilota instance"
            )
        return instance, f"{module_name}:{attr}"
    found = [(name, value) for name, value in vars(module).items() if isinstance(value, Lilota)]
    unique = {id(value): (name, value) for name, value in found}
    if not unique:
        raise CommandError(f"module {module_name} has no Lilota instance at module level")
    if len(unique) > 1:
        names = ", ".join(f"{module_name}:{name}" for name, _ in found)
        raise CommandError(f"module {module_name} has several Lilota instances; name one: {names}")
    name, instance = next(iter(unique.values()))
    return instance, f"{module_name}:{name}"


def _build_lilota(args: argparse.Namespace, workers: int) -> tuple[Lilota, str]:
    from lilota.core import Lilota

    target: str = args.target
    if _looks_like_script(target):
        path = _check_script(target)
        db_url = _db_url(args)
        # The script's LilotaWorker chooses its own database; this lets it use ours.
        os.environ[ENV_DB_URL] = db_url
        return Lilota(db_url, script_path=path, number_of_workers=workers), target
    instance, label = _find_instance(target)
    if not len(instance.registry):
        raise CommandError(f"{label} has no registered tasks")
    # The instance's database unless one is named here; workers get it from this process.
    db_url = args.db_url or os.environ.get(ENV_DB_URL) or instance.db_url
    runner = Lilota(
        db_url,
        number_of_workers=workers,
        set_progress_manually=instance.set_progress_manually,
        lease=instance.lease,
        startup_timeout=instance.startup_timeout,
        registry=instance.registry,
    )
    return runner, label


def cmd_worker(args: argparse.Namespace) -> int:
    from lilota.errors import WorkerStartupError
    from lilota.supervisor import is_worker_process

    if is_worker_process():
        raise CommandError("`lilota worker` cannot run inside a lilota worker process")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    lilota, label = _build_lilota(args, workers)
    signals = _Signals()
    signals.install()
    signals.starting = True
    try:
        lilota.start()
        signals.starting = False
    except _StopNow as e:
        _kill_now(lilota)
        log.warning("stopped by %s while starting", signal.Signals(e.signum).name)
        return 128 + e.signum
    except WorkerStartupError as e:
        raise CommandError(f"cannot start workers for {label}: {_startup_reason(e)}") from None
    finally:
        signals.starting = False
    log.info(
        "%d worker processes running %s on %s (pids %s); Ctrl-C or SIGTERM stops them",
        workers,
        label,
        lilota.store.safe_url,
        " ".join(map(str, lilota.worker_pids)),
    )
    while not signals.received.wait(0.5):
        pass
    return _stop(lilota, signals)


def _startup_reason(error: Exception) -> str:
    """One line out of a WorkerStartupError: the exit status and the last line the worker
    printed (its exception), which the supervisor has already forwarded in full."""
    head, _, output = str(error).partition("\n--- end of its output ---\n")
    head = head.strip().splitlines()[0] if head.strip() else ""
    status = re.search(r"could not start: (.*)$", head)
    reason = status.group(1) if status else head
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
    return f"{reason}: {last}" if last and last not in reason else reason


def _stop(lilota: Lilota, signals: _Signals) -> int:
    """Drain after the first signal; after a second one, stop the workers at once."""
    log.warning(
        "received %s: finishing the running tasks, then stopping (send it again to stop now)",
        signals.name(),
    )
    supervisor = getattr(lilota, "_supervisor", None)  # for a second signal: see _kill_now
    failure: list[BaseException] = []

    def drain() -> None:
        try:
            lilota.stop()
        except BaseException as e:  # reported by the main thread
            failure.append(e)

    thread = threading.Thread(target=drain, name="lilota-cli-stop", daemon=True)
    thread.start()
    while thread.is_alive() and signals.count < 2:
        thread.join(0.1)
    if thread.is_alive():
        log.warning(
            "received %s again: stopping now; running tasks go back to pending", signals.name()
        )
        _kill_now(lilota, supervisor, thread)
        return 128 + signals.last
    if failure:
        raise failure[0]
    log.info("workers stopped")
    return EXIT_OK


def _kill_now(
    lilota: Lilota, supervisor: Any = None, draining: threading.Thread | None = None
) -> None:
    """Stop every worker at once. A second SIGTERM makes a worker give its tasks back and
    exit; one still alive after FORCE_GRACE (busy in C code) is killed."""
    if supervisor is None:
        supervisor = getattr(lilota, "_supervisor", None)
    if supervisor is None:
        return
    if draining is None:
        draining = threading.Thread(target=lilota.stop, name="lilota-cli-stop", daemon=True)
        draining.start()
    deadline = time.monotonic() + FORCE_GRACE
    while draining.is_alive() and time.monotonic() < deadline:
        # Repeated: two signals that reach a busy process close together count as one.
        _signal_workers(supervisor, signal.SIGTERM)
        draining.join(0.5)
    if draining.is_alive():
        log.warning("workers %s did not exit; killing them", supervisor.pids)
        _signal_workers(supervisor, signal.SIGKILL)
        draining.join(FORCE_GRACE)


def _signal_workers(supervisor: Any, signum: int) -> None:
    for pid in supervisor.pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


# ---------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``lilota: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(message, EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--db-url",
        default=argparse.SUPPRESS,
        help=f"database URL (default: ${ENV_DB_URL}, else {DEFAULT_DB_URL})",
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    parser = _Parser(
        prog="lilota",
        description="Run lilota workers and look at tasks.",
        epilog="exit status: 0 ok, 1 error, 2 usage error; watch: 3 failed, 4 cancelled",
    )
    parser.add_argument(
        "--db-url",
        default=None,
        help=f"database URL (default: ${ENV_DB_URL}, else {DEFAULT_DB_URL})",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    from lilota import __version__

    parser.add_argument("--version", action="version", version=f"lilota {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, handler: Callable[[argparse.Namespace], int], **kw: Any) -> Any:
        p = sub.add_parser(name, parents=[common], **kw)
        p.set_defaults(handler=handler)
        return p

    p = command(
        "worker",
        cmd_worker,
        help="run worker processes in the foreground",
        description=(
            "Run worker processes until SIGTERM or Ctrl-C (then finish the running tasks; "
            "a second signal stops at once). TARGET is a script (path/to/tasks.py) that "
            "registers tasks on a LilotaWorker and calls worker.start() under "
            "`if __name__ == '__main__'` (its LilotaWorker names the database; the "
            "chosen URL is in $LILOTA_DB_URL for it), or a module (package.module or "
            "package.module:attribute) holding a Lilota instance with registered tasks: "
            "its workers use --db-url, else $LILOTA_DB_URL, else the instance's db_url."
        ),
    )
    p.add_argument("target", metavar="SCRIPT_OR_MODULE")
    p.add_argument(
        "--workers",
        "-w",
        type=_positive_int_arg,
        default=None,
        help="number of worker processes (default: the number of CPUs)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of this process (default: info)",
    )

    p = command("tasks", cmd_tasks, help="list tasks, newest first")
    p.add_argument("--status", "-s", type=_status_arg, help="only these statuses (comma separated)")
    p.add_argument("--name", "-n", help="only tasks with this name")
    p.add_argument(
        "--limit", "-l", type=_positive_int_arg, default=50, help="at most this many (50)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("show", cmd_show, help="one task in full")
    p.add_argument("id", type=_task_id_arg, metavar="ID")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "watch",
        cmd_watch,
        help="a progress bar until the task ends",
        description=(
            "Show the task's progress until it is completed (exit 0), failed (3) or cancelled (4)."
        ),
    )
    p.add_argument("id", type=_task_id_arg, metavar="ID")

    p = command("cancel", cmd_cancel, help="cancel a pending or running task")
    p.add_argument("id", type=_task_id_arg, metavar="ID")

    p = command("retry", cmd_retry, help="schedule a failed or cancelled task again")
    p.add_argument("id", type=_task_id_arg, metavar="ID")

    p = command("stats", cmd_stats, help="counts, finishing rates and live workers")
    p.add_argument(
        "--seen-within",
        type=_duration_arg,
        default=DEFAULT_SEEN_WITHIN,
        metavar="DURATION",
        help="a worker is live if it sent a heartbeat within this (default 60s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "cleanup",
        cmd_cleanup,
        help="delete finished tasks that ended long ago",
        description=(
            "Delete completed, failed and cancelled tasks that ended more than DURATION "
            "ago. Pending and running tasks are never deleted."
        ),
    )
    p.add_argument(
        "--older-than",
        type=_duration_arg,
        required=True,
        metavar="DURATION",
        help="e.g. 30s, 15m, 12h, 7d, 2w",
    )

    command(
        "migrate", cmd_migrate, help="create or upgrade lilota's tables, print the schema version"
    )

    p = command(
        "dashboard",
        cmd_dashboard,
        help="serve the web dashboard (pip install 'lilota[dashboard]')",
        description=(
            "Serve the web dashboard until Ctrl-C: a live task list, task pages, cancel and "
            "retry. It listens on 127.0.0.1 (this machine only) unless --host says "
            "otherwise; anywhere else, set --token."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_positive_int_arg, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--token",
        default=None,
        help="access token required to use the dashboard (default: $LILOTA_DASHBOARD_TOKEN)",
    )
    return parser


# ---------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from lilota.errors import LilotaError

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        code: int = args.handler(args)
        return code
    except CommandError as e:
        if debug and e.code != EXIT_USAGE:
            raise
        _error(str(e))
        return e.code
    except LilotaError as e:
        if debug:
            raise
        _error(str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `lilota tasks --json | head`: stop quietly (status 1, as rich does for tables);
        # silence the flush at interpreter exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as e:
        if debug:
            raise
        _error(f"{type(e).__name__}: {e} (run with --debug for the traceback)")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
