"""What tracing adds to ``schedule()`` and to each attempt, against what they cost.

    python benchmarks/trace_overhead.py                 # SQLite file, 3,000 schedules
    python benchmarks/trace_overhead.py --n 10000 --db-url postgresql+psycopg://...

Runs in fresh processes, one per case, and prints microseconds per call:

  check      the scheduling check alone (``with tracing.scheduling(name) as t``) and the
             attempt check (``with tracing.attempt_span(claim)``), in a process that never
             imported OpenTelemetry: the cost when it is not installed or not used;
  schedule   ``Lilota.schedule()`` one by one, median of 5 rounds, in three processes:
             OpenTelemetry never imported; imported with an SDK provider but no span
             active (nothing stored, no span); and inside an active span (a producer span
             and the context stored with every task).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CASE = r"""
import json, statistics, sys, time
case, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
from lilota import Lilota, tracing
from lilota.models import Claim
result = {}
if case == "none":
    claim = Claim(id=1, name="x", input=None, attempt=1, max_attempts=1, fence=1)
    for label, make in (("scheduling", lambda: tracing.scheduling("x")),
                        ("attempt", lambda: tracing.attempt_span(claim))):
        started = time.perf_counter()
        for _ in range(200_000):
            with make():
                pass
        result[label] = (time.perf_counter() - started) / 200_000 * 1e6
    assert not [m for m in sys.modules if m.startswith("opentelemetry")]
span = None
if case in ("idle", "active"):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
    if case == "active":
        span = trace.get_tracer("bench").start_span("request")
        trace.use_span(span, end_on_exit=True).__enter__()
app = Lilota(url, number_of_workers=0)
app.schedule("x", {"i": -1})  # tables made, connection pooled
rounds = []
for _ in range(5):
    started = time.perf_counter()
    for i in range(n):
        app.schedule("x", {"i": i})
    rounds.append((time.perf_counter() - started) / n * 1e6)
result["schedule"] = statistics.median(rounds)
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="schedules per round")
    parser.add_argument("--db-url", default=None, help="default: a new SQLite file per case")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for case in ("none", "idle", "active"):
        with tempfile.TemporaryDirectory() as tmp:
            url = args.db_url or f"sqlite:///{tmp}/bench.db"
            out = subprocess.run(
                [sys.executable, "-c", CASE, case, url, str(args.n)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        result = json.loads(out)
        parts = [f"{k} {v:.2f} µs" for k, v in result.items()]
        print(f"{case:7} " + ", ".join(parts))


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.0f} s)")
