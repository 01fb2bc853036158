"""A throwaway PostgreSQL cluster from the server binaries installed on this machine.

:func:`find_postgres_bindir` finds ``initdb``, ``pg_ctl`` and ``postgres``;
:class:`LocalPostgresCluster` makes a cluster with them in a temp dir (``init()``), serves it
on a free port of 127.0.0.1 with durability switched off (``start()``), can stop and start
it again mid-test, and removes it at the end (``cleanup()``, also at exit). ``initdb``
refuses to run as root, so as root the binaries run as the system user ``lilota-test``
(created if missing) or ``nobody``.

The third source of :func:`lilota.pgcluster.find_postgres`, which is what tests use; this
module knows nothing of databases, templates or pytest.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ENV_POSTGRES_BINDIR",
    "SERVER_SETTINGS",
    "UNPRIVILEGED_USER",
    "ClusterError",
    "LocalPostgresCluster",
    "find_postgres_bindir",
]

# The plugin's documented logger (lilota.testing): it says where the test server came from.
logger = logging.getLogger("lilota.testing")

ENV_POSTGRES_BINDIR = "LILOTA_TEST_POSTGRES_BINDIR"
UNPRIVILEGED_USER = "lilota-test"
# Settings of the throwaway cluster (and of the container): no durability, enough
# connections for many workers.
SERVER_SETTINGS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=300",
)


class ClusterError(Exception):
    """A command of the cluster (``initdb``, ``pg_ctl``) failed or cannot run; the message
    has its output and the tail of the server log."""


def _version_key(path: Path) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", path.name)
    return tuple(int(n) for n in numbers) if numbers else (-1,)


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres"))


def find_postgres_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``.

    Looks at ``LILOTA_TEST_POSTGRES_BINDIR``, ``PATH``, ``pg_config --bindir``, then
    ``/usr/lib/postgresql/*/bin`` (Debian), ``/usr/pgsql-*/bin`` (RPM) and
    ``/usr/local/pgsql/bin``, newest version first.
    """
    candidates: list[Path] = []
    override = os.environ.get(ENV_POSTGRES_BINDIR)
    if override:
        candidates.append(Path(override))
    initdb = shutil.which("initdb")
    if initdb:
        candidates += [Path(initdb).parent, Path(initdb).resolve().parent]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
                stdin=subprocess.DEVNULL,
            )
            candidates.append(Path(out.stdout.strip()))
    for pattern_root, pattern in (
        (Path("/usr/lib/postgresql"), "*/bin"),
        (Path("/usr"), "pgsql-*/bin"),
    ):
        found = [p for p in pattern_root.glob(pattern) if p.is_dir()]
        # The version is in the parent's name: /usr/lib/postgresql/16/bin, /usr/pgsql-16/bin.
        candidates += sorted(found, key=lambda p: _version_key(p.parent), reverse=True)
    candidates.append(Path("/usr/local/pgsql/bin"))
    for candidate in candidates:
        if _has_server_binaries(candidate):
            return candidate
    return None


def _unprivileged_user() -> tuple[str, int, int]:
    """(name, uid, gid) of the user that runs the cluster when we are root."""
    import pwd

    for attempt in range(2):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(UNPRIVILEGED_USER)
            return entry.pw_name, entry.pw_uid, entry.pw_gid
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        if attempt == 0 and os.access(useradd, os.X_OK):
            # Another xdist worker may create it at the same time; we look again either way.
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [useradd, "--system", "--no-create-home", UNPRIVILEGED_USER],
                    capture_output=True,
                    timeout=30,
                    stdin=subprocess.DEVNULL,
                )
    entry = pwd.getpwnam("nobody")
    logger.info("could not create user %r; running PostgreSQL as 'nobody'", UNPRIVILEGED_USER)
    return entry.pw_name, entry.pw_uid, entry.pw_gid


def _traversable_by_others(path: Path) -> bool:
    for part in (path, *path.parents):
        try:
            if not part.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalPostgresCluster:
    """A PostgreSQL cluster in a temp dir, made with ``initdb`` and run with ``pg_ctl``.

    ``init()`` creates it (user ``postgres``, trust auth, UTF8, locale C) and ``start()``
    serves it on a free port of 127.0.0.1 with fsync and synchronous commit off.
    ``cleanup()`` stops it and removes the directory; it is also registered with ``atexit``.
    As root the binaries run as an unprivileged user (``initdb`` refuses root).
    """

    def __init__(
        self, bindir: Path, *, listen: str = "127.0.0.1", wrapper: Sequence[str] = ()
    ) -> None:
        self.bindir = bindir
        # The TCP addresses the server listens on (comma-separated, as listen_addresses),
        # and a command every server command runs under: the partition tests start the
        # server inside a network namespace (``ip netns exec NAME``) on its own addresses.
        self.listen = listen
        self.wrapper = list(wrapper)
        self.port = 0
        self._lock = threading.Lock()
        self._closed = False
        self._owner_pid = os.getpid()  # a forked child must not tear the cluster down
        self._run_as: tuple[str, int, int] | None = None
        base_root: str | None = None
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            self._run_as = _unprivileged_user()
            if not _traversable_by_others(Path(tempfile.gettempdir())):
                base_root = "/tmp"
        self.base_dir = Path(tempfile.mkdtemp(prefix="lilota-pg-", dir=base_root))
        atexit.register(self.cleanup)
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "postgres.log"
        self.socket_dir.mkdir()
        if self._run_as is not None:
            _, uid, gid = self._run_as
            for path in (self.base_dir, self.socket_dir):
                os.chown(path, uid, gid)

    @property
    def user(self) -> str | None:
        """The OS user the server runs as, if not the current one."""
        return self._run_as[0] if self._run_as else None

    @property
    def url(self) -> str:
        """The admin URL (user ``postgres``, trust auth); valid once ``start()`` returned."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def socket_url(self, database: str = "postgres") -> str:
        """A URL of ``database`` through the server's Unix socket: reachable from this
        process whatever network namespace the server listens in."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def _command(self, args: Sequence[str]) -> list[str]:
        return [*self.wrapper, *self._as_user(args)]

    def _as_user(self, args: Sequence[str]) -> list[str]:
        if self._run_as is None:
            return list(args)
        name, uid, gid = self._run_as
        runuser = shutil.which("runuser") or (
            "/usr/sbin/runuser" if os.access("/usr/sbin/runuser", os.X_OK) else None
        )
        if runuser:
            return [runuser, "-u", name, "--", *args]
        setpriv = shutil.which("setpriv")
        if setpriv:
            return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *args]
        raise ClusterError("running as root, and neither runuser nor setpriv was found")

    def _run(self, *args: str, timeout: float = 120, check: bool = True) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        # Output goes to a file, not a pipe: the postmaster that pg_ctl starts lives on.
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                self._command(args),
                cwd=self.base_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
            if check and proc.returncode != 0:
                out.seek(0)
                raise ClusterError(
                    f"{Path(args[0]).name} {' '.join(args[1:])} exited with {proc.returncode}:"
                    f" {out.read()[-2000:].strip()}{self._log_tail()}"
                )
        return proc.returncode

    def _log_tail(self) -> str:
        try:
            return "\nserver log: " + self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def init(self) -> None:
        """Create the cluster with ``initdb``; raises :class:`ClusterError` if it fails."""
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the server (on the same port as before, after the first time); wait until it
        accepts connections. Raises :class:`ClusterError` if it does not start."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this cluster was cleaned up")
            tries = 1 if self.port else 3
            for attempt in range(tries):
                port = self.port or _free_port()
                options = " ".join(
                    [
                        f"-c listen_addresses={shlex.quote(self.listen)}",
                        f"-p {port}",
                        f"-k {shlex.quote(str(self.socket_dir))}",
                        *(f"-c {setting}" for setting in SERVER_SETTINGS),
                    ]
                )
                try:
                    self._run(
                        str(self.bindir / "pg_ctl"),
                        "-D",
                        str(self.data_dir),
                        "-l",
                        str(self.log_file),
                        "-w",
                        "-t",
                        "60",
                        "-o",
                        options,
                        "start",
                    )
                except ClusterError:
                    if attempt == tries - 1:
                        raise
                    logger.info("starting PostgreSQL on port %d failed; trying another", port)
                    continue
                self.port = port
                return

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean) or ``immediate`` (like a crash)."""
        with self._lock:
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "stop",
                timeout=60,
            )

    def is_running(self) -> bool:
        """Whether the postmaster of ``postmaster.pid`` is alive (no subprocess needed)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return False
        return True

    def cleanup(self) -> None:
        """Stop the server at once (``-m immediate``) and remove its directory."""
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                    check=False,
                    timeout=60,
                )
        except (OSError, subprocess.SubprocessError, ClusterError) as exc:
            logger.warning("could not stop the PostgreSQL cluster in %s: %s", self.base_dir, exc)
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            atexit.unregister(self.cleanup)
