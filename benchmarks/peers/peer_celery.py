"""Celery 5.7.0 with a Redis or RabbitMQ broker, at its defaults otherwise.

Variants: "redis" (broker ``$LILOTA_BENCH_REDIS``, results ignored), "redis-results" (the
same with the Redis result backend: every task writes its state, the closest Celery set-up
to a durable record per task), "rabbitmq" (broker ``$LILOTA_BENCH_AMQP``, results ignored;
the queue durable and messages persistent, Celery's defaults). Queue ``lilota_bench``.
Jobs: a task "noop" taking ``i``. Enqueue: ``noop.delay(i)``; bulk:
``group(noop.s(i) for i in indices).apply_async()`` (one producer, a message per task).
Knob changed: ``task_ignore_result=True`` except in "redis-results".

Workers: one ``celery worker --pool=prefork --concurrency=2`` (``app.worker_main``): a main
process consuming from the broker (pushed, no polling) and 2 forked pool processes.
Defaults kept: prefetch multiplier 4, early acks, gossip, mingle and heartbeat on.
Completion: no record of finished tasks, so the job writes an end mark (harness.done).
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version

import harness
from celery import Celery, group

VARIANT = os.environ.get(harness.ENV_VARIANT, "redis")
REDIS_URL = os.environ.get("LILOTA_BENCH_REDIS", "redis://127.0.0.1:6379/15")
AMQP_URL = os.environ.get("LILOTA_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = "lilota_bench"

app = Celery("lilota_bench", broker=AMQP_URL if VARIANT == "rabbitmq" else REDIS_URL)
app.conf.task_default_queue = QUEUE
if VARIANT == "redis-results":
    app.conf.result_backend = REDIS_URL
else:
    app.conf.task_ignore_result = True


@app.task(name="noop")
def noop(i: int) -> None:
    harness.mark(i)
    harness.done(i)


class CeleryQueue(harness.Queue):
    version = version("celery")

    def __init__(self, db: str, variant: str) -> None:
        super().__init__(db, variant)
        self.name = f"celery-{VARIANT}"
        self.notes = f"prefork, concurrency 2, {VARIANT}"

    def clear(self) -> None:
        app.control.purge()

    def enqueue(self, i: int) -> None:
        noop.delay(i)

    def enqueue_bulk(self, indices: list[int]) -> None:  # type: ignore[override]
        group(noop.s(i) for i in indices).apply_async()

    def start_workers(self, processes: int) -> None:
        argv = [sys.executable, harness.adapter_file(self), "--worker"]
        self.workers.append(harness.spawn(argv, self))

    def close(self) -> None:
        app.control.purge()
        if VARIANT != "rabbitmq":
            import redis

            redis.Redis.from_url(REDIS_URL).flushdb()

    @staticmethod
    def worker_main(db: str, variant: str) -> None:
        app.worker_main(
            [
                "worker",
                "--pool=prefork",
                f"--concurrency={harness.PROCESSES}",
                "--loglevel=WARNING",
                "-Q",
                QUEUE,
            ]
        )


if __name__ == "__main__":
    harness.main(CeleryQueue)
