"""RQ 3.0.0 at its defaults: the default Worker, which forks a work horse per job.

Redis: ``$LILOTA_BENCH_REDIS`` (its database is flushed between workloads). Jobs:
``harness.noop_job(i)`` (RQ imports the job function by dotted name in the worker and
refuses functions of ``__main__``). Enqueue: ``Queue.enqueue(noop_job, i)``; bulk:
``Queue.enqueue_many`` of ``Queue.prepare_data(...)`` (one pipeline). Defaults kept:
result_ttl 500 s, job timeout 180 s, logging at INFO.

Workers: 2 processes, each running ``Worker([queue]).work()`` (what ``rq worker`` runs):
BLPOP (no polling), then a forked work horse per job. Completion: end marks.
"""

from __future__ import annotations

import os
from importlib.metadata import version

import harness
from redis import Redis
from rq import Queue, Worker

REDIS_URL = os.environ.get("LILOTA_BENCH_REDIS", "redis://127.0.0.1:6379/15")


class RqQueue(harness.Queue):
    name = "rq"
    version = version("rq")
    notes = "Worker (fork per job), 2 processes"

    def setup(self) -> None:
        self.redis = Redis.from_url(REDIS_URL)
        self.queue = Queue("lilota_bench", connection=self.redis)

    def clear(self) -> None:
        self.redis.flushdb()

    def enqueue(self, i: int) -> None:
        self.queue.enqueue(harness.noop_job, i)

    def enqueue_bulk(self, indices: list[int]) -> None:  # type: ignore[override]
        self.queue.enqueue_many([Queue.prepare_data(harness.noop_job, (i,)) for i in indices])

    def close(self) -> None:
        self.redis.flushdb()

    @staticmethod
    def worker_main(db: str, variant: str) -> None:
        redis = Redis.from_url(REDIS_URL)
        Worker([Queue("lilota_bench", connection=redis)], connection=redis).work()


if __name__ == "__main__":
    harness.main(RqQueue)
