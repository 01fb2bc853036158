"""Worker script of the lilota benchmarks (script mode: started by ``Lilota(script_path=...)``).

It registers one no-op task, ``noop``, taking ``{"i": i}``. The task's first and only
action is ``mark(i)``: one ``write()`` of ``"i time.time()"`` to a file of this process in
``$LILOTA_BENCH_MARKS`` (as benchmarks/peers/harness.py does), which gives the start time of
every task and shows that each ran exactly once. Without that variable it does nothing.

The database URL comes from ``$LILOTA_BENCH_DB``.
"""

from __future__ import annotations

import os
import sys
import time

# Run from a checkout: the repository root (this file's parent's parent) comes first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lilota import LilotaWorker

_marks_fd: int | None = None


def mark(i: int) -> None:
    """Record that task ``i`` starts now: one small write, no database round trip."""
    global _marks_fd
    now = time.time()
    directory = os.environ.get("LILOTA_BENCH_MARKS")
    if not directory:
        return
    if _marks_fd is None:
        path = os.path.join(directory, f"{os.getpid()}.txt")
        _marks_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_marks_fd, f"{i} {now!r}\n".encode())


worker = LilotaWorker(os.environ["LILOTA_BENCH_DB"])


@worker.register("noop")
def noop(input: dict[str, int]) -> None:
    mark(input["i"])


if __name__ == "__main__":
    worker.start()
