"""Tasks, and a worker "host", for the network partition tests (test_partition.py).

Run as ``python -m tests.integration.apps.partition_tasks DB_URL WORKERS LEASE`` with
``LILOTA_PARTITION_HOST`` set (inside a network namespace), it is one host: a Lilota with WORKERS worker processes on DB_URL,
until SIGTERM. Each run of ``stamp`` appends one JSON line when it starts and one when it
ends to ``$LILOTA_TEST_MARKS/<pid>.jsonl`` (the file system is shared by every namespace),
naming the host, the process and the attempt, so a test can tell who ran what, and when.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from lilota import Lilota
from lilota.context import TaskContext
from tests.integration.apps.tasks import wait_for_file

ENV_HOST = "LILOTA_PARTITION_HOST"  # the host's name; set for the host and its workers
HOST = os.environ.get(ENV_HOST, "")

if HOST:  # the host and its worker processes (which import this module) log to stderr
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {HOST} pid %(process)d %(name)s %(levelname)s: %(message)s",
    )

app = Lilota(number_of_workers=0)


def note(event: str, key: str, attempt: int) -> float:
    """Append one event of a run to this process's marks file; returns its time."""
    now = time.time()
    line = {"event": event, "key": key, "host": HOST, "pid": os.getpid(), "attempt": attempt}
    line["at"] = now
    with open(Path(os.environ["LILOTA_TEST_MARKS"]) / f"{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    return now


def read_notes(directory: Path) -> list[dict[str, Any]]:
    lines = [line for p in directory.glob("*.jsonl") for line in p.read_text().splitlines()]
    return sorted((json.loads(line) for line in lines), key=lambda n: n["at"])


@app.register("stamp", max_attempts=5)
def stamp(data: dict, ctx: TaskContext) -> dict:  # type: ignore[type-arg]
    """Notes its start, waits for the file ``release`` (if given) and ``seconds``, notes
    its end; returns who ran it (host, process, attempt) and when. "attempt" is the run:
    1 for the first, one more for each retry or recovery (a lost worker's run)."""
    run = ctx.attempt + ctx.recoveries
    began = note("start", data["key"], run)
    if data.get("release"):
        wait_for_file(Path(data["release"]))
    time.sleep(data.get("seconds", 0))
    ended = note("end", data["key"], run)
    return {
        "host": HOST,
        "pid": os.getpid(),
        "attempt": run,
        "began": began,
        "ended": ended,
    }


def main(argv: list[str]) -> None:
    url, workers, lease = argv[0], int(argv[1]), float(argv[2])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lilota = Lilota(
        url, number_of_workers=workers, registry=app.registry, lease=timedelta(seconds=lease)
    )
    lilota.start()
    print("ready", " ".join(str(p) for p in lilota.worker_pids), flush=True)
    stop.wait()
    lilota.stop(timeout=10)


if __name__ == "__main__":
    main(sys.argv[1:])
