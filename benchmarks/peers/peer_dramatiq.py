"""dramatiq 2.2.1 with the Redis broker, ``dramatiq peer_dramatiq -p 2 -t 1``, defaults otherwise.

Broker: ``RedisBroker`` on ``$LILOTA_BENCH_REDIS``, set as the global broker at import.
Jobs: an actor "noop" taking ``i`` (queue ``lilota_bench``). Enqueue: ``noop.send(i)``.
dramatiq has no bulk enqueue. Default middleware kept; no result backend.

Workers: the ``dramatiq`` command line with 2 processes of 1 thread each (changed from the
defaults, CPUs and 8, to one job at a time per process as the others run): a main process
and 2 forked workers importing this file by name. Its Redis consumer does not block: an
empty fetch sleeps 5 ms, doubling up to 1 s. Completion: end marks.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import version

import dramatiq
import harness
from dramatiq.brokers.redis import RedisBroker

REDIS_URL = os.environ.get("LILOTA_BENCH_REDIS", "redis://127.0.0.1:6379/15")
broker = RedisBroker(url=REDIS_URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="lilota_bench")
def noop(i: int) -> None:
    harness.mark(i)
    harness.done(i)


class DramatiqQueue(harness.Queue):
    name = "dramatiq-redis"
    version = version("dramatiq")
    notes = "dramatiq -p 2 -t 1, Redis"

    def clear(self) -> None:
        broker.client.flushdb()

    def enqueue(self, i: int) -> None:
        noop.send(i)

    def start_workers(self, processes: int) -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        argv = [
            sys.executable,
            "-m",
            "dramatiq",
            "peer_dramatiq",
            "--processes",
            str(processes),
            "--threads",
            "1",
            "--path",
            here,
        ]
        self.workers.append(harness.spawn(argv, self))

    def close(self) -> None:
        broker.client.flushdb()


if __name__ == "__main__":
    harness.main(DramatiqQueue)
