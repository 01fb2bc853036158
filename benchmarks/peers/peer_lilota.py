"""lilota (the checkout compare.py installed into this venv) at its defaults.

Database: ``--db`` is a PostgreSQL URL (SQLAlchemy with psycopg 3) or an SQLite file path.
Jobs: a no-op task "noop" taking ``{"i": i}``. Enqueue: ``Lilota.schedule("noop", {"i": i})``
per job, through a ``Lilota(number_of_workers=0)`` (a scheduler without workers, as a web
app has); bulk: ``Lilota.schedule_many("noop", inputs)`` in one call.

Workers: ``Lilota(db, script_path=this file, number_of_workers=2).start()``: lilota's
supervisor starts 2 worker processes, each running this script, which registers the task
on a ``LilotaWorker`` and calls ``start()``. Defaults kept: one task at a time per
process, claims sized by the recent task duration, outcomes recorded with the next claim,
LISTEN/NOTIFY wake-up on PostgreSQL, a file watch on SQLite. No knob changed.

Unfinished: pending or running rows of ``lilota_task``, counted with the driver directly.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from importlib.metadata import version
from typing import Any

import harness

from lilota import Lilota, LilotaWorker

UNFINISHED = "SELECT count(*) FROM lilota_task WHERE status IN ('pending', 'running')"
# Set in the worker processes lilota starts with this file as their script.
ENV_WORKER = "LILOTA_BENCH_LILOTA_WORKER"


def lilota_url(db: str) -> str:
    if db.startswith("postgresql://"):
        return db.replace("postgresql://", "postgresql+psycopg://", 1)
    return f"sqlite:///{db}"


class LilotaQueue(harness.Queue):
    version = version("lilota")
    notes = "Lilota(script_path, number_of_workers=2), defaults"

    def __init__(self, db: str, variant: str) -> None:
        super().__init__(db, variant)
        self.postgres = db.startswith("postgresql://")
        self.name = os.environ.get("LILOTA_BENCH_NAME") or (
            "lilota" if self.postgres else "lilota-sqlite"
        )
        self.conn: Any = None

    def setup(self) -> None:
        self.app = Lilota(lilota_url(self.db), number_of_workers=0)
        self.app.start()  # creates the tables; starts no worker process
        if self.postgres:
            import psycopg

            self.conn = psycopg.connect(self.db, autocommit=True)
        else:
            self.conn = sqlite3.connect(self.db, isolation_level=None, timeout=30)

    def clear(self) -> None:
        self.conn.execute("DELETE FROM lilota_task")
        if self.postgres:
            self.conn.execute("VACUUM lilota_task")

    def enqueue(self, i: int) -> None:
        self.app.schedule("noop", {"i": i})

    def enqueue_bulk(self, indices: list[int]) -> None:  # type: ignore[override]
        self.app.schedule_many("noop", [{"i": i} for i in indices])

    def unfinished(self) -> int:
        return int(self.conn.execute(UNFINISHED).fetchone()[0])

    def analyze(self) -> None:
        if self.postgres:
            self.conn.execute("ANALYZE lilota_task")

    def start_workers(self, processes: int) -> None:
        os.environ[ENV_WORKER] = "1"
        os.environ[harness.ENV_DB] = self.db
        self.pool = Lilota(
            lilota_url(self.db), script_path=os.path.abspath(__file__), number_of_workers=processes
        )
        self.pool.start()

    def stop_workers(self) -> None:
        self.pool.stop()
        self.pool.store.dispose()

    def close(self) -> None:
        self.app.stop()
        self.app.store.dispose()
        self.conn.close()


def worker_main() -> None:
    worker = LilotaWorker(lilota_url(os.environ[harness.ENV_DB]))

    @worker.register("noop")
    def noop(input: dict[str, int]) -> None:
        harness.mark(input["i"])

    worker.start()


if __name__ == "__main__":
    if os.environ.get(ENV_WORKER):
        worker_main()
    else:
        harness.main(LilotaQueue)
    sys.exit(0)
