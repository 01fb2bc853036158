"""lilota against the queues users pick instead, side by side in one run.

    python benchmarks/compare.py                         # every system, 3 rounds, N = 5,000
    python benchmarks/compare.py --set postgres          # lilota, pgqueuer, procrastinate, raw
    python benchmarks/compare.py lilota huey-redis --rounds 5 --n 20000
    python benchmarks/compare.py --before /tmp/lilota-old lilota lilota-before
    python benchmarks/compare.py --results ~/.cache/lilota-bench/results/<run>  # tables only

Self-contained: the workloads are ``benchmarks/peers/harness.py`` (W1 enqueue, W1 bulk,
W2 drain, W3 start latency; its docstring says how each is timed), one adapter per library
beside it (``peer_*.py``, each saying how its workers run and which knobs differ from the
library's defaults). Each system gets a venv of its own under ``$LILOTA_BENCH_ROOT``
(default ``~/.cache/lilota-bench``), made on first use from the package index with the
versions pinned in :data:`SYSTEMS`; lilota's is this checkout (``--before``: another one).

Each round: pgbench's single-row UPDATE as the physical reference, then every system on a
fresh database (PostgreSQL: ``CREATE DATABASE``; SQLite: a new file; Redis: its database
flushed; RabbitMQ: its queue purged), in an order rotated each round. Servers:

- PostgreSQL: ``--pg`` or ``$LILOTA_BENCH_PG`` (an admin URL), else 127.0.0.1:5432 as
  ``postgres``; if none answers, a throwaway cluster from the local binaries (durability
  off: the tables say so).
- Redis: ``$LILOTA_BENCH_REDIS`` (default ``redis://127.0.0.1:6379/15``; the database is
  flushed), RabbitMQ: ``$LILOTA_BENCH_AMQP`` (default ``amqp://guest:guest@127.0.0.1:5672//``,
  queue ``lilota_bench``). A system whose server does not answer is left out, saying so.

Prints medians (min-max) per system and lilota's ratio to each; ``--json`` keeps every
round's figures. Run it on a quiet machine and read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")
PSYCOPG = "psycopg[binary]==3.3.9"
REDIS = "redis==8.1.0"


@dataclass(frozen=True)
class System:
    adapter: str
    variant: str
    requires: tuple[str, ...]
    server: str  # postgres, sqlite, redis, rabbitmq


SYSTEMS: dict[str, System] = {
    "lilota": System(
        "peer_lilota.py",
        "",
        (
            "-e",
            "{lilota}[postgres]",
        ),
        "postgres",
    ),
    "lilota-sqlite": System("peer_lilota.py", "", ("-e", "{lilota}[postgres]"), "sqlite"),
    "pgqueuer": System("peer_pgqueuer.py", "", ("pgqueuer[asyncpg]==1.6.0", PSYCOPG), "postgres"),
    "procrastinate": System(
        "peer_procrastinate.py", "", ("procrastinate==3.10.0", PSYCOPG), "postgres"
    ),
    "raw": System("peer_raw.py", "1", (PSYCOPG,), "postgres"),
    "raw-batch": System("peer_raw.py", "100", (PSYCOPG,), "postgres"),
    "celery-redis": System("peer_celery.py", "redis", ("celery[redis]==5.7.0", REDIS), "redis"),
    "celery-redis-results": System(
        "peer_celery.py", "redis-results", ("celery[redis]==5.7.0", REDIS), "redis"
    ),
    "celery-rabbitmq": System("peer_celery.py", "rabbitmq", ("celery==5.7.0",), "rabbitmq"),
    "rq": System("peer_rq.py", "", ("rq==3.0.0", REDIS), "redis"),
    "huey-redis": System("peer_huey.py", "redis", ("huey==3.5.4", REDIS), "redis"),
    "huey-sqlite": System("peer_huey.py", "sqlite", ("huey==3.5.4",), "sqlite"),
    "dramatiq-redis": System("peer_dramatiq.py", "", ("dramatiq[redis]==2.2.1", REDIS), "redis"),
}
SETS = {
    "postgres": ["lilota", "pgqueuer", "procrastinate", "raw", "raw-batch"],
    "brokers": [
        "lilota",
        "celery-redis",
        "celery-redis-results",
        "celery-rabbitmq",
        "rq",
        "huey-redis",
        "dramatiq-redis",
    ],
    "sqlite": ["lilota-sqlite", "huey-sqlite"],
}
FIGURES = [  # key, heading, higher is better
    ("w1_jobs_per_s", "W1 jobs/s", True),
    ("w1_bulk_jobs_per_s", "W1 bulk jobs/s", True),
    ("w2_jobs_per_s", "W2 jobs/s", True),
    ("w3_p50_ms", "W3 p50 ms", False),
    ("w3_p95_ms", "W3 p95 ms", False),
]
PGBENCH_SECONDS = 10
PGBENCH_SCRIPT = "\\set aid random(1, 100000)\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n"


def log(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- venvs


def venv_for(root: str, requires: list[str]) -> str:
    """The python of a venv holding ``requires`` (made once, keyed by the list)."""
    key = hashlib.sha256("\n".join([sys.version, *requires]).encode()).hexdigest()[:12]
    venv = os.path.join(root, "venvs", key)
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(os.path.join(venv, "ready")):
        return python
    log(f"making a venv for {' '.join(requires)}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *requires], check=True)
    freeze = subprocess.run([python, "-m", "pip", "freeze"], check=True, capture_output=True)
    with open(os.path.join(venv, "ready"), "wb") as f:
        f.write(freeze.stdout)
    return python


# --------------------------------------------------------------------------- servers


def answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


class Postgres:
    """Fresh databases on one server (``admin``: a URL of a database to connect to)."""

    def __init__(self, admin: str | None) -> None:
        import psycopg

        self.psycopg = psycopg
        self.cluster: Any = None
        self.note = ""
        admin = admin or os.environ.get("LILOTA_BENCH_PG")
        if admin is None:
            if answers("127.0.0.1", 5432):
                admin = "postgresql://postgres@127.0.0.1:5432/postgres"
            else:
                admin = self._throwaway()
        parts = urlsplit(admin)
        if parts.path in ("", "/"):
            parts = parts._replace(path="/postgres")
        self.admin = urlunsplit(parts)
        with psycopg.connect(self.admin, connect_timeout=10) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            self.version = f"PostgreSQL {row[0] if row else '?'}"
        self.made: list[str] = []

    def _throwaway(self) -> str:
        sys.path.insert(0, REPO)
        from lilota.pglocal import LocalPostgresCluster

        log("no PostgreSQL at 127.0.0.1:5432: starting a throwaway cluster (durability off)")
        self.cluster = LocalPostgresCluster()
        self.cluster.init()
        self.cluster.start()
        self.note = " (throwaway cluster, fsync off)"
        return str(self.cluster.url)

    def _admin(self, sql: str) -> None:
        with self.psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(sql)

    def new(self) -> str:
        name = f"lilota_peers_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE DATABASE "{name}"')
        self.made.append(name)
        return urlunsplit(urlsplit(self.admin)._replace(path=f"/{name}"))

    def drop(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pgbench(self) -> float | None:
        """Commits/s of one client doing single-row UPDATEs, or None without pgbench."""
        tool = shutil.which("pgbench") or next(
            (p for p in sorted(glob_bin("pgbench"), reverse=True)), None
        )
        if tool is None:
            return None
        url = self.new()
        try:
            subprocess.run([tool, "-q", "-i", "-s", "1", url], check=True, capture_output=True)
            with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
                f.write(PGBENCH_SCRIPT)
            out = subprocess.run(
                [tool, "-n", "-c", "1", "-T", str(PGBENCH_SECONDS), "-f", f.name, url],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            os.unlink(f.name)
            for line in out.splitlines():
                if line.startswith("tps ="):
                    return float(line.split()[2])
            return None
        finally:
            self.drop(url)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.cleanup()


def glob_bin(name: str) -> list[str]:
    import glob

    return glob.glob(f"/usr/lib/postgresql/*/bin/{name}")


# --------------------------------------------------------------------------- one run


def run_system(
    name: str,
    python: str,
    system: System,
    db: str,
    args: argparse.Namespace,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": PEERS,
        "LILOTA_BENCH_NAME": name,
        "LILOTA_BENCH_DB": db,  # the adapters of libraries configured at import read these
        "LILOTA_BENCH_VARIANT": system.variant,
        "LILOTA_BENCH_REDIS": os.environ.get("LILOTA_BENCH_REDIS", "redis://127.0.0.1:6379/15"),
        "LILOTA_BENCH_AMQP": os.environ.get(
            "LILOTA_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//"
        ),
        **extra_env,
    }
    argv = [python, os.path.join(PEERS, system.adapter), "--db", db, "--n", str(args.n)]
    argv += ["--variant", system.variant, "--only", args.only]
    started = time.monotonic()
    try:
        # From a temporary directory: worker processes started as "python -c" put their
        # working directory first on sys.path, and a checkout there would shadow the venv's.
        with tempfile.TemporaryDirectory() as cwd:
            out = subprocess.run(
                argv, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True, timeout=args.timeout
            ).stdout
        result = json.loads(out.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, ValueError) as e:
        result = {"system": name, "errors": [f"run failed: {type(e).__name__}: {e}"]}
    result["system"] = name
    result["seconds"] = time.monotonic() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("systems", nargs="*", help=f"of {', '.join(SYSTEMS)} (default: all)")
    parser.add_argument("--set", choices=sorted(SETS), help="a named group of systems")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--only", default="w1,w2,w3", help="workloads, e.g. w2,w3")
    parser.add_argument("--pg", help="admin URL of the PostgreSQL server to use")
    parser.add_argument(
        "--before", metavar="CHECKOUT", help="another lilota checkout, as lilota-before"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="per system run (s)")
    parser.add_argument("--json", help="write every round's figures here")
    parser.add_argument("--results", help="print the tables of an earlier --json file only")
    args = parser.parse_args()
    if args.results:
        with open(args.results) as f:
            print(report(json.load(f)))
        return
    names = list(args.systems) or (SETS[args.set] if args.set else list(SYSTEMS))
    if args.before and "lilota-before" not in names:
        names.insert(1, "lilota-before")
    unknown = [n for n in names if n not in SYSTEMS and n != "lilota-before"]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    if "lilota-before" in names and not args.before:
        parser.error("lilota-before needs --before CHECKOUT")
    root = os.environ.get("LILOTA_BENCH_ROOT", os.path.expanduser("~/.cache/lilota-bench"))
    systems = {n: SYSTEMS.get(n, SYSTEMS["lilota"]) for n in names}
    reachable = servers_reachable(systems)
    names = [n for n in names if reachable[systems[n].server]]
    pythons: dict[str, str] = {}
    for n in names:
        checkout = os.path.abspath(args.before) if n == "lilota-before" else REPO
        requires = [r.replace("{lilota}", checkout) for r in systems[n].requires]
        pythons[n] = venv_for(root, requires)
    pg = Postgres(args.pg) if any(systems[n].server == "postgres" for n in names) else None
    runs: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "postgres": (pg.version + pg.note) if pg else None,
        "n": args.n,
        "pgbench": [],
        "rounds": [],
    }
    scratch = tempfile.mkdtemp(prefix="lilota-peers-")
    try:
        for r in range(args.rounds):
            if pg is not None:
                tps = pg.pgbench()
                runs["pgbench"].append(tps)
                log(f"round {r + 1}: pgbench {tps} commits/s")
            order = names[r % len(names) :] + names[: r % len(names)]
            results = []
            for n in order:
                system = systems[n]
                db = (
                    pg.new()
                    if system.server == "postgres" and pg
                    else os.path.join(scratch, f"{n}-{r}.db")
                )
                log(f"round {r + 1}: {n}")
                result = run_system(n, pythons[n], system, db, args, {})
                if system.server == "postgres" and pg:
                    pg.drop(db)
                log(f"  {json.dumps({k: v for k, v in result.items() if k != 'notes'})}")
                results.append(result)
            runs["rounds"].append(results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if pg is not None:
            pg.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    print(report(runs))


def servers_reachable(systems: dict[str, System]) -> dict[str, bool]:
    redis = urlsplit(os.environ.get("LILOTA_BENCH_REDIS", "redis://127.0.0.1:6379/15"))
    amqp = urlsplit(os.environ.get("LILOTA_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//"))
    found = {
        "postgres": True,
        "sqlite": True,
        "redis": answers(redis.hostname or "127.0.0.1", redis.port or 6379),
        "rabbitmq": answers(amqp.hostname or "127.0.0.1", amqp.port or 5672),
    }
    for name, system in systems.items():
        if not found[system.server]:
            log(f"leaving out {name}: no {system.server} server answers")
    return found


# --------------------------------------------------------------------------- tables


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.median(values)
    fmt = (lambda v: f"{v:,.0f}") if m >= 100 else (lambda v: f"{v:.2f}")
    if len(values) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(min(values))}-{fmt(max(values))})"


def report(runs: dict[str, Any]) -> str:
    by_system: dict[str, list[dict[str, Any]]] = {}
    for results in runs["rounds"]:
        for result in results:
            by_system.setdefault(result["system"], []).append(result)
    tps = [t for t in runs.get("pgbench", []) if t]
    lines = [
        f"{runs['date']}; {runs['machine']}; Python {runs['python']}; {runs.get('postgres') or ''}",
        f"N = {runs['n']:,}, {len(runs['rounds'])} round(s); medians (min-max)"
        + (f"; pgbench single-row UPDATE {_cell(tps)} commits/s" if tps else ""),
        "",
        "| system | version | " + " | ".join(h for _, h, _ in FIGURES) + " |",
        "|---|---|" + "---:|" * len(FIGURES),
    ]
    for system, results in by_system.items():
        cells = [_cell([r[k] for r in results if r.get(k) is not None]) for k, _, _ in FIGURES]
        version = results[0].get("version", "?")
        lines.append(f"| {system} | {version} | " + " | ".join(cells) + " |")
    for mine in ("lilota", "lilota-sqlite"):
        if mine not in by_system:
            continue
        ours = {
            k: _median([r[k] for r in by_system[mine] if r.get(k) is not None])
            for k, _, _ in FIGURES
        }
        lines += [
            "",
            f"{mine} as a ratio to each system (> 1: {mine} is faster, or starts sooner)",
            "",
            f"| {mine} vs | " + " | ".join(h for _, h, _ in FIGURES) + " |",
            "|---|" + "---:|" * len(FIGURES),
        ]
        for system, results in by_system.items():
            if system == mine:
                continue
            cells = []
            for key, _, higher in FIGURES:
                theirs = _median([r[key] for r in results if r.get(key) is not None])
                if not ours[key] or not theirs:
                    cells.append("-")
                else:
                    cells.append(f"{(ours[key] / theirs if higher else theirs / ours[key]):.2f}x")
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
    problems = [
        f"{system}: {p}"
        for system, results in by_system.items()
        for r in results
        for p in r.get("errors", []) + ([r["w2_check"]] if r.get("w2_check") else [])
    ]
    lines += [""] + [f"PROBLEM: {p}" for p in problems] if problems else []
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        import psycopg  # noqa: F401
    except ImportError:  # run again in a venv of our own that has it
        root = os.environ.get("LILOTA_BENCH_ROOT", os.path.expanduser("~/.cache/lilota-bench"))
        python = venv_for(root, [PSYCOPG])
        os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])
    main()
