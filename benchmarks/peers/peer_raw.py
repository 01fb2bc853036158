"""raw: a minimal queue in plain psycopg 3, the floor of Python + PostgreSQL per job.

What every real queue needs and nothing more: one table; an INSERT per job (a statement
trigger sends NOTIFY); a worker that claims with ``UPDATE ... WHERE id IN (SELECT ... FOR
UPDATE SKIP LOCKED LIMIT k) RETURNING``, runs the jobs and marks them done in a second
transaction. Variant "1" (system ``raw``): one job per claim, 2 commits per job. Variant
"100" (system ``raw-batch``): up to 100 jobs per claim and per completion. An idle worker
waits on LISTEN (1 s timeout), then looks again. Bulk enqueue: one INSERT from unnest().

Workers: 2 processes, one job at a time each, one connection each plus one that LISTENs.
"""

from __future__ import annotations

import signal
from importlib.metadata import version

import harness
import psycopg

SCHEMA = """
CREATE TABLE IF NOT EXISTS raw_job (
    id bigserial PRIMARY KEY,
    args jsonb NOT NULL,
    state text NOT NULL DEFAULT 'queued',
    enqueued_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS raw_job_queued ON raw_job (id) WHERE state = 'queued';
CREATE OR REPLACE FUNCTION raw_job_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('raw_job', ''); RETURN NULL; END $$;
DROP TRIGGER IF EXISTS raw_job_wake ON raw_job;
CREATE TRIGGER raw_job_wake AFTER INSERT ON raw_job
    FOR EACH STATEMENT EXECUTE FUNCTION raw_job_wake();
"""
CLAIM = """
UPDATE raw_job SET state = 'running'
WHERE id IN (
    SELECT id FROM raw_job WHERE state = 'queued' ORDER BY id
    FOR UPDATE SKIP LOCKED LIMIT %s
)
RETURNING id, args
"""


class RawQueue(harness.Queue):
    version = f"psycopg {version('psycopg')}"

    def __init__(self, db: str, variant: str) -> None:
        super().__init__(db, variant or "1")
        self.name = "raw" if self.variant == "1" else "raw-batch"
        self.notes = f"{self.variant} job(s) per claim, LISTEN/NOTIFY"

    def setup(self) -> None:
        self.conn = psycopg.connect(self.db, autocommit=True)
        self.conn.execute(SCHEMA)

    def clear(self) -> None:
        self.conn.execute("TRUNCATE raw_job")

    def enqueue(self, i: int) -> None:
        self.conn.execute("INSERT INTO raw_job (args) VALUES (%s)", (f'{{"i": {i}}}',))

    def enqueue_bulk(self, indices: list[int]) -> None:  # type: ignore[override]
        self.conn.execute(
            "INSERT INTO raw_job (args) SELECT jsonb_build_object('i', i) FROM unnest(%s::int[]) i",
            (indices,),
        )

    def unfinished(self) -> int:
        row = self.conn.execute("SELECT count(*) FROM raw_job WHERE state <> 'done'").fetchone()
        return int(row[0]) if row else 0

    def analyze(self) -> None:
        self.conn.execute("ANALYZE raw_job")

    def close(self) -> None:
        self.conn.close()

    @staticmethod
    def worker_main(db: str, variant: str) -> None:
        batch = int(variant or "1")
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
        conn = psycopg.connect(db)
        listener = psycopg.connect(db, autocommit=True)
        listener.execute("LISTEN raw_job")
        while not stopping:
            with conn.transaction():
                jobs = conn.execute(CLAIM, (batch,)).fetchall()
            if not jobs:
                for _ in listener.notifies(timeout=1.0, stop_after=1):
                    pass
                continue
            for _, args in jobs:
                harness.mark(args["i"])
            with conn.transaction():
                conn.execute(
                    "UPDATE raw_job SET state = 'done' WHERE id = ANY(%s)", ([j[0] for j in jobs],)
                )
        conn.close()
        listener.close()


if __name__ == "__main__":
    harness.main(RawQueue)
