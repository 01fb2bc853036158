"""A small network made of Linux network namespaces, for the partition tests.

:class:`Lab` makes a database "host" (namespace ``db``) and worker "hosts", each joined to
the database host by its own veth pair on a /30 of 10.231.x.0/24; nothing is added to the
namespace the tests run in, and traffic flows only between the lab's own addresses. A
throwaway PostgreSQL server runs inside ``db`` and listens on the database host's end of
every link; the test process reaches it through its Unix socket (file system, not
network). Worker hosts run ``tests.integration.apps.partition_tasks`` inside their
namespace. :meth:`Lab.cut` / :meth:`Lab.heal` take links down and up.

Needs root and ``ip netns``: :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lilota.pglocal import LocalPostgresCluster, find_postgres_bindir

REPO = Path(__file__).resolve().parents[2]
# Candidate /24s for the lab; the first that the machine does not use is taken. The lab's
# addresses exist only inside its own namespaces, so this is only to avoid confusion.
SUBNETS = ("10.231.77", "10.231.78", "10.231.79", "10.231.176")


def unavailable() -> str | None:
    """Why the lab cannot be built here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are a Linux feature"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if find_postgres_bindir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) on this machine"
    probe = f"lilota-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def free_subnet() -> str:
    """The first of SUBNETS that no address or route of the machine uses."""
    used = ip("-4", "addr") + ip("-4", "route")
    for prefix in SUBNETS:
        network = ipaddress.ip_network(f"{prefix}.0/24")
        if not any(
            ipaddress.ip_address(word.split("/")[0]) in network
            for word in used.split()
            if word[:1].isdigit() and word.count(".") == 3
        ):
            return prefix
    raise RuntimeError(f"every candidate subnet ({', '.join(SUBNETS)}) is in use here")


@dataclass
class Host:
    """A worker host: its namespace, its link to the database host, its processes."""

    name: str
    netns: str
    veth: str  # this end of the link, inside netns
    peer: str  # the database host's end, inside the lab's db namespace
    address: str  # this end's address
    db_address: str  # the server's address on this link
    processes: list[subprocess.Popen[str]] = field(default_factory=list)


class Lab:
    """Namespaces, links and a PostgreSQL server; :meth:`close` removes all of it."""

    def __init__(self, base: Path, hosts: tuple[str, ...]) -> None:
        self.base = base
        self.tag = f"l{os.getpid()}"
        self.db_netns = f"lilota-{os.getpid()}-db"
        self.hosts: dict[str, Host] = {}
        self.cluster: LocalPostgresCluster | None = None
        self._databases = 0
        prefix = free_subnet()
        try:
            ip("netns", "add", self.db_netns)
            for index, name in enumerate(hosts):
                self._add_host(name, prefix, index)
            listen = ",".join(h.db_address for h in self.hosts.values())
            bindir = find_postgres_bindir()
            assert bindir is not None
            self.cluster = LocalPostgresCluster(
                bindir, listen=listen, wrapper=["ip", "netns", "exec", self.db_netns]
            )
            self.cluster.init()
            with open(self.cluster.data_dir / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {prefix}.0/24 trust\n")
            self.cluster.start()
        except BaseException:
            self.close()
            raise

    def _add_host(self, name: str, prefix: str, index: int) -> None:
        netns = f"lilota-{os.getpid()}-{name}"
        # Interface names: at most 15 characters, unique within their namespace.
        host = Host(
            name=name,
            netns=netns,
            veth=f"{self.tag}{name}"[:15],
            peer=f"{self.tag}db{index}"[:15],
            address=f"{prefix}.{4 * index + 2}",
            db_address=f"{prefix}.{4 * index + 1}",
        )
        self.hosts[name] = host
        ip("netns", "add", netns)
        # Made inside the two namespaces at once: no interface ever exists out here.
        link = ("link", "add", host.peer, "netns", self.db_netns, "type", "veth")
        ip(*link, "peer", "name", host.veth, "netns", netns)
        ip("-n", self.db_netns, "addr", "add", f"{host.db_address}/30", "dev", host.peer)
        ip("-n", netns, "addr", "add", f"{host.address}/30", "dev", host.veth)
        self.heal(name)

    # ------------------------------------------------------------------ databases

    def new_database(self) -> tuple[str, Callable[[str], str]]:
        """A fresh database: its URL for the test process (Unix socket), and a function
        giving its URL for a worker host (TCP over that host's link)."""
        import psycopg

        assert self.cluster is not None
        self._databases += 1
        name = f"partition_{self._databases}"
        admin = self.cluster.socket_url().replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        port = self.cluster.port

        def for_host(host: str) -> str:
            address = self.hosts[host].db_address
            return f"postgresql+psycopg://postgres@{address}:{port}/{name}"

        return self.cluster.socket_url(name), for_host

    # ------------------------------------------------------------------ links

    def cut(self, host: str, *, at: str = "host") -> None:
        """Take ``host``'s link down at its own end (``at="host"``: its sends fail at
        once) or at the database host's end (``at="db"``: its packets vanish)."""
        h = self.hosts[host]
        netns, veth = (h.netns, h.veth) if at == "host" else (self.db_netns, h.peer)
        ip("-n", netns, "link", "set", veth, "down")

    def heal(self, host: str) -> None:
        h = self.hosts[host]
        ip("-n", self.db_netns, "link", "set", h.peer, "up")
        ip("-n", h.netns, "link", "set", h.veth, "up")

    # ------------------------------------------------------------------ worker hosts

    def start_host(
        self, host: str, db_url: str, *, workers: int, lease: float, env: dict[str, str]
    ) -> subprocess.Popen[str]:
        """Start a worker host (a Lilota with ``workers`` processes) in ``host``'s
        namespace; returns once its workers are ready. Its log goes to base/<host>.log."""
        h = self.hosts[host]
        log: IO[str] = open(self.base / f"{host}.log", "a")  # noqa: SIM115 (the process's)
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                h.netns,
                sys.executable,
                "-m",
                "tests.integration.apps.partition_tasks",
                db_url,
                str(workers),
                str(lease),
            ],
            cwd=REPO,
            env={**os.environ, **env, "LILOTA_PARTITION_HOST": host},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
        )
        log.close()
        h.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        process.stdout.close()  # the host prints nothing more
        if not line.startswith("ready"):
            process.wait(timeout=30)
            raise RuntimeError(f"worker host {host} did not start:\n{self.log(host)}")
        return process

    def stop_host(self, host: str, timeout: float = 30) -> None:
        """SIGTERM the host's processes (graceful stop), then kill what is left."""
        for process in self.hosts[host].processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.hosts[host].processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        self._kill_all(self.hosts[host].netns)

    def log(self, host: str) -> str:
        path = self.base / f"{host}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def worker_pids(self, host: str) -> set[int]:
        """Pids of the processes in ``host``'s namespace, its worker host included."""
        out = subprocess.run(["ip", "netns", "pids", self.hosts[host].netns], capture_output=True)
        return {int(p) for p in out.stdout.split()}

    # ------------------------------------------------------------------ teardown

    @staticmethod
    def _kill_all(netns: str) -> None:
        """SIGKILL every process still in ``netns`` (worker processes included)."""
        for _ in range(50):
            out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True)
            pids = [int(p) for p in out.stdout.split()]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def close(self) -> None:
        """Stop the hosts and the server, remove the namespaces (and so the links)."""
        for name in self.hosts:
            with contextlib.suppress(RuntimeError):
                self.heal(name)  # a graceful stop needs the database
            with contextlib.suppress(Exception):
                self.stop_host(name, timeout=15)
        if self.cluster is not None:
            self.cluster.cleanup()
        for netns in [*(h.netns for h in self.hosts.values()), self.db_netns]:
            self._kill_all(netns)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
