"""lilota (this repository) against pgqueuer, procrastinate and raw psycopg, in one run.

    python benchmarks/compare.py                        # lilota-dev pgqueuer procrastinate raw
    R=5 python benchmarks/compare.py lilota_dev pgqueuer raw_batch
    python benchmarks/compare.py --before /tmp/lilota-old    # also an older checkout
    python benchmarks/compare.py --results /tmp/bench/results/<run>   # only the ratios

Copies the shared queue benchmark (``$SHARED_BENCH``, default /work/shared/bench: W1
enqueue, W2 drain, W3 latency on one throwaway PostgreSQL 15, 127.0.0.1:55433) to a
temporary directory, adds ``bench_adapter_lilota.py`` as ``adapters/lilota_dev.py``
(installed editable from this checkout into its own Python 3.12 venv), and runs the
bench's ``run.sh`` with the chosen adapters: R rounds (default 3), each round pgbench
then every adapter on a fresh database. ``run.sh`` prints its tables; this script then
prints lilota-dev's medians as ratios to every other system of the same run.

Environment passed through to run.sh: R, N, PGBENCH_SECONDS, ADAPTER_TIMEOUT, BENCH_ROOT.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_SYSTEMS = ["lilota_dev", "pgqueuer", "procrastinate", "raw"]
ME = "lilota-dev"
FIGURES = [  # key, heading, higher is better
    ("w1_jobs_per_s", "W1 jobs/s", True),
    ("w1_bulk_jobs_per_s", "W1 bulk jobs/s", True),
    ("w2_jobs_per_s", "W2 jobs/s", True),
    ("w3_p50_ms", "W3 p50 ms", False),
    ("w3_p95_ms", "W3 p95 ms", False),
]


def prepare(shared: str, before: str | None) -> str:
    """A writable copy of the shared bench with this repo's adapter in it (and, with
    ``before``, the same adapter for another checkout, as adapters/lilota_before.py)."""
    work = tempfile.mkdtemp(prefix="lilota-compare-")
    bench = os.path.join(work, "bench")
    shutil.copytree(shared, bench)
    for root, dirs, files in os.walk(bench):
        for name in dirs + files:
            path = os.path.join(root, name)
            os.chmod(path, os.stat(path).st_mode | 0o200)
    with open(os.path.join(HERE, "bench_adapter_lilota.py")) as f:
        template = f.read()
    with open(os.path.join(bench, "adapters", "lilota_dev.py"), "w") as f:
        f.write(template.replace("@REPO@", REPO, 1))
    if before is not None:
        with open(os.path.join(bench, "adapters", "lilota_before.py"), "w") as f:
            f.write(
                template.replace("@REPO@", os.path.abspath(before), 1).replace(
                    f'name = "{ME}"', 'name = "lilota-before"', 1
                )
            )
    return bench


def load(directory: str) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in glob.glob(os.path.join(directory, "*-*.json")):
        adapter = os.path.basename(path)[:-5].rsplit("-", 1)[0]
        try:
            with open(path) as f:
                result = json.loads(f.read().strip().splitlines()[-1])
        except (IndexError, ValueError):
            continue
        runs.setdefault(result.get("system", adapter), []).append(result)
    return runs


def median(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratios(directory: str) -> str:
    runs = load(directory)
    if ME not in runs:
        return f"compare: no {ME} results in {directory}"
    mine = {key: median(runs[ME], key) for key, _, _ in FIGURES}
    lines = [
        f"{ME} as a ratio to each system, medians of the same run ({directory}).",
        "> 1 means lilota-dev is better (faster, or lower latency).",
        "",
        "| lilota-dev vs | " + " | ".join(h for _, h, _ in FIGURES) + " |",
        "|---|" + "---:|" * len(FIGURES),
    ]
    for system, results in sorted(runs.items()):
        if system == ME:
            continue
        cells = []
        for key, _, higher in FIGURES:
            theirs = median(results, key)
            ours = mine[key]
            if not ours or not theirs:
                cells.append("-")
                continue
            ratio = ours / theirs if higher else theirs / ours
            cells.append(f"{ratio:.2f}x")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    best = [
        b
        for b in (median(runs.get(s, []), "w2_jobs_per_s") for s in ("pgqueuer", "procrastinate"))
        if b
    ]
    drain = mine["w2_jobs_per_s"]
    if best and drain:
        lines += [
            "",
            f"W2: lilota-dev {drain:,.0f} jobs/s = {drain / max(best):.2f}x the faster of "
            f"pgqueuer and procrastinate ({max(best):,.0f} jobs/s).",
        ]
    problems = [
        f"{s}: {p}"
        for s, rs in runs.items()
        for r in rs
        for p in r.get("errors", []) + ([r["w2_check"]] if r.get("w2_check") else [])
    ]
    lines += [f"PROBLEM: {p}" for p in problems]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("systems", nargs="*", default=DEFAULT_SYSTEMS)
    parser.add_argument("--shared", default=os.environ.get("SHARED_BENCH", "/work/shared/bench"))
    parser.add_argument("--results", help="only print the ratios of this results directory")
    parser.add_argument(
        "--before",
        metavar="CHECKOUT",
        help="also run another checkout of lilota (e.g. an older commit, from git archive) "
        "as the system lilota-before; name lilota_before among the systems",
    )
    args = parser.parse_args()
    if args.results:
        print(ratios(args.results))
        return
    root = os.environ.setdefault("BENCH_ROOT", "/tmp/bench")
    results_root = os.path.join(root, "results")
    before = set(os.listdir(results_root)) if os.path.isdir(results_root) else set()
    systems = list(args.systems)
    if args.before and "lilota_before" not in systems:
        systems.insert(1, "lilota_before")
    bench = prepare(args.shared, args.before)
    try:
        # From the temporary directory: worker processes started as "python -c ..." put
        # their working directory first on sys.path, and a checkout there would be imported
        # instead of the adapter's own lilota.
        code = subprocess.call(
            [os.path.join(bench, "run.sh"), *systems], cwd=os.path.dirname(bench)
        )
        after = set(os.listdir(results_root)) if os.path.isdir(results_root) else set()
        new = sorted(after - before)
        if not new:
            sys.exit(f"compare: run.sh left no results (exit {code})")
        print()
        print(ratios(os.path.join(results_root, new[-1])))
        sys.exit(code)
    finally:
        shutil.rmtree(os.path.dirname(bench), ignore_errors=True)


if __name__ == "__main__":
    main()
