# requires: -e @REPO@ SQLAlchemy==2.1.9 psycopg[binary]==3.3.9
"""lilota from this repository (the working tree, installed editable) at its defaults.

Adapter for the shared queue benchmark (bench/harness.py); benchmarks/compare.py copies
it into a copy of that bench as adapters/lilota_dev.py, with @REPO@ on the first line
replaced by this repository's path.

Database: SQLAlchemy with psycopg 3 (postgresql+psycopg://). Jobs: a no-op task "noop"
taking {"i": i}. Enqueue: Lilota.schedule("noop", {"i": i}) per job, through a
Lilota(number_of_workers=0) (a scheduler without workers, as a web app has); bulk:
Lilota.schedule_many("noop", inputs) in one call.

Workers: Lilota(script_path=this file, number_of_workers=2).start(): lilota's supervisor
starts 2 worker processes, each running this script, which registers the task on a
LilotaWorker and calls start(). Defaults kept: one task at a time per process, claims
sized by the recent task duration (up to 100 per claim for no-op tasks), outcomes recorded
with the next claim in one transaction, LISTEN/NOTIFY wake-up. No knob changed.

The harness needs SQL of its own: ``unfinished_sql`` (pending or running tasks) and
``clear`` (TRUNCATE between workloads). lilota itself speaks SQL only in lilota/store.py.
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from importlib.metadata import version  # noqa: E402

import harness  # noqa: E402
import psycopg  # noqa: E402

from lilota import Lilota, LilotaWorker  # noqa: E402


def sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


class LilotaDevQueue(harness.Queue):
    name = "lilota-dev"
    version = version("lilota")
    notes = (
        "this repo; Lilota(script_path, number_of_workers=2); adaptive claim batches, "
        "LISTEN/NOTIFY (defaults)"
    )
    unfinished_sql = "SELECT count(*) FROM lilota_task WHERE status IN ('pending', 'running')"

    def setup(self):
        self.app = Lilota(sqlalchemy_url(self.url), number_of_workers=0)
        self.app.start()  # creates the tables; starts no worker process
        self.conn = psycopg.connect(self.url, autocommit=True)

    def clear(self):
        self.conn.execute("TRUNCATE lilota_task")

    def enqueue(self, i):
        self.app.schedule("noop", {"i": i})

    def enqueue_bulk(self, indices):
        self.app.schedule_many("noop", [{"i": i} for i in indices])

    def start_workers(self, processes):
        self.workers = Lilota(
            sqlalchemy_url(self.url),
            script_path=os.path.abspath(__file__),
            number_of_workers=processes,
        )
        self.workers.start()

    def stop_workers(self):
        self.workers.stop()
        self.workers.store.dispose()

    def close(self):
        self.app.stop()
        self.app.store.dispose()
        self.conn.close()

    @staticmethod
    def worker_main(url):
        worker = LilotaWorker(sqlalchemy_url(url))

        @worker.register("noop")
        def noop(input: dict) -> None:
            harness.mark(input["i"])

        worker.start()


if __name__ == "__main__":
    harness.main(LilotaDevQueue)
