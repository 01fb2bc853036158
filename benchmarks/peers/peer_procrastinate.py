"""procrastinate 3.10.0 at its documented defaults.

Connector: ``PsycopgConnector`` (psycopg 3, async), the default. Jobs: an async no-op task
named "noop" taking ``i``. Enqueue: ``await noop.defer_async(i=i)`` per job (the async API of
procrastinate's quick start); bulk: ``await noop.batch_defer_async(...)`` in one call.

Workers: 2 processes, each running ``app.run_worker_async()`` (what ``procrastinate
worker`` runs) with the defaults: concurrency 1, LISTEN/NOTIFY wake-up, polling every 5 s
as the fallback. Finished jobs stay in ``procrastinate_jobs`` as "succeeded". No knob
changed.
"""

from __future__ import annotations

import asyncio
import os
from importlib.metadata import version

import harness
import procrastinate
import psycopg

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ.get(harness.ENV_DB, ""))
)


@app.task(name="noop")
async def noop(i: int) -> None:
    harness.mark(i)


class ProcrastinateQueue(harness.Queue):
    name = "procrastinate"
    version = version("procrastinate")
    notes = "app.run_worker_async(), concurrency 1 (defaults)"

    async def setup(self) -> None:
        self.opened = app.open_async()
        await self.opened.__aenter__()
        await app.schema_manager.apply_schema_async()
        self.conn = psycopg.connect(self.db, autocommit=True)

    def clear(self) -> None:
        self.conn.execute("TRUNCATE procrastinate_jobs CASCADE")

    async def enqueue(self, i: int) -> None:
        await noop.defer_async(i=i)

    async def enqueue_bulk(self, indices: list[int]) -> None:  # type: ignore[override]
        await noop.batch_defer_async(*({"i": i} for i in indices))

    def unfinished(self) -> int:
        sql = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        row = self.conn.execute(sql).fetchone()
        return int(row[0]) if row else 0

    def analyze(self) -> None:
        self.conn.execute("ANALYZE procrastinate_jobs")

    async def close(self) -> None:
        self.conn.close()
        await self.opened.__aexit__(None, None, None)

    @staticmethod
    def worker_main(db: str, variant: str) -> None:
        async def work() -> None:
            async with app.open_async():
                await app.run_worker_async()

        asyncio.run(work())


if __name__ == "__main__":
    harness.main(ProcrastinateQueue)
