"""huey 3.5.4, consumer ``-k process -w 2``, with Redis or SQLite storage, defaults otherwise.

Variants: "redis" (``RedisHuey`` on ``$LILOTA_BENCH_REDIS``: blocking dequeue, no polling)
and "sqlite" (``SqliteHuey`` on the file ``--db``: journal_mode=wal and SQLite's default
synchronous setting, huey's defaults; it cannot block, so idle workers poll, from 0.1 s
growing by 1.15 per empty poll up to 10 s, huey's defaults). Jobs: a task "noop" taking
``i`` (``huey.task()``); enqueue: ``noop(i)``. huey has no bulk enqueue call.

Workers: one consumer process with 2 worker processes (what ``huey_consumer module.huey
-k process -w 2`` runs), started from this file, because huey names a task after its module
("__main__.noop" on both sides). Completion: end marks (results are not stored for None).
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version

import harness
from huey import RedisHuey, SqliteHuey
from huey.consumer_options import ConsumerConfig

VARIANT = os.environ.get(harness.ENV_VARIANT, "redis")
REDIS_URL = os.environ.get("LILOTA_BENCH_REDIS", "redis://127.0.0.1:6379/15")

if VARIANT == "sqlite":
    huey = SqliteHuey("lilota_bench", filename=os.environ.get(harness.ENV_DB, "huey.db"))
else:
    huey = RedisHuey("lilota_bench", url=REDIS_URL)


@huey.task()
def noop(i: int) -> None:
    harness.mark(i)
    harness.done(i)


class HueyQueue(harness.Queue):
    version = version("huey")

    def __init__(self, db: str, variant: str) -> None:
        super().__init__(db, variant)
        self.name = f"huey-{VARIANT}"
        self.notes = f"consumer -k process -w 2, {VARIANT} storage"

    def clear(self) -> None:
        huey.flush()

    def enqueue(self, i: int) -> None:
        noop(i)

    def start_workers(self, processes: int) -> None:
        argv = [sys.executable, harness.adapter_file(self), "--worker"]
        self.workers.append(harness.spawn(argv, self))

    def close(self) -> None:
        huey.flush()

    @staticmethod
    def worker_main(db: str, variant: str) -> None:
        config = ConsumerConfig(workers=harness.PROCESSES, worker_type="process")
        config.validate()
        config.setup_logger()
        huey.create_consumer(**config.values).run()


if __name__ == "__main__":
    harness.main(HueyQueue)
