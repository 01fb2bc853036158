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
``db_url``. ``--metrics-port`` serves Prometheus metrics meanwhile (:mod:`lilota.metrics`).
The first SIGTERM/SIGINT drains (running tasks finish), a second one stops
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

This module parses the command line and runs the commands; what they print is drawn by
:mod:`lilota.render`, and ``worker`` runs the workers with :mod:`lilota.foreground`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn

from lilota import __version__, metrics
from lilota.arguments import (
    duration_arg,
    parse_duration,
    port_arg,
    positive_int_arg,
    status_arg,
    task_id_arg,
)
from lilota.core import Lilota
from lilota.errors import LilotaError, TaskAlreadyFinished, TaskNotFound
from lilota.foreground import (
    FORCE_GRACE,
    check_script,
    instance_workers,
    looks_like_script,
    run_burst,
    run_until_signalled,
    setup_logging,
    startup_reason,
)
from lilota.models import Task, TaskStatus
from lilota.render import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TASK_CANCELLED,
    EXIT_TASK_FAILED,
    EXIT_USAGE,
    CommandError,
    collect_stats,
    describe_duration,
    format_duration,
    print_json,
    print_stats,
    print_task,
    print_tasks,
    report_error,
    say,
    watch_task,
)
from lilota.settings import DEFAULT_DB_URL, ENV_DB_URL, default_db_url
from lilota.store import TaskStore, is_memory_sqlite
from lilota.supervisor import is_worker_process

log = logging.getLogger(__name__)

# Names other code imports from here, wherever they live now.
__all__ = [
    "DEFAULT_DB_URL",
    "DEFAULT_SEEN_WITHIN",
    "ENV_DB_URL",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TASK_CANCELLED",
    "EXIT_TASK_FAILED",
    "EXIT_USAGE",
    "FORCE_GRACE",
    "WATCH_INTERVAL",
    "CommandError",
    "build_parser",
    "collect_stats",
    "format_duration",
    "main",
    "parse_duration",
    "task_to_dict",
]


# How often `watch` reads the task. Progress is a percentage a person looks at: four
# reads a second look smooth and cost one indexed primary-key read each.
WATCH_INTERVAL = 0.25
# `stats` lists workers whose heartbeat is at most this old by default. An idle worker
# beats every lease/3 (10 s with the default 30 s lease), a busy one every second.
DEFAULT_SEEN_WITHIN = timedelta(seconds=60)

_startup_reason = startup_reason  # its earlier name (tests use it)


def task_to_dict(task: Task) -> dict[str, Any]:
    """A task as JSON-ready values (``--json``): :meth:`Task.to_json`."""
    return task.to_json()


# ---------------------------------------------------------------------- database


def _db_url(args: argparse.Namespace) -> str:
    explicit = getattr(args, "db_url", None)
    if explicit:
        return str(explicit)
    return default_db_url()


def _open_store(args: argparse.Namespace, *, need_schema: bool = True) -> TaskStore:
    """A TaskStore for the chosen database; with ``need_schema``, one that has lilota's tables
    (so that reading never creates a database or tables as a side effect)."""
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


# ---------------------------------------------------------------------- tasks, show, watch


def cmd_tasks(args: argparse.Namespace) -> int:
    store = _open_store(args)
    tasks = store.list_tasks(status=args.status, name=args.name, limit=args.limit)
    if args.json:
        print_json([task.to_json() for task in tasks])
    else:
        print_tasks(tasks, _filters_text(args), args.limit)
    return EXIT_OK


def _filters_text(args: argparse.Namespace) -> str:
    parts = []
    if args.status:
        parts.append("status " + "/".join(args.status))
    if args.name:
        parts.append(f"name {args.name}")
    return f" ({', '.join(parts)})" if parts else ""


def cmd_show(args: argparse.Namespace) -> int:
    task = _get_task(_open_store(args), args.id)
    if args.json:
        print_json(task.to_json())
    else:
        print_task(task)
    return EXIT_OK


_WATCH_CODES = {
    "completed": EXIT_OK,
    "failed": EXIT_TASK_FAILED,
    "cancelled": EXIT_TASK_CANCELLED,
}


def cmd_watch(args: argparse.Namespace) -> int:
    store = _open_store(args)
    task = _get_task(store, args.id)
    task = watch_task(task, lambda seen: _get_task(store, seen.id), WATCH_INTERVAL)
    return _WATCH_CODES[task.status.value]


# ---------------------------------------------------------------------- cancel, retry


def cmd_cancel(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        status = store.cancel(args.id)
    except TaskNotFound:
        raise CommandError(f"no task with id {args.id} in {store.safe_url}") from None
    except TaskAlreadyFinished as e:
        raise CommandError(str(e)) from None
    if status is TaskStatus.CANCELLED:
        say(f"task {args.id} cancelled")
    else:
        say(
            f"task {args.id} is running: asked it to stop; it ends cancelled when it checks "
            "TaskProgress.cancelled, or when its worker replaces it after the grace period"
        )
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        store.retry(args.id)
    except TaskNotFound:
        raise CommandError(f"no task with id {args.id} in {store.safe_url}") from None
    except ValueError as e:  # pending, running or completed
        raise CommandError(str(e)) from None
    say(f"task {args.id} scheduled again")
    return EXIT_OK


# ---------------------------------------------------------------------- stats, cleanup, migrate


def cmd_stats(args: argparse.Namespace) -> int:
    stats = collect_stats(_open_store(args), args.seen_within)
    if args.json:
        print_json(stats)
    else:
        print_stats(stats, args.seen_within)
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    store = _open_store(args)
    count = store.cleanup(args.older_than)
    say(
        f"deleted {count} finished task{'' if count == 1 else 's'} that ended more than "
        f"{describe_duration(args.older_than)} ago"
    )
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    store = _open_store(args, need_schema=False)
    if args.from_1x:
        moved = store.move_from_1x()
        say(
            f"moved {moved} tasks of lilota 1.x into lilota's tables in {store.safe_url} "
            f"(schema version {store.schema_version()}); the 1.x tables are kept as "
            "lilota_1x_task, lilota_1x_node, lilota_1x_node_leader, lilota_1x_log"
        )
        return EXIT_OK
    before = store.schema_version()
    store.ensure_schema()
    after = store.schema_version()
    if before is None:
        say(f"created the lilota tables in {store.safe_url}: schema version {after}")
    elif before != after:
        say(f"upgraded {store.safe_url} from schema version {before} to {after}")
    else:
        say(f"{store.safe_url} is up to date: schema version {after}")
    return EXIT_OK


def cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        # Imported here: the dashboard is an extra (Starlette, uvicorn) the rest does without.
        from lilota.dashboard import ENV_TOKEN, serve

        store = _open_store(args)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        token = args.token or os.environ.get(ENV_TOKEN) or None
        serve(store=store, host=args.host, port=args.port, token=token, insecure=args.insecure)
    except ImportError as e:  # the dashboard extra is not installed
        raise CommandError(str(e)) from e
    return EXIT_OK


# ---------------------------------------------------------------------- worker


def cmd_worker(args: argparse.Namespace) -> int:
    if is_worker_process():
        raise CommandError("`lilota worker` cannot run inside a lilota worker process")
    setup_logging(args.log_level)
    if args.burst:
        if args.metrics_port is not None:
            raise CommandError("--metrics-port does not apply to --burst", EXIT_USAGE)
        return run_burst(args.target, args.db_url)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    lilota, label = _workers_for(args, workers)
    if args.metrics_port is None:
        return run_until_signalled(lilota, label, workers)
    # Counts from the database, run times from the workers started inside (lilota.metrics).
    with metrics.serving(lilota.store, args.metrics_host, args.metrics_port):
        return run_until_signalled(lilota, label, workers)


def _workers_for(args: argparse.Namespace, workers: int) -> tuple[Lilota, str]:
    """A Lilota whose ``workers`` processes run TARGET's tasks, and TARGET's display name."""
    target: str = args.target
    if looks_like_script(target):
        path = check_script(target)
        db_url = _db_url(args)
        # The script's LilotaWorker chooses its own database; this lets it use ours.
        os.environ[ENV_DB_URL] = db_url
        return Lilota(db_url, script_path=path, number_of_workers=workers), target
    # The instance's database unless one is named here; workers get it from this process.
    return instance_workers(target, workers, args.db_url or os.environ.get(ENV_DB_URL))


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
        type=positive_int_arg,
        default=None,
        help="number of worker processes (default: the number of CPUs)",
    )
    p.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log level of this process and of the lilota loggers of its workers (default: info)",
    )
    p.add_argument(
        "--burst",
        action="store_true",
        help="run the tasks that are due in this process (and those they schedule), then "
        "exit, as RQ's burst mode: for cron jobs and CI (--workers does not apply)",
    )
    p.add_argument(
        "--metrics-port",
        type=port_arg,
        default=None,
        help="serve Prometheus metrics on this port at /metrics (pip install 'lilota[metrics]')",
    )
    p.add_argument(
        "--metrics-host",
        default=metrics.DEFAULT_HOST,
        help=f"address the metrics listen on (default: {metrics.DEFAULT_HOST})",
    )

    p = command("tasks", cmd_tasks, help="list tasks, newest first")
    p.add_argument("--status", "-s", type=status_arg, help="only these statuses (comma separated)")
    p.add_argument("--name", "-n", help="only tasks with this name")
    p.add_argument(
        "--limit", "-l", type=positive_int_arg, default=50, help="at most this many (50)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("show", cmd_show, help="one task in full")
    p.add_argument("id", type=task_id_arg, metavar="ID")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "watch",
        cmd_watch,
        help="a progress bar until the task ends",
        description=(
            "Show the task's progress until it is completed (exit 0), failed (3) or cancelled (4)."
        ),
    )
    p.add_argument("id", type=task_id_arg, metavar="ID")

    p = command("cancel", cmd_cancel, help="cancel a pending or running task")
    p.add_argument("id", type=task_id_arg, metavar="ID")

    p = command("retry", cmd_retry, help="schedule a failed or cancelled task again")
    p.add_argument("id", type=task_id_arg, metavar="ID")

    p = command("stats", cmd_stats, help="counts, finishing rates and live workers")
    p.add_argument(
        "--seen-within",
        type=duration_arg,
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
        type=duration_arg,
        required=True,
        metavar="DURATION",
        help="e.g. 30s, 15m, 12h, 7d, 2w",
    )

    p = command(
        "migrate", cmd_migrate, help="create or upgrade lilota's tables, print the schema version"
    )
    p.add_argument(
        "--from-1x",
        action="store_true",
        help="move the tasks of a lilota 1.x database into lilota 2's tables (stop the 1.x "
        "workers first; the 1.x tables are kept, renamed lilota_1x_*)",
    )

    p = command(
        "dashboard",
        cmd_dashboard,
        help="serve the web dashboard (pip install 'lilota[dashboard]')",
        description=(
            "Serve the web dashboard until Ctrl-C: a live task list, task pages, cancel and "
            "retry. It listens on 127.0.0.1 (this machine only) unless --host says "
            "otherwise; anywhere else it needs --token (or --insecure)."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=positive_int_arg, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--token",
        default=None,
        help="access token required to use the dashboard (default: $LILOTA_DASHBOARD_TOKEN)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback --host without a token (anyone who reaches it can act)",
    )
    return parser


# ---------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        code: int = args.handler(args)
        return code
    except CommandError as e:
        if debug and e.code != EXIT_USAGE:
            raise
        report_error(str(e))
        return e.code
    except LilotaError as e:
        if debug:
            raise
        report_error(str(e))
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
        report_error(f"{type(e).__name__}: {e} (run with --debug for the traceback)")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
