"""lilota's own benchmarks: enqueue, drain, start latency and worker memory.

    python benchmarks/run.py                                  # both backends, 3 rounds
    python benchmarks/run.py --backends postgres --rounds 5 --only w2,w3
    python benchmarks/run.py --pg postgresql://postgres@127.0.0.1:5432 --prefill 0

Workloads (N = --n, default 5,000; 2 worker processes started by ``Lilota.start()`` in
script mode, running ``bench_worker.py``; the task is a no-op that records its start):

  W1  enqueue   N x ``schedule("noop", {"i": i})`` one call after the other; then
                ``schedule_many("noop", inputs)`` of N in one call (tasks/s).
  W2  drain     N pending tasks (PostgreSQL: then ANALYZE, as compare.py's harness does), 2
                workers start; from the first task starting until the task table says all
                N are finished (tasks/s; worker start-up reported apart). Once on an empty
                table, once with --prefill (default 1,000,000) completed tasks in it.
  W3  latency   2 idle workers (warmed by one task, then idle 1 s); 50 tasks scheduled one
                by one, 50 ms apart; delay from ``schedule()`` returning to the task
                function starting: p50 / p95 (ms).
  W4  memory    RSS (psutil) of each worker process after 1,000 and after --w4-tasks
                (default 100,000) tasks, and of the supervisor process (the process that
                called ``Lilota.start()``; here a child that does nothing else).

Every workload gets a new database (PostgreSQL: ``createdb``; SQLite: a new file in a
temporary directory), so none sees another's rows. The prefilled databases are built
once per backend and copied for each round (PostgreSQL: ``createdb -T``; SQLite: a file
copy). Nothing here speaks SQL: the rows are made through ``TaskStore.add_many`` and
``TaskStore.finish`` (completed, attempt 0), 20,000 per call; on PostgreSQL the filled
table is then VACUUMed and ANALYZEd (what autovacuum does to a table that finished its
tasks one by one), and ANALYZE before each drain, through the ``vacuumdb`` client.

PostgreSQL: ``--pg`` (default ``$LILOTA_BENCH_PG``, else ``postgresql://postgres@127.0.0.1:5432``,
a stock server as a user would run it). The
client tools (createdb, dropdb, vacuumdb) must be on PATH.

Prints a markdown table of medians (and min-max) over --rounds; --json writes every
round's figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
# Worker processes (started by lilota's supervisor) find this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)

import psutil  # type: ignore[import-untyped]  # noqa: E402

from lilota import Lilota  # noqa: E402
from lilota.store import NewTask, Outcome, TaskStore  # noqa: E402

WORKER_SCRIPT = os.path.join(HERE, "bench_worker.py")
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"
WARMUP = -1
PROCESSES = 2

# --------------------------------------------------------------------------- databases


class Backend:
    """Creates and drops throwaway databases of one kind."""

    name = "?"

    def new(self, tag: str) -> str:
        """URL of a new, empty database."""
        raise NotImplementedError

    def copy(self, template_url: str, tag: str) -> str:
        """URL of a new database holding what ``template_url`` holds."""
        raise NotImplementedError

    def drop(self, url: str) -> None:
        raise NotImplementedError

    def analyze(self, url: str) -> None:
        """Give the planner statistics (what compare.py's harness does before its drain)."""

    def vacuum(self, url: str) -> None:
        """What autovacuum does to a table that finished many tasks, and ANALYZE."""

    def close(self) -> None:
        pass


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="lilota-bench-")

    def new(self, tag: str) -> str:
        return f"sqlite:///{os.path.join(self.dir, f'{tag}-{uuid.uuid4().hex[:8]}.db')}"

    def copy(self, template_url: str, tag: str) -> str:
        url = self.new(tag)
        shutil.copyfile(template_url.removeprefix("sqlite:///"), url.removeprefix("sqlite:///"))
        return url

    def drop(self, url: str) -> None:
        path = url.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, server: str) -> None:
        parts = urlsplit(server)
        self.host = parts.hostname or "127.0.0.1"
        self.port = str(parts.port or 5432)
        self.user = parts.username or "postgres"
        self.prefix = f"lilota_bench_{os.getpid()}_"
        if not self._ready():
            raise SystemExit(f"run: no PostgreSQL server at {self.host}:{self.port}")

    def _ready(self) -> bool:
        return (
            subprocess.run(
                ["pg_isready", "-q", "-h", self.host, "-p", self.port], check=False
            ).returncode
            == 0
        )

    def _client(self, *args: str) -> None:
        subprocess.run(
            [args[0], "-h", self.host, "-p", self.port, "-U", self.user, *args[1:]],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def _url(self, db: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{db}"

    def new(self, tag: str) -> str:
        db = f"{self.prefix}{tag}_{uuid.uuid4().hex[:6]}"
        self._client("createdb", db)
        return self._url(db)

    def copy(self, template_url: str, tag: str) -> str:
        db = f"{self.prefix}{tag}_{uuid.uuid4().hex[:6]}"
        # file_copy: the default (wal_log) writes the whole copy to the WAL, and the
        # checkpoints that follow would land in the middle of the drain.
        self._client("createdb", "--strategy=file_copy", "-T", template_url.rsplit("/", 1)[1], db)
        return self._url(db)

    def drop(self, url: str) -> None:
        self._client("dropdb", "--if-exists", "--force", url.rsplit("/", 1)[1])

    def analyze(self, url: str) -> None:
        self._client("vacuumdb", "-q", "-Z", "-d", url.rsplit("/", 1)[1])

    def vacuum(self, url: str) -> None:
        self._client("vacuumdb", "-q", "-z", "-d", url.rsplit("/", 1)[1])


# --------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"run: {message}", file=sys.stderr, flush=True)


def read_marks(directory: str) -> dict[int, list[float]]:
    """Start times of the tasks, by index (more than one: the task ran twice)."""
    marks: dict[int, list[float]] = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name)) as f:
            for line in f:
                if line.endswith("\n"):
                    i, t = line.split()
                    marks.setdefault(int(i), []).append(float(t))
    return marks


def wait_for_marks(
    directory: str, indices: Sequence[int], timeout: float = 60.0
) -> dict[int, list[float]]:
    deadline = time.monotonic() + timeout
    while True:
        marks = read_marks(directory)
        missing = [i for i in indices if i not in marks]
        if not missing:
            return marks
        if time.monotonic() > deadline:
            raise TimeoutError(f"tasks {missing[:5]}... did not start within {timeout:.0f} s")
        time.sleep(0.01)


def wait_finished(store: TaskStore, ids: Sequence[int], timeout: float = 900.0) -> float:
    """Poll the task table until every one of ``ids`` is finished; return that time.time().

    Tasks are claimed in id order (same priority and run_at), so until the last 5 % have
    started a cheap look at those is enough (every 20 ms); after that every 2 ms, asking
    only about the tasks still unfinished. The poll interval is the error of the end time.
    """
    deadline = time.monotonic() + timeout
    tail = list(ids[-max(1, len(ids) // 20) :])
    while len(store.unfinished(tail)) == len(tail):
        if time.monotonic() > deadline:
            raise TimeoutError("the tasks did not finish")
        time.sleep(0.02)
    left: Sequence[int] = ids
    while True:
        left = sorted(store.unfinished(left))
        now = time.time()
        if not left:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(left)} of {len(ids)} tasks still unfinished")
        time.sleep(0.002)


@contextlib.contextmanager
def workers(url: str, marks_dir: str | None) -> Iterator[Lilota]:
    """A Lilota that started PROCESSES worker processes running bench_worker.py."""
    os.environ["LILOTA_BENCH_DB"] = url
    if marks_dir is None:
        os.environ.pop("LILOTA_BENCH_MARKS", None)
    else:
        os.environ["LILOTA_BENCH_MARKS"] = marks_dir
    app = Lilota(url, script_path=WORKER_SCRIPT, number_of_workers=PROCESSES)
    app.start()
    try:
        yield app
    finally:
        app.stop(timeout=60)
        app.store.dispose()


def inputs(n: int, start: int = 0) -> list[dict[str, int]]:
    return [{"i": i} for i in range(start, start + n)]


# --------------------------------------------------------------------------- workloads


def w1_enqueue(backend: Backend, n: int) -> dict[str, float]:
    result: dict[str, float] = {}
    for key in ("w1_per_s", "w1_bulk_per_s"):
        url = backend.new("w1")
        try:
            app = Lilota(url, number_of_workers=0)
            app.start()  # creates the tables; no worker processes
            if key == "w1_per_s":
                t0 = time.perf_counter()
                for i in range(n):
                    app.schedule("noop", {"i": i})
            else:
                t0 = time.perf_counter()
                app.schedule_many("noop", inputs(n))
            result[key] = n / (time.perf_counter() - t0)
            if app.store.count_by_status()["pending"] != n:
                raise RuntimeError("W1: not every task was stored")
            app.stop()
            app.store.dispose()
        finally:
            backend.drop(url)
    return result


def fill_finished(url: str, count: int, chunk: int = 20_000) -> None:
    """``count`` completed no-op tasks, made through the store (add_many, then finish)."""
    store = TaskStore(url)
    store.ensure_schema()
    done = 0
    while done < count:
        size = min(chunk, count - done)
        ids = store.add_many(
            [NewTask(name="noop", input=json.dumps({"i": i})) for i in range(done, done + size)]
        )
        store.finish([Outcome(id=i, fence=0, status="completed") for i in ids])
        done += size
    store.dispose()


def w2_drain(backend: Backend, n: int, template: str | None) -> dict[str, float | str]:
    key = "w2_full" if template else "w2"
    url = backend.copy(template, "w2full") if template else backend.new("w2")
    marks_dir = tempfile.mkdtemp(prefix="lilota-marks-")
    try:
        scheduler = Lilota(url, number_of_workers=0)
        scheduler.start()
        ids = scheduler.schedule_many("noop", inputs(n))
        scheduler.store.dispose()
        backend.analyze(url)
        t_spawn = time.time()
        with workers(url, marks_dir) as app:
            t_done = wait_finished(app.store, ids)
        marks = read_marks(marks_dir)
        t_first = min(min(times) for times in marks.values())
        result: dict[str, float | str] = {
            f"{key}_per_s": n / (t_done - t_first),
            f"{key}_startup_s": t_first - t_spawn,
        }
        twice = sum(1 for times in marks.values() if len(times) > 1)
        if len(marks) != n or twice:
            result[f"{key}_check"] = f"{len(marks)} of {n} tasks started, {twice} more than once"
        return result
    finally:
        shutil.rmtree(marks_dir, ignore_errors=True)
        backend.drop(url)


def w3_latency(backend: Backend, count: int = 50, spacing: float = 0.05) -> dict[str, float]:
    url = backend.new("w3")
    marks_dir = tempfile.mkdtemp(prefix="lilota-marks-")
    try:
        with workers(url, marks_dir) as app:
            app.schedule("noop", {"i": WARMUP})
            wait_for_marks(marks_dir, [WARMUP])
            time.sleep(1.0)
            returned: dict[int, float] = {}
            start = time.perf_counter()
            for k in range(count):
                app.schedule("noop", {"i": k})
                returned[k] = time.time()
                pause = start + (k + 1) * spacing - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            marks = wait_for_marks(marks_dir, list(range(count)))
        delays = sorted((marks[k][0] - returned[k]) * 1000 for k in range(count))
        return {
            "w3_p50_ms": statistics.median(delays),
            "w3_p95_ms": statistics.quantiles(delays, n=100, method="inclusive")[94],
            "w3_max_ms": delays[-1],
        }
    finally:
        shutil.rmtree(marks_dir, ignore_errors=True)
        backend.drop(url)


def _supervisor_child(url: str) -> None:
    """``run.py --supervise URL``: start the workers, print their pids, wait for EOF."""
    os.environ["LILOTA_BENCH_DB"] = url
    os.environ.pop("LILOTA_BENCH_MARKS", None)
    app = Lilota(url, script_path=WORKER_SCRIPT, number_of_workers=PROCESSES)
    app.start()
    print(json.dumps(app.worker_pids), flush=True)
    sys.stdin.read()
    app.stop(timeout=60)


def mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def w4_memory(backend: Backend, total: int) -> dict[str, float]:
    url = backend.new("w4")
    child = None
    try:
        scheduler = Lilota(url, number_of_workers=0)
        scheduler.start()
        child = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--supervise", url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdin is not None
        pids = json.loads(child.stdout.readline())
        sizes: dict[str, float] = {}

        supervisor_pid = child.pid

        def measure(tag: str) -> None:
            sizes[f"w4_worker_{tag}_mib"] = max(mib(p) for p in pids)
            sizes[f"w4_supervisor_{tag}_mib"] = mib(supervisor_pid)

        ids = scheduler.schedule_many("noop", inputs(1000))
        wait_finished(scheduler.store, ids)
        measure("1k")
        ids = []
        while len(ids) < total - 1000:
            size = min(10_000, total - 1000 - len(ids))
            ids += scheduler.schedule_many("noop", inputs(size, 1000 + len(ids)))
        wait_finished(scheduler.store, ids)
        measure("end")
        sizes["w4_worker_growth_mib"] = sizes["w4_worker_end_mib"] - sizes["w4_worker_1k_mib"]
        scheduler.stop()
        scheduler.store.dispose()
        return sizes
    finally:
        if child is not None:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=90)
        backend.drop(url)


# --------------------------------------------------------------------------- report

COLUMNS: list[tuple[str, str, bool]] = [  # key, heading, higher is better
    ("w1_per_s", "W1 schedule()/s", True),
    ("w1_bulk_per_s", "W1 schedule_many /s", True),
    ("w2_per_s", "W2 drain /s", True),
    ("w2_full_per_s", "W2 drain /s, 1M done", True),
    ("w3_p50_ms", "W3 p50 ms", False),
    ("w3_p95_ms", "W3 p95 ms", False),
    ("w4_worker_1k_mib", "W4 worker MiB @1k", False),
    ("w4_worker_end_mib", "W4 worker MiB @100k", False),
    ("w4_worker_growth_mib", "W4 growth MiB", False),
    ("w4_supervisor_end_mib", "W4 supervisor MiB", False),
]


def fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    if key.endswith("_mib"):
        return f"{value:.1f}"
    if key.endswith("_ms"):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return f"{value:,.0f}"


def report(results: dict[str, list[dict[str, Any]]], prefill: int, w4_tasks: int) -> str:
    columns = [
        (
            k,
            h.replace("1M", f"{prefill:,}" if prefill != 1_000_000 else "1M").replace(
                "100k", f"{w4_tasks // 1000}k"
            ),
            b,
        )
        for k, h, b in COLUMNS
    ]
    present = [c for c in columns if any(c[0] in r for rs in results.values() for r in rs)]
    lines = [
        "| backend | " + " | ".join(h for _, h, _ in present) + " |",
        "|---|" + "---:|" * len(present),
    ]
    spreads = []
    for backend, rounds in results.items():
        cells, spread = [], []
        for key, _, _ in present:
            values = [r[key] for r in rounds if r.get(key) is not None]
            cells.append(fmt(statistics.median(values) if values else None, key))
            spread.append(f"{fmt(min(values), key)} to {fmt(max(values), key)}" if values else "-")
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
        spreads.append(f"| {backend} | " + " | ".join(spread) + " |")
    lines += ["", "Spread over the rounds (min to max):", "", lines[0], lines[1], *spreads]
    for backend, rounds in results.items():
        values = [
            r["w2_full_per_s"] / r["w2_per_s"]
            for r in rounds
            if r.get("w2_full_per_s") and r.get("w2_per_s")
        ]
        if values:
            lines.append("")
            lines.append(
                f"{backend}: W2 with {prefill:,} finished rows / W2 empty = "
                f"{statistics.median(values):.2f} (median of the rounds' ratios)"
            )
        problems = [p for r in rounds for p in r.get("errors", [])]
        problems += [v for r in rounds for k, v in r.items() if k.endswith("_check")]
        for p in problems:
            lines.append(f"{backend}: PROBLEM: {p}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


@dataclass
class Plan:
    n: int
    rounds: int
    only: list[str]
    prefill: int
    w4_tasks: int
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def run_backend(backend: Backend, plan: Plan) -> None:
    template = None
    if "w2" in plan.only and plan.prefill:
        log(f"{backend.name}: building {plan.prefill:,} completed tasks (once)")
        t0 = time.perf_counter()
        template = backend.new("fill")
        fill_finished(template, plan.prefill)
        # Every row went pending -> completed in bulk: without VACUUM, the index of
        # pending tasks would still hold a million dead entries, which autovacuum (and
        # btree's own clean-up) removes in a database that finished them one by one.
        backend.vacuum(template)
        log(f"{backend.name}: built in {time.perf_counter() - t0:.0f} s")
    try:
        for rnd in range(1, plan.rounds + 1):
            result: dict[str, Any] = {"errors": []}
            steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
            if "w1" in plan.only:
                steps.append(("w1", lambda: w1_enqueue(backend, plan.n)))
            if "w2" in plan.only:
                steps.append(("w2", lambda: w2_drain(backend, plan.n, None)))
                if template is not None:
                    steps.append(("w2 prefilled", lambda: w2_drain(backend, plan.n, template)))
            if "w3" in plan.only:
                steps.append(("w3", lambda: w3_latency(backend)))
            if "w4" in plan.only:
                steps.append(("w4", lambda: w4_memory(backend, plan.w4_tasks)))
            for name, step in steps:
                log(f"{backend.name}: round {rnd}/{plan.rounds}: {name}")
                try:
                    figures = step()
                except Exception as e:  # one workload failing does not hide the others
                    log(f"{backend.name}: {name} failed: {type(e).__name__}: {e}")
                    result["errors"].append(f"{name}: {type(e).__name__}: {e}")
                    continue
                log(
                    f"{backend.name}: {name}: "
                    + ", ".join(
                        f"{k}={fmt(v, k) if isinstance(v, float) else v}"
                        for k, v in figures.items()
                    )
                )
                result.update(figures)
            plan.results.setdefault(backend.name, []).append(result)
    finally:
        if template is not None:
            backend.drop(template)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=5000, help="tasks in W1 and W2")
    parser.add_argument("--only", default="w1,w2,w3,w4", help="workloads, comma-separated")
    parser.add_argument("--prefill", type=int, default=1_000_000, help="finished rows, W2")
    parser.add_argument("--w4-tasks", type=int, default=100_000)
    parser.add_argument("--pg", default=os.environ.get("LILOTA_BENCH_PG", DEFAULT_PG))
    parser.add_argument("--json", help="write every round's figures to this file")
    parser.add_argument("--supervise", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.supervise:
        _supervisor_child(args.supervise)
        return
    plan = Plan(
        n=args.n,
        rounds=args.rounds,
        only=args.only.split(","),
        prefill=args.prefill,
        w4_tasks=args.w4_tasks,
    )
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for name in args.backends.split(","):
        backend: Backend = SQLiteBackend() if name == "sqlite" else PostgresBackend(args.pg)
        try:
            run_backend(backend, plan)
        finally:
            backend.close()
    print(
        f"lilota benchmarks, {started}; N = {plan.n:,}, {plan.rounds} rounds, "
        f"{PROCESSES} worker processes; Python {platform.python_version()}, "
        f"nproc {os.cpu_count()}\n"
    )
    print(report(plan.results, plan.prefill, plan.w4_tasks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started, "n": plan.n, "results": plan.results}, f, indent=1)


if __name__ == "__main__":
    main()
