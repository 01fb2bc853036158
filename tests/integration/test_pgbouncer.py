"""lilota behind PgBouncer in transaction pooling mode (Debian's ``pgbouncer``), as most
production PostgreSQL set-ups run it: every feature works through the pooler, with the
wake-up on a direct connection when one is given (``lilota_direct=host:port``), else a
bounded poll.

Each test starts its own PgBouncer on a free loopback port in front of the session's
throwaway PostgreSQL (``pool_mode = transaction``, 2 server connections, so that
statements of one client really do move between server connections).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from lilota import Lilota, TaskStatus
from lilota.pgcluster import PostgresProvider
from lilota.testing import wait_for
from tests.integration.apps import tasks

pytestmark = pytest.mark.postgres

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pgbouncer(lilota_postgres: PostgresProvider, lilota_postgres_url: str) -> Iterator[str]:
    """The test's database URL, through a PgBouncer in transaction pooling mode."""
    if not os.path.exists(PGBOUNCER):
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed (scripts/test.sh installs it)")
        pytest.skip("pgbouncer is not installed (apt install pgbouncer)")
    server = urlsplit(lilota_postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    database = server.path.lstrip("/")
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="lilota-pgbouncer-"))
    user = server.username or "postgres"
    password = f" user={user} password={server.password}" if server.password else ""
    (work / "users.txt").write_text(f'"{user}" ""\n')
    (work / "pgbouncer.ini").write_text(
        f"""[databases]
{database} = host={server.hostname} port={server.port} dbname={database}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {work / "users.txt"}
pool_mode = transaction
default_pool_size = 2
max_client_conn = 200
logfile = {work / "pgbouncer.log"}
pidfile = {work / "pgbouncer.pid"}
"""
    )
    command = [PGBOUNCER, str(work / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        nobody = pwd.getpwnam("nobody")
        os.chown(work, nobody.pw_uid, nobody.pw_gid)
        for path in work.iterdir():
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        command[1:1] = ["-u", "nobody"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                log = work / "pgbouncer.log"
                pytest.fail(f"pgbouncer did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        yield (f"postgresql+psycopg://{user}@127.0.0.1:{port}/{database}?lilota_pooler=transaction")
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _direct(lilota_postgres_url: str) -> str:
    server = urlsplit(lilota_postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    return f"{server.hostname}:{server.port}"


@pytest.mark.parametrize("wake_up", ["poll", "direct"])
def test_workers_through_a_transaction_pooler_run_every_task(
    pgbouncer: str, lilota_postgres_url: str, wake_up: str, tmp_path: Path
) -> None:
    url = (
        pgbouncer
        if wake_up == "poll"
        else f"{pgbouncer}&lilota_direct={_direct(lilota_postgres_url)}"
    )
    app = Lilota(url, number_of_workers=2, registry=tasks.app.registry)
    app.start()
    try:
        # Many statements of the same text: psycopg would prepare them on one server
        # connection and run them on another.
        ids = [app.schedule("add", {"a": i, "b": 1}) for i in range(60)]
        ids += app.schedule_many("add", [{"a": i, "b": 2} for i in range(60)])
        done = [wait_for(app, i, timeout=60) for i in ids]
        assert all(t is not None and t.status is TaskStatus.COMPLETED for t in done)
        assert sorted(t.output["sum"] for t in done[:60]) == [i + 1 for i in range(60)]  # type: ignore[union-attr,index]
        # Progress, cancel and retry go through the pooler too.
        stepped = app.schedule("stepped-progress", {"dir": str(tmp_path)})
        for step in (25, 50, 75):
            until(lambda: app.get_task_by_id(stepped).progress_percentage == step)  # type: ignore[union-attr]  # noqa: B023
            (tmp_path / f"seen-{step}").touch()
        assert app.wait(stepped, timeout=30).progress_percentage == 100
        blocked = app.schedule("add", {"a": 1, "b": 1}, delay=timedelta(hours=1))
        assert app.cancel(blocked) is TaskStatus.CANCELLED
        app.retry(blocked)  # due now: it runs
        assert wait_for(app, blocked, timeout=30).status is TaskStatus.COMPLETED
    finally:
        app.stop(timeout=30)
