"""pgqueuer 1.6.0 at its documented defaults.

Driver: asyncpg, as in pgqueuer's quick start. Jobs: an async no-op entrypoint "noop"
whose payload is the index as text. Enqueue: ``Queries.enqueue("noop", payload)`` per job;
bulk: ``Queries.enqueue(entrypoints, payloads, priorities)`` with lists, in one call.

Workers: 2 processes, each running ``pgqueuer.run(factory)`` (what ``pgq run`` runs) with
its defaults: batch_size 10, dequeue_timeout 30 s, no max_concurrent_tasks. Wake-up:
LISTEN/NOTIFY. pgqueuer deletes a finished job from its queue table (completions are
buffered and written in batches), so "unfinished" is the rows left in it. No knob changed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

import asyncpg
import harness
import pgqueuer
from pgqueuer import AsyncpgDriver, PgQueuer, Queries


class PgqueuerQueue(harness.Queue):
    name = "pgqueuer"
    version = version("pgqueuer")
    notes = "pgqueuer.run(factory), batch_size 10 (defaults)"

    async def setup(self) -> None:
        self.conn = await asyncpg.connect(self.db)
        self.queries = Queries(AsyncpgDriver(self.conn))
        await self.queries.install()

    async def clear(self) -> None:
        await self.conn.execute("TRUNCATE pgqueuer")

    async def enqueue(self, i: int) -> None:
        await self.queries.enqueue("noop", str(i).encode())

    async def enqueue_bulk(self, indices: list[int]) -> None:  # type: ignore[override]
        n = len(indices)
        await self.queries.enqueue(["noop"] * n, [str(i).encode() for i in indices], [0] * n)

    async def unfinished(self) -> int:
        return int(await self.conn.fetchval("SELECT count(*) FROM pgqueuer"))

    async def analyze(self) -> None:
        await self.conn.execute("ANALYZE pgqueuer")

    async def close(self) -> None:
        await self.conn.close()

    @staticmethod
    def worker_main(db: str, variant: str) -> None:
        @contextlib.asynccontextmanager
        async def factory() -> AsyncIterator[PgQueuer]:
            conn = await asyncpg.connect(db)
            pgq = PgQueuer(AsyncpgDriver(conn))

            @pgq.entrypoint("noop")
            async def noop(job: Any) -> None:
                harness.mark(int(job.payload))

            yield pgq
            await conn.close()

        asyncio.run(pgqueuer.run(factory))


if __name__ == "__main__":
    harness.main(PgqueuerQueue)
