"""The workloads of the peer comparison, shared by every system's adapter (stdlib only).

An adapter is one file ``peer_<library>.py`` beside this one: a subclass of :class:`Queue`
that enqueues a no-op job and starts the library's own workers, ending with
``harness.main(TheQueue)``. ``benchmarks/compare.py`` runs each adapter in a venv of its
own, on a fresh database (or Redis database, or SQLite file) per round, and reads the one
JSON line it prints.

Workloads (N = ``--n``):

- **W1 enqueue**: N jobs through the library's per-job call, one after the other (jobs/s);
  then N through its bulk call, if it has one.
- **W2 drain**: N jobs queued (PostgreSQL systems then ANALYZE, so that no run depends on
  when autovacuum first looks at the table); 2 worker processes start; from the first job
  starting to all N finished (jobs/s). Worker start-up is reported apart.
- **W3 latency**: workers started, warmed by one job, idle 1 s; 50 jobs enqueued 50 ms
  apart; from the enqueue call returning to the job function starting: p50, p95 (ms).

**Marks.** Every job function calls :func:`mark` first: one ``write()`` of ``"i time"`` to a
file of its process in ``$LILOTA_BENCH_MARKS``. That gives W3's start times and W2's first
start, and shows that every job ran exactly once. A system that keeps a record of its jobs
answers :meth:`Queue.unfinished` from that record (W2 ends when its own table says all N
are finished); a broker without one leaves it ``None``, and its job calls :func:`done` last,
a second mark, counted instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

ENV_MARKS = "LILOTA_BENCH_MARKS"
ENV_DB = "LILOTA_BENCH_DB"
ENV_VARIANT = "LILOTA_BENCH_VARIANT"
PROCESSES = 2
W3_JOBS = 50
W3_GAP = 0.05
WARMUP = -1
DRAIN_TIMEOUT = 600.0
STARTUP_TIMEOUT = 60.0

# --------------------------------------------------------------------------- marks (workers)

_files: dict[str, int] = {}


def _write(suffix: str, i: int) -> None:
    now = time.time()
    directory = os.environ.get(ENV_MARKS)
    if not directory:
        return
    fd = _files.get(suffix)
    if fd is None:
        path = os.path.join(directory, f"{os.getpid()}.{suffix}")
        fd = _files[suffix] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, f"{i} {now!r}\n".encode())


def mark(i: int) -> None:
    """Job ``i`` starts now (the first thing every job function does)."""
    _write("start", i)


def done(i: int) -> None:
    """Job ``i`` ends now (the last thing a broker system's job function does)."""
    _write("done", i)


def noop_job(i: int) -> None:
    """A ready-made no-op job for libraries that import the job function by dotted name."""
    mark(i)
    done(i)


class Marks:
    """Reads the marks of one workload's directory incrementally."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="lilota-peer-marks-")
        self._offsets: dict[str, int] = {}
        self.starts: dict[int, list[float]] = {}
        self.done: set[int] = set()

    def read(self) -> None:
        for name in os.listdir(self.directory):
            offset = self._offsets.get(name, 0)
            with open(os.path.join(self.directory, name), "rb") as f:
                f.seek(offset)
                data = f.read()
            whole = data.rfind(b"\n") + 1  # a line being written is read next time
            self._offsets[name] = offset + whole
            for line in data[:whole].splitlines():
                i_text, t_text = line.split()
                i, t = int(i_text), float(t_text)
                if name.endswith(".start"):
                    self.starts.setdefault(i, []).append(t)
                else:
                    self.done.add(i)

    def first_start(self) -> float | None:
        times = [t for i, ts in self.starts.items() if i != WARMUP for t in ts]
        return min(times) if times else None

    def check(self, n: int) -> str | None:
        """None if jobs 0..n-1 each started exactly once, else what went wrong."""
        missing = [i for i in range(n) if i not in self.starts]
        twice = [i for i, ts in self.starts.items() if i != WARMUP and len(ts) > 1]
        if missing or twice:
            return f"{len(missing)} jobs never started, {len(twice)} started more than once"
        return None

    def remove(self) -> None:
        for name in os.listdir(self.directory):
            os.remove(os.path.join(self.directory, name))
        os.rmdir(self.directory)


# --------------------------------------------------------------------------- the adapter


class Queue:
    """One queue library, as a user would set it up. Methods may be ``async``."""

    name = "?"
    version = "?"
    notes = ""

    def __init__(self, db: str, variant: str) -> None:
        self.db = db
        self.variant = variant
        self.workers: list[subprocess.Popen[bytes]] = []

    def setup(self) -> Any:
        """Create the library's tables or connect (once)."""

    def clear(self) -> Any:
        """Remove every job (before each workload)."""
        raise NotImplementedError

    def enqueue(self, i: int) -> Any:
        raise NotImplementedError

    # Set to a method taking a list of indices if the library has a bulk call.
    enqueue_bulk: Callable[[list[int]], Any] | None = None

    def unfinished(self) -> Any:
        """Jobs enqueued since clear() and not finished, from the library's own record;
        None (the default) for a system without one: the end marks are counted."""
        return None

    def analyze(self) -> Any:
        """ANALYZE the library's tables (PostgreSQL systems)."""

    def start_workers(self, processes: int) -> Any:
        """Start the library's workers; the default starts ``processes`` processes of this
        adapter running :meth:`worker_main`."""
        for _ in range(processes):
            self.workers.append(spawn([sys.executable, adapter_file(self), "--worker"], self))

    def stop_workers(self) -> Any:
        stop(self.workers)
        self.workers = []

    def close(self) -> Any:
        """Drop connections and whatever setup() made outside the database."""

    @staticmethod
    def worker_main(db: str, variant: str) -> None:
        """Run the library's worker in this process until SIGTERM."""
        raise NotImplementedError


def adapter_file(queue: Queue) -> str:
    return os.path.abspath(sys.modules[type(queue).__module__].__file__ or "")


def spawn(argv: list[str], queue: Queue, **env: str) -> subprocess.Popen[bytes]:
    """Start a worker command with the benchmark's environment (database, variant, marks)."""
    environ = {**os.environ, ENV_DB: queue.db, ENV_VARIANT: queue.variant, **env}
    return subprocess.Popen(argv, env=environ, start_new_session=True)


def stop(processes: Iterable[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """SIGTERM each process (and its process group), then SIGKILL what is left."""
    processes = list(processes)
    for p in processes:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in processes:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()
    for p in processes:  # pool children a main process left behind
        _signal_group(p, signal.SIGKILL)


def _signal_group(p: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signum)


# --------------------------------------------------------------------------- workloads


class Runner:
    def __init__(self, queue: Queue, n: int) -> None:
        self.q = queue
        self.n = n
        self.loop = asyncio.new_event_loop()
        self.result: dict[str, Any] = {
            "system": queue.name,
            "version": queue.version,
            "notes": queue.notes,
            "n": n,
            "errors": [],
        }

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        value = fn(*args)
        if inspect.isawaitable(value):
            value = self.loop.run_until_complete(value)
        return value

    def with_marks(self) -> Marks:
        marks = Marks()
        os.environ[ENV_MARKS] = marks.directory
        return marks

    def left(self, marks: Marks, n: int) -> int:
        count = self.call(self.q.unfinished)
        if count is not None:
            return int(count)
        marks.read()
        return n - len([i for i in marks.done if i != WARMUP])

    def wait_finished(self, marks: Marks, n: int, timeout: float) -> float:
        began = time.monotonic()
        deadline = began + timeout
        while True:
            left = self.left(marks, n)
            if left <= 0:
                return time.time()
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{left} of {n} jobs still unfinished after {timeout:g} s")
            if now > began + STARTUP_TIMEOUT and (marks.read() or not marks.starts):
                raise TimeoutError(
                    f"no job started within {STARTUP_TIMEOUT:g} s (a worker left over from "
                    "an earlier run may be taking them: look for stray processes)"
                )
            time.sleep(0.02 if left > n * 0.05 else 0.002)

    def w1(self) -> None:
        self.call(self.q.clear)
        started = time.perf_counter()
        for i in range(self.n):
            self.call(self.q.enqueue, i)
        self.result["w1_jobs_per_s"] = self.n / (time.perf_counter() - started)
        self._check_queued()
        if self.q.enqueue_bulk is not None:
            self.call(self.q.clear)
            started = time.perf_counter()
            self.call(self.q.enqueue_bulk, list(range(self.n)))
            self.result["w1_bulk_jobs_per_s"] = self.n / (time.perf_counter() - started)
            self._check_queued()

    def _check_queued(self) -> None:
        count = self.call(self.q.unfinished)
        if count is not None and int(count) != self.n:
            self.result["errors"].append(f"W1: {count} jobs queued, not {self.n}")

    def w2(self) -> None:
        self.call(self.q.clear)
        if self.q.enqueue_bulk is not None:
            self.call(self.q.enqueue_bulk, list(range(self.n)))
        else:
            for i in range(self.n):
                self.call(self.q.enqueue, i)
        self.call(self.q.analyze)
        marks = self.with_marks()
        began = time.time()
        self.call(self.q.start_workers, PROCESSES)
        try:
            finished = self.wait_finished(marks, self.n, DRAIN_TIMEOUT)
        finally:
            self.call(self.q.stop_workers)
        marks.read()
        first = marks.first_start()
        if first is None:
            raise RuntimeError("W2: no job started")
        self.result["w2_startup_s"] = first - began
        self.result["w2_jobs_per_s"] = self.n / (finished - first)
        self.result["w2_check"] = marks.check(self.n)
        marks.remove()

    def w3(self) -> None:
        self.call(self.q.clear)
        marks = self.with_marks()
        self.call(self.q.start_workers, PROCESSES)
        try:
            self.call(self.q.enqueue, WARMUP)
            self._wait_started(marks, [WARMUP], 120.0)
            time.sleep(1.0)
            sent: dict[int, float] = {}
            for i in range(W3_JOBS):
                self.call(self.q.enqueue, i)
                sent[i] = time.time()
                time.sleep(W3_GAP)
            self._wait_started(marks, list(range(W3_JOBS)), 60.0)
        finally:
            self.call(self.q.stop_workers)
        delays = sorted((min(marks.starts[i]) - sent[i]) * 1000 for i in range(W3_JOBS))
        self.result["w3_p50_ms"] = statistics.median(delays)
        self.result["w3_p95_ms"] = delays[int(0.95 * (len(delays) - 1))]
        marks.remove()

    def _wait_started(self, marks: Marks, indices: list[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            marks.read()
            if all(i in marks.starts for i in indices):
                return
            if time.monotonic() > deadline:
                missing = [i for i in indices if i not in marks.starts]
                raise TimeoutError(f"{len(missing)} jobs did not start within {timeout:g} s")
            time.sleep(0.001)

    def run(self, workloads: list[str]) -> dict[str, Any]:
        try:
            self.call(self.q.setup)
            for name in workloads:
                try:
                    getattr(self, name)()
                except Exception as e:  # one workload failing leaves the others' figures
                    traceback.print_exc()
                    self.result["errors"].append(f"{name.upper()}: {type(e).__name__}: {e}")
        finally:
            try:
                self.call(self.q.close)
            finally:
                self.loop.close()
        return self.result


def main(queue_class: type[Queue]) -> None:
    parser = argparse.ArgumentParser(description=f"{queue_class.name} in the peer comparison")
    parser.add_argument("--db", default=os.environ.get(ENV_DB, ""))
    parser.add_argument("--variant", default=os.environ.get(ENV_VARIANT, ""))
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--only", default="w1,w2,w3")
    parser.add_argument("--worker", action="store_true", help="run the library's worker")
    args = parser.parse_args()
    if args.worker:
        queue_class.worker_main(args.db, args.variant)
        return
    queue = queue_class(args.db, args.variant)
    workloads = [w.strip() for w in args.only.split(",") if w.strip()]
    result = Runner(queue, args.n).run(workloads)
    print(json.dumps(result), flush=True)
