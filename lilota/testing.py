"""pytest plugin: database fixtures for testing lilota and apps that use it.

Registered through the ``pytest11`` entry point ``lilota = "lilota.testing"``; from a source
tree that is not installed, load it with ``pytest -p lilota.testing``.

Fixtures
--------
``lilota_db_url`` (function)
    A fresh, empty database URL for one test. SQLite by default. Parametrised over the
    backends chosen with ``--lilota-backend`` / the ``lilota_backends`` ini option, or with
    ``@pytest.mark.lilota_backends("sqlite", "postgres")`` on the test: one test id per
    backend (``test_x[sqlite]``, ``test_x[postgres]``); the postgres one carries the
    ``postgres`` marker, so ``-m "not postgres"`` deselects it.
``lilota_sqlite_url`` (function)
    ``sqlite:///<tmp_path>/lilota.db``: a new SQLite file in the test's ``tmp_path``.
``lilota_postgres_url`` (function)
    ``postgresql+psycopg://...``: a PostgreSQL database created for this test only (cloned
    from a per-session template database, so it is cheap) and dropped after it with
    ``WITH (FORCE)`` (PostgreSQL >= 13), which also ends connections that killed worker
    processes left behind. Names are unique per session, xdist worker and test.
``lilota_postgres`` (session)
    The :class:`PostgresProvider` for the run (see "Finding a PostgreSQL server"):
    ``url`` (admin URL), ``kind`` (``"env"``, ``"container"`` or ``"local"``),
    ``create_database(name=None) -> url``, ``drop_database(url)``, and ``stop()`` /
    ``start()`` / ``restart()`` to take the server away mid-test; those three work for the
    ``"local"`` kind only and skip the calling test otherwise (check ``can_control``).
``lilota_template_setup`` (session)
    ``None``. Override it in a ``conftest.py`` to return a callable ``f(template_url)``: it
    runs once per session on the template database, so every per-test database starts with
    what it put there (for example lilota's schema). It must close its connections.

For apps that use lilota (see "Apps, waiting and inline mode" at the end of this module)
----------------------------------------------------------------------------------------
``lilota_app_options`` (function)
    ``{}``. Override it in a ``conftest.py`` to return the keyword arguments of your
    ``Lilota``: ``{"registry": myapp.lilota.registry}`` (instance mode) or
    ``{"script_path": "worker.py"}``, plus e.g. ``number_of_workers`` or ``lease``.
``lilota_app`` (function)
    A started ``Lilota`` on ``lilota_db_url`` with ``lilota_app_options``; stopped at teardown
    (with a timeout, also when the test failed).
``lilota_app_factory`` (function)
    ``make(**overrides) -> Lilota``: more started instances (same database by default);
    every one is stopped at teardown.
``lilota_inline`` (function)
    A ``Lilota`` on ``lilota_db_url`` without worker processes: the test runs the pending
    tasks in its own process with :func:`run_pending` (or :func:`eager`).
Helpers: :func:`wait_for`, :func:`run_pending`, :func:`eager`.

Options
-------
``--lilota-backend=sqlite,postgres``
    Comma list of backends that ``lilota_db_url`` is parametrised over (default ``sqlite``;
    may be repeated). Overrides the ini option.
``lilota_backends`` (ini)
    The same as a list or comma/space separated string, e.g. ``lilota_backends = sqlite,
    postgres`` in ``[tool.pytest.ini_options]``.

Markers
-------
``postgres``: the test needs a PostgreSQL server (added automatically to the postgres
parameter of ``lilota_db_url`` and to tests that use ``lilota_postgres_url`` /
``lilota_postgres``). ``lilota_backends(*names)``: backends of ``lilota_db_url`` for this test.

Finding a PostgreSQL server
---------------------------
Only when a test first needs PostgreSQL, once per process (each xdist worker has its own),
in this order:

1. ``LILOTA_TEST_POSTGRES_URL``: an admin URL (``postgresql://`` or
   ``postgresql+psycopg://``) of a server where the user may ``CREATE DATABASE``. If it is set
   but the server does not answer, the tests fail: it was asked for explicitly.
2. Docker, when the engine answers a ping within 2 s: a ``postgres:16-alpine`` container
   through testcontainers (``pip install lilota[testing]``).
3. The PostgreSQL server binaries on this machine (``initdb``/``pg_ctl`` from ``PATH``,
   ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin`` newest first, or
   ``LILOTA_TEST_POSTGRES_BINDIR``): a throwaway cluster in a temp dir on a free port of
   127.0.0.1 with durability switched off, stopped and removed at the end of the session
   (``atexit`` too). As root, the binaries run as the system user ``lilota-test`` (created
   if missing) or ``nobody``.
4. Otherwise PostgreSQL tests are skipped, saying how to enable them; when the ``CI``
   environment variable is set (non-empty, not ``0``/``false``) they fail instead.

The logger ``lilota.testing`` says which source was chosen and why the earlier ones were not.
``LILOTA_TEST_POSTGRES_DISABLE_DOCKER=1`` and ``LILOTA_TEST_POSTGRES_DISABLE_LOCAL=1`` skip
steps 2 and 3 (for testing this plugin, or to force a source).

Database administration (CREATE/DROP DATABASE) is the only SQL in this module; lilota's own
SQL lives in ``lilota.store``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import pytest

if TYPE_CHECKING:
    import psycopg

    from lilota.core import Lilota
    from lilota.models import Task
    from lilota.store import Outcome

__all__ = [
    "ENV_CI",
    "ENV_DISABLE_DOCKER",
    "ENV_DISABLE_LOCAL",
    "ENV_POSTGRES_BINDIR",
    "ENV_POSTGRES_URL",
    "LocalPostgresCluster",
    "PostgresProvider",
    "PostgresUnavailable",
    "find_postgres",
    "find_postgres_bindir",
    "normalize_postgres_url",
]

logger = logging.getLogger("lilota.testing")

ENV_POSTGRES_URL = "LILOTA_TEST_POSTGRES_URL"
ENV_DISABLE_DOCKER = "LILOTA_TEST_POSTGRES_DISABLE_DOCKER"
ENV_DISABLE_LOCAL = "LILOTA_TEST_POSTGRES_DISABLE_LOCAL"
ENV_POSTGRES_BINDIR = "LILOTA_TEST_POSTGRES_BINDIR"
ENV_CI = "CI"

BACKENDS = ("sqlite", "postgres")
CONTAINER_IMAGE = "postgres:16-alpine"
UNPRIVILEGED_USER = "lilota-test"
HOW_TO_ENABLE = (
    "PostgreSQL tests need a server: set LILOTA_TEST_POSTGRES_URL=postgresql://... or "
    "install PostgreSQL server binaries (initdb/pg_ctl) or run Docker"
)
# Settings of the throwaway cluster: no durability, enough connections for many workers.
_LOCAL_SERVER_SETTINGS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=300",
)

TemplateSetup = Callable[[str], None]
Kind = Literal["env", "container", "local"]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started; ``str()`` says what was tried."""


class _SourceUnavailable(Exception):
    """One source of a server did not work; the message is the reason (for the log)."""


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def running_in_ci() -> bool:
    """``CI`` is set to something other than empty, ``0`` or ``false``."""
    return _env_flag(ENV_CI)


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------

_PG_SCHEME = re.compile(r"^(postgres|postgresql)(\+[A-Za-z0-9_]+)?$")


def normalize_postgres_url(url: str) -> str:
    """Return ``url`` with the scheme ``postgresql+psycopg`` (the driver lilota uses).

    Accepts ``postgresql://``, ``postgres://`` and ``postgresql+<driver>://``.
    """
    parts = urlsplit(url.strip())
    if not _PG_SCHEME.match(parts.scheme):
        raise ValueError(f"not a PostgreSQL URL (expected postgresql://...): {url!r}")
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def _libpq_url(url: str) -> str:
    """The same URL in the form libpq (psycopg.connect) reads."""
    return urlunsplit(urlsplit(url)._replace(scheme="postgresql"))


def _database_of(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/"))


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _worker_id() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return re.sub(r"[^a-z0-9]", "", worker.lower()) or "main"


# --------------------------------------------------------------------------------------------
# Database administration: the only SQL in this module (CREATE/DROP DATABASE).
# --------------------------------------------------------------------------------------------


def _admin_connect(url: str, timeout: float = 10) -> psycopg.Connection[Any]:
    import psycopg

    return psycopg.connect(_libpq_url(url), autocommit=True, connect_timeout=max(1, int(timeout)))


def _sql_create_database(conn: psycopg.Connection[Any], name: str, template: str) -> None:
    from psycopg import sql

    conn.execute(
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
    )


def _sql_drop_database(conn: psycopg.Connection[Any], name: str) -> None:
    from psycopg import sql

    if conn.info.server_version >= 130000:
        statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
    else:
        statement = sql.SQL("DROP DATABASE IF EXISTS {}")
    conn.execute(statement.format(sql.Identifier(name)))


# --------------------------------------------------------------------------------------------
# A throwaway cluster from the server binaries on this machine
# --------------------------------------------------------------------------------------------


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

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
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
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, args: Sequence[str]) -> list[str]:
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
        raise _SourceUnavailable("running as root, and neither runuser nor setpriv was found")

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
                raise _SourceUnavailable(
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
        """Start the server (on the same port as before, after the first time)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this cluster was cleaned up")
            tries = 1 if self.port else 3
            for attempt in range(tries):
                port = self.port or _free_port()
                options = " ".join(
                    [
                        "-c listen_addresses=127.0.0.1",
                        f"-p {port}",
                        f"-k {shlex.quote(str(self.socket_dir))}",
                        *(f"-c {setting}" for setting in _LOCAL_SERVER_SETTINGS),
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
                except _SourceUnavailable:
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
        except (OSError, subprocess.SubprocessError, _SourceUnavailable) as exc:
            logger.warning("could not stop the PostgreSQL cluster in %s: %s", self.base_dir, exc)
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            atexit.unregister(self.cleanup)


# --------------------------------------------------------------------------------------------
# The provider
# --------------------------------------------------------------------------------------------


class PostgresProvider:
    """A PostgreSQL server for tests and the databases made on it.

    ``url`` is the admin URL (``postgresql+psycopg://``) and ``kind`` where the server comes
    from: ``"env"`` (``LILOTA_TEST_POSTGRES_URL``), ``"container"`` (Docker) or ``"local"``
    (a throwaway cluster of this process). Per-test databases are cloned from a template
    database made once (and filled by ``template_setup``, if given).
    """

    def __init__(
        self,
        url: str,
        kind: Kind,
        *,
        cluster: LocalPostgresCluster | None = None,
        container: Any = None,
        template_setup: TemplateSetup | None = None,
    ) -> None:
        self.url = normalize_postgres_url(url)
        self.kind: Kind = kind
        self.template_setup = template_setup
        self._cluster = cluster
        self._container = container
        self._token = uuid.uuid4().hex[:8]
        self._prefix = f"lilota_{_worker_id()}_{self._token}"
        self._counter = itertools.count(1)
        self._template: str | None = None
        self._created: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._owner_pid = os.getpid()  # a forked child must not drop or stop anything
        atexit.register(self.close)

    def __repr__(self) -> str:
        return f"<PostgresProvider kind={self.kind!r} url={_redact(self.url)!r}>"

    @property
    def cluster(self) -> LocalPostgresCluster | None:
        """The throwaway cluster (``kind == "local"``), else ``None``."""
        return self._cluster

    @property
    def can_control(self) -> bool:
        """Whether ``stop()``/``start()``/``restart()`` work (only for ``kind == "local"``)."""
        return self._cluster is not None

    @property
    def template_name(self) -> str:
        return f"{self._prefix}_template"

    def _ensure_template(self) -> str:
        with self._lock:
            if self._template is None:
                name = self.template_name
                with _admin_connect(self.url) as conn:
                    _sql_create_database(conn, name, "template0")
                if self.template_setup is not None:
                    try:
                        self.template_setup(_with_database(self.url, name))
                    except BaseException:
                        with _admin_connect(self.url) as conn:
                            _sql_drop_database(conn, name)
                        raise
                self._template = name
            return self._template

    def create_database(self, name: str | None = None) -> str:
        """Create a database (a unique name unless given) from the template; return its URL."""
        template = self._ensure_template()
        if name is None:
            name = f"{self._prefix}_{next(self._counter)}"
        started = time.perf_counter()
        with _admin_connect(self.url) as conn:
            _sql_create_database(conn, name, template)
        self._created.add(name)
        logger.debug("created database %s in %.3f s", name, time.perf_counter() - started)
        return _with_database(self.url, name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url`` (``WITH (FORCE)``: its connections are ended)."""
        name = _database_of(url)
        if not name or name in ("postgres", _database_of(self.url), "template0", "template1"):
            raise ValueError(f"refusing to drop database {name!r}")
        with _admin_connect(self.url) as conn:
            _sql_drop_database(conn, name)
        self._created.discard(name)

    def _require_control(self, action: str) -> LocalPostgresCluster:
        if self._cluster is None:
            pytest.skip(
                f"lilota_postgres.{action}() needs the throwaway local cluster (kind 'local');"
                f" this run uses kind {self.kind!r}"
            )
        return self._cluster

    def stop(self, mode: str = "fast") -> None:
        """Stop the server. ``mode="immediate"`` is like a crash (with synchronous_commit
        off, commits of the last fraction of a second may be lost)."""
        self._require_control("stop").stop(mode)

    def start(self) -> None:
        """Start the server again, on the same port."""
        self._require_control("start").start()

    def restart(self, mode: str = "fast") -> None:
        cluster = self._require_control("restart")
        cluster.stop(mode)
        cluster.start()

    def is_running(self) -> bool:
        """For ``kind == "local"``: whether the server runs; the others always answer True."""
        return self._cluster.is_running() if self._cluster is not None else True

    def close(self) -> None:
        """Drop the template database and stop the server this provider started."""
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        try:
            if self._template is not None and self.kind == "env":
                # Per-test databases are dropped by their fixture; drop what is left here.
                with _admin_connect(self.url, timeout=5) as conn:
                    for name in [*sorted(self._created), self._template]:
                        _sql_drop_database(conn, name)
        except Exception as exc:
            logger.warning("could not drop the test databases on %s: %s", _redact(self.url), exc)
        finally:
            if self._cluster is not None:
                self._cluster.cleanup()
            if self._container is not None:
                with contextlib.suppress(Exception):
                    self._container.stop()


# --------------------------------------------------------------------------------------------
# Finding a server
# --------------------------------------------------------------------------------------------


def _from_env(template_setup: TemplateSetup | None) -> PostgresProvider | None:
    raw = os.environ.get(ENV_POSTGRES_URL, "").strip()
    if not raw:
        return None
    try:
        url = normalize_postgres_url(raw)
    except ValueError as exc:
        raise PostgresUnavailable(f"{ENV_POSTGRES_URL} is set but unusable: {exc}") from None
    try:
        _admin_connect(url, timeout=5).close()
    except Exception as exc:
        raise PostgresUnavailable(
            f"{ENV_POSTGRES_URL} is set, but the server at {_redact(url)} did not answer: {exc}"
        ) from None
    return PostgresProvider(url, "env", template_setup=template_setup)


def _docker_answers() -> None:
    """Raise :class:`_SourceUnavailable` unless a Docker engine answers a ping within 2 s."""
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        raise _SourceUnavailable("no Docker engine (DOCKER_HOST unset, no /var/run/docker.sock)")
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        raise _SourceUnavailable(
            "the docker SDK is not installed (pip install lilota[testing])"
        ) from None
    import gc
    import warnings

    error: str | None = None
    # A failed ping leaves an unclosed socket behind: collect it here, quietly, rather than
    # have its ResourceWarning surface in some later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=2)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:
            error = f"no Docker engine answers ({exc})"
        gc.collect()
    if error is not None:
        raise _SourceUnavailable(error)


def _from_container(template_setup: TemplateSetup | None) -> PostgresProvider:
    _docker_answers()
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                from testcontainers.community.postgres import PostgresContainer
            except ImportError:
                from testcontainers.postgres import PostgresContainer
    except ImportError:
        raise _SourceUnavailable(
            "Docker answers but testcontainers is not installed (pip install lilota[testing])"
        ) from None
    container = PostgresContainer(
        CONTAINER_IMAGE,
        username="postgres",
        password="postgres",
        dbname="postgres",
        driver="psycopg",
    )
    container.with_command(
        ["postgres", *(arg for s in _LOCAL_SERVER_SETTINGS for arg in ("-c", s))]
    )
    try:
        container.start()
        url = container.get_connection_url()
    except Exception as exc:
        with contextlib.suppress(Exception):
            container.stop()
        raise _SourceUnavailable(
            f"starting the {CONTAINER_IMAGE} container failed: {exc}"
        ) from None
    return PostgresProvider(url, "container", container=container, template_setup=template_setup)


def _from_local(template_setup: TemplateSetup | None) -> PostgresProvider:
    bindir = find_postgres_bindir()
    if bindir is None:
        raise _SourceUnavailable(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found in PATH, "
            "pg_config --bindir or /usr/lib/postgresql/*/bin"
        )
    started = time.perf_counter()
    cluster = LocalPostgresCluster(bindir)
    try:
        cluster.init()
        cluster.start()
    except BaseException as exc:
        cluster.cleanup()
        if isinstance(exc, (_SourceUnavailable, OSError, subprocess.SubprocessError)):
            raise _SourceUnavailable(f"a cluster from {bindir} did not start: {exc}") from None
        raise
    logger.info(
        "started a throwaway PostgreSQL cluster from %s in %s on 127.0.0.1:%d in %.2f s%s",
        bindir,
        cluster.base_dir,
        cluster.port,
        time.perf_counter() - started,
        f" as user {cluster.user!r}" if cluster.user else "",
    )
    return PostgresProvider(cluster.url, "local", cluster=cluster, template_setup=template_setup)


def find_postgres(template_setup: TemplateSetup | None = None) -> PostgresProvider:
    """Find or start a server (see the module docs); raise :class:`PostgresUnavailable`."""
    reasons: list[str] = []
    provider = _from_env(template_setup)
    if provider is not None:
        logger.info(
            "using the PostgreSQL server from %s: %s", ENV_POSTGRES_URL, _redact(provider.url)
        )
        return provider
    reasons.append(f"{ENV_POSTGRES_URL} is not set")
    sources: list[tuple[str, str, Callable[[TemplateSetup | None], PostgresProvider]]] = [
        ("docker", ENV_DISABLE_DOCKER, _from_container),
        ("local binaries", ENV_DISABLE_LOCAL, _from_local),
    ]
    for label, disable_var, make in sources:
        if _env_flag(disable_var):
            reasons.append(f"{label}: disabled by {disable_var}")
            continue
        try:
            provider = make(template_setup)
        except _SourceUnavailable as exc:
            reasons.append(f"{label}: {exc}")
            continue
        logger.info("using PostgreSQL from %s (%s)", label, "; ".join(reasons))
        return provider
    logger.info("no PostgreSQL server: %s", "; ".join(reasons))
    raise PostgresUnavailable(f"{HOW_TO_ENABLE} (tried: {'; '.join(reasons)})")


# --------------------------------------------------------------------------------------------
# pytest hooks, options and fixtures
# --------------------------------------------------------------------------------------------


def _parse_backends(values: Iterable[str], source: str) -> list[str]:
    backends: list[str] = []
    for value in values:
        for item in re.split(r"[,\s]+", str(value)):
            name = item.strip().lower()
            if not name:
                continue
            if name not in BACKENDS:
                raise pytest.UsageError(
                    f"{source}: unknown lilota backend {name!r} (choose from {', '.join(BACKENDS)})"
                )
            if name not in backends:
                backends.append(name)
    return backends


def configured_backends(config: pytest.Config) -> list[str]:
    """The backends of ``lilota_db_url``: ``--lilota-backend``, else the ini option, else
    ``["sqlite"]``."""
    option: list[str] | None = config.getoption("lilota_backend", None)
    if option:
        return _parse_backends(option, "--lilota-backend") or ["sqlite"]
    ini: list[str] = config.getini("lilota_backends")
    return _parse_backends(ini, "lilota_backends") or ["sqlite"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lilota", "lilota test databases")
    group.addoption(
        "--lilota-backend",
        action="append",
        dest="lilota_backend",
        default=None,
        metavar="NAMES",
        help="comma list of backends that lilota_db_url runs on: sqlite, postgres "
        "(default: sqlite)",
    )
    parser.addini(
        "lilota_backends",
        "backends that lilota_db_url runs on (sqlite, postgres); --lilota-backend wins",
        type="args",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: needs a PostgreSQL server (from lilota.testing)")
    config.addinivalue_line(
        "markers",
        "lilota_backends(*names): backends (sqlite, postgres) that lilota_db_url runs on "
        "for this test",
    )
    configured_backends(config)  # reject unknown names early


def pytest_report_header(config: pytest.Config) -> str:
    return f"lilota backends: {','.join(configured_backends(config))}"


def _explicitly_parametrized(metafunc: pytest.Metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            argnames = [n.strip() for n in argnames.split(",")]
        if name in argnames:
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lilota_db_url" not in metafunc.fixturenames:
        return
    if _explicitly_parametrized(metafunc, "lilota_db_url"):
        return
    marker = metafunc.definition.get_closest_marker("lilota_backends")
    if marker is not None:
        backends = _parse_backends(marker.args, f"{metafunc.definition.nodeid}: lilota_backends")
    else:
        backends = configured_backends(metafunc.config)
    params = [
        pytest.param(name, id=name, marks=[pytest.mark.postgres] if name == "postgres" else [])
        for name in backends
    ]
    metafunc.parametrize("lilota_db_url", params, indirect=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Before -m deselects: tests that use PostgreSQL fixtures directly get the marker too.
    for item in items:
        names = getattr(item, "fixturenames", ())
        if ("lilota_postgres_url" in names or "lilota_postgres" in names) and (
            item.get_closest_marker("postgres") is None
        ):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def lilota_template_setup() -> TemplateSetup | None:
    """Override to return ``f(template_url)`` that fills the per-session template database."""
    return None


@pytest.fixture(scope="session")
def lilota_postgres(
    lilota_template_setup: TemplateSetup | None,
) -> Iterator[PostgresProvider]:
    """The session's PostgreSQL server (skips, or fails under CI, if there is none)."""
    try:
        provider = find_postgres(lilota_template_setup)
    except PostgresUnavailable as exc:
        explicit = bool(os.environ.get(ENV_POSTGRES_URL, "").strip())
        if explicit or running_in_ci():
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    try:
        yield provider
    finally:
        provider.close()


@pytest.fixture
def lilota_postgres_url(lilota_postgres: PostgresProvider) -> Iterator[str]:
    """A PostgreSQL database for this test only, dropped after it."""
    url = lilota_postgres.create_database()
    try:
        yield url
    finally:
        if not lilota_postgres.is_running():
            logger.warning("the test left the PostgreSQL server stopped; starting it again")
            lilota_postgres.start()
        lilota_postgres.drop_database(url)


@pytest.fixture
def lilota_sqlite_url(tmp_path: Path) -> str:
    """``sqlite:///<tmp_path>/lilota.db``: a new SQLite database file for this test."""
    return f"sqlite:///{tmp_path / 'lilota.db'}"


@pytest.fixture
def lilota_db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database URL for this test, on the backend of its parameter (default sqlite)."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgres":
        return str(request.getfixturevalue("lilota_postgres_url"))
    return str(request.getfixturevalue("lilota_sqlite_url"))


# ============================================================================================
# RESERVED: app fixture, wait_for and inline mode (added by another engineer).
# Put them below this banner. Keep heavy imports lazy (inside functions), and keep SQL out
# of this module except the CREATE/DROP DATABASE helpers above.
# ============================================================================================

# Apps, waiting and inline mode
# -----------------------------
# ``lilota_app`` runs your tasks in real worker processes on the test database, as in
# production; ``wait_for`` waits for one task and fails the test with what the task was doing.
# The inline mode (``run_pending``, ``eager``, ``lilota_inline``) runs pending tasks in the
# test's own process and thread, through the worker's own step, ``lilota.worker.WorkerLoop.run_once``: the
# same input rebuilding, output and error serialization, TaskProgress (written to the store)
# and TaskContext (follow-up tasks go to the store and are run too), the same retry outcome.
# Not enforced inline: task timeouts, and cancellation of a task while it runs (a task
# cancelled before it is picked up never runs, as with a worker).

__all__ += [
    "DEFAULT_APP_WORKERS",
    "DEFAULT_MAX_RUNS",
    "DEFAULT_STOP_TIMEOUT",
    "eager",
    "run_pending",
    "wait_for",
]

#: Seconds the app fixtures give ``Lilota.stop()`` at teardown; then workers are killed.
DEFAULT_STOP_TIMEOUT = 30.0
#: Worker processes of ``lilota_app`` unless ``lilota_app_options`` says otherwise.
DEFAULT_APP_WORKERS = 2
#: Most task runs of one ``run_pending()`` call without ``limit``: a guard against tasks that
#: schedule tasks forever.
DEFAULT_MAX_RUNS = 1000
# Inline claims are never renewed: a long lease keeps a real worker on the same database
# from taking one back while the test runs it.
_INLINE_LEASE_SECONDS = 3600.0


def _unfinished_message(lilota: Lilota, task: Task, timeout: float) -> str:
    from datetime import datetime, timezone

    parts = [
        f"task {task.id} ({task.name}) did not finish within {timeout:g} s:",
        f"status {task.status.value}, progress {task.progress_percentage}%,",
        f"attempt {task.attempts} of {task.max_attempts},",
        f"exception: {task.exception if task.exception is not None else 'none'}",
    ]
    hints: list[str] = []
    now = datetime.now(timezone.utc)
    if task.cancel_requested:
        hints.append("cancellation was requested")
    if task.status.value == "pending":
        if task.run_at is not None and task.run_at > now:
            hints.append(f"it is not due before {task.run_at.isoformat(timespec='seconds')}")
        if not lilota.worker_pids:
            hints.append(
                "this Lilota instance runs no worker processes (not started, "
                "number_of_workers=0, or no registry/script_path: see lilota_app_options)"
            )
    elif task.status.value == "running":
        hints.append(f"running in process {task.pid} (worker {task.worker_id})")
        if task.lease_expires_at is not None and task.lease_expires_at < now:
            hints.append("its lease has expired: the worker may be gone")
    message = " ".join(parts)
    if hints:
        message += "; " + "; ".join(hints)
    if task.exception is not None and task.exception.traceback:
        message += "\n" + task.exception.traceback.rstrip()
    return message


def wait_for(lilota: Lilota, task_id: int, timeout: float = 10.0) -> Task:
    """Wait until the task is completed, failed or cancelled, and return it.

    If it is not after ``timeout`` seconds, the test fails (``pytest.fail``) with the
    task's status, progress, attempts and last exception (with its traceback) in the
    message, and hints such as "this Lilota instance runs no worker processes". An
    unknown id fails the test too. It does not check *how* the task ended: assert
    ``task.status`` yourself.
    """
    __tracebackhide__ = True
    from lilota.errors import TaskNotFound

    try:
        return lilota.wait(task_id, timeout=timeout)
    except TaskNotFound:
        pytest.fail(f"wait_for: there is no task with id {task_id}", pytrace=False)
    except TimeoutError:
        pass
    task = lilota.get_task_by_id(task_id)
    if task is None:
        pytest.fail(f"wait_for: task {task_id} was deleted while waiting", pytrace=False)
    if task.is_final:  # it finished between the last look and now
        return task
    pytest.fail(_unfinished_message(lilota, task, timeout), pytrace=False)


# --------------------------------------------------------------------------------------------
# Inline mode
# --------------------------------------------------------------------------------------------


def _inline_names(lilota: Lilota, names: str | Iterable[str] | None) -> frozenset[str]:
    from lilota.errors import ConfigurationError

    registered = lilota.registry.names
    if not registered:
        raise ConfigurationError(
            "run_pending runs the tasks registered in this process, and this Lilota has "
            "none: create it with registry=<your module-level Lilota>.registry (tasks that "
            "live only in a worker script, script_path=..., cannot run inline)"
        )
    if names is None:
        return registered
    wanted = frozenset([names] if isinstance(names, str) else names)
    unknown = wanted - registered
    if unknown:
        raise ConfigurationError(
            f"run_pending: {', '.join(sorted(unknown))} not registered on this Lilota "
            f"(registered: {', '.join(sorted(registered))})"
        )
    return wanted


def run_pending(
    lilota: Lilota,
    *,
    names: str | Iterable[str] | None = None,
    limit: int | None = None,
    retry_now: bool = True,
    max_runs: int = DEFAULT_MAX_RUNS,
) -> list[Task]:
    """Run the due pending tasks of ``lilota``'s registry in this thread, until none is left.

    Each task is claimed from the database like a worker claims it (highest priority
    first, then run_at, then id), run by the worker's own code (``WorkerLoop.run_once``:
    input rebuilt as the input model, ``TaskProgress`` writing to the database,
    ``TaskContext``), and its outcome recorded: output, or the exception with its
    traceback, or a retry. Tasks scheduled meanwhile (follow-ups from ``ctx.schedule``)
    are run too. Returns the task as recorded after each run, in run order (a task retried
    at once appears once per attempt).

    ``names``: only these task names (default: every name of ``lilota.registry``; other
    tasks stay pending). ``limit``: at most this many runs. ``retry_now``: a task that
    raises with attempts left gets its retry as with a worker (pending again, the
    exception recorded), but due at once, so this call runs it until it completes or has
    used ``max_attempts``; with ``retry_now=False`` the retry is due after its
    ``retry_delay``, as with a worker, and this call leaves it pending. Tasks whose
    ``run_at`` is in the future are not run. Without ``limit``, the test fails if more
    than ``max_runs`` runs would be needed (a task that schedules itself forever).

    Not enforced: the task's ``timeout``, and cancellation while a task runs. ``async``
    tasks run in ``asyncio.run``: call ``run_pending`` from a synchronous test (or through
    ``asyncio.to_thread``), not from inside a running event loop.
    """
    __tracebackhide__ = True
    wanted = _inline_names(lilota, names)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    store = lilota.store
    store.ensure_schema()
    import dataclasses
    from datetime import timedelta

    from lilota.settings import WorkerSettings
    from lilota.worker import WorkerLoop

    settings = WorkerSettings(lease=timedelta(seconds=_INLINE_LEASE_SECONDS))
    worker_id = f"inline:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    loop = WorkerLoop(store, lilota.registry, settings, worker_id=worker_id)

    def due_now(outcome: Outcome) -> Outcome:
        if outcome.status == "pending" and outcome.run_at is not None:
            return dataclasses.replace(outcome, run_at=store.clock())
        return outcome

    cap = limit if limit is not None else max_runs
    runs: list[Task] = []
    while len(runs) < cap:
        outcomes = loop.run_once(limit=1, names=wanted, adjust=due_now if retry_now else None)
        if not outcomes:
            return runs
        task = store.get(outcomes[0].id)
        if task is None:
            raise LookupError(f"task {outcomes[0].id} disappeared while it ran inline")
        runs.append(task)
    if limit is None and store.has_runnable(wanted):
        counts = collections.Counter(task.name for task in runs)
        pytest.fail(
            f"run_pending ran {len(runs)} tasks and more are still due "
            f"({', '.join(f'{name}: {n}' for name, n in counts.most_common(5))}): does a task "
            "schedule itself (or another) on every run? Pass max_runs= if this many is expected",
            pytrace=False,
        )
    return runs


@contextlib.contextmanager
def eager(
    lilota: Lilota, *, retry_now: bool = True, max_runs: int = DEFAULT_MAX_RUNS
) -> Iterator[Lilota]:
    """Within the ``with`` block, ``lilota.schedule()`` and ``schedule_many()`` store the
    task(s) and then run the due pending tasks inline (:func:`run_pending`) before they
    return the id(s), like Celery's eager mode. A task that fails is recorded as failed,
    not raised: read it with ``lilota.get_task_by_id(task_id)``.

    Patches this one instance (for instance your app's module-level ``Lilota``); the
    original methods come back at the end of the block. A task that schedules through the
    same instance while it runs inline gets its follow-up run after it, not inside it.
    ``retry_now`` and ``max_runs`` are those of :func:`run_pending`.
    """
    state = threading.local()
    original_schedule = lilota.schedule
    original_schedule_many = lilota.schedule_many
    attributes = vars(lilota)
    missing = object()
    saved = {name: attributes.get(name, missing) for name in ("schedule", "schedule_many")}

    def drain() -> None:
        if getattr(state, "running", False):
            return  # the run_pending below this one picks the new task up
        state.running = True
        try:
            run_pending(lilota, retry_now=retry_now, max_runs=max_runs)
        finally:
            state.running = False

    def schedule(*args: Any, **kwargs: Any) -> int:
        task_id = original_schedule(*args, **kwargs)
        drain()
        return task_id

    def schedule_many(*args: Any, **kwargs: Any) -> list[int]:
        ids = original_schedule_many(*args, **kwargs)
        drain()
        return ids

    _inline_names(lilota, None)  # fail now, not at the first schedule()
    attributes["schedule"] = schedule
    attributes["schedule_many"] = schedule_many
    try:
        yield lilota
    finally:
        for name, value in saved.items():
            if value is missing:
                attributes.pop(name, None)
            else:
                attributes[name] = value


# --------------------------------------------------------------------------------------------
# App fixtures
# --------------------------------------------------------------------------------------------


def _stop_all(instances: Sequence[tuple[Lilota, float]]) -> None:
    """Stop every instance (last made first), each within its timeout; then close their
    database connections. Raises the first error after trying all of them."""
    errors: list[BaseException] = []
    for lilota, timeout in reversed(instances):
        try:
            lilota.stop(timeout=timeout)
        except BaseException as error:
            logger.error("stopping %r at teardown failed: %s", lilota, error)
            errors.append(error)
        finally:
            with contextlib.suppress(Exception):
                lilota.store.dispose()
    if errors:
        raise errors[0]


@pytest.fixture
def lilota_app_options() -> dict[str, Any]:
    """Keyword arguments of the ``Lilota`` that ``lilota_app``, ``lilota_app_factory`` and
    ``lilota_inline`` make. Override it in your ``conftest.py``::

        @pytest.fixture
        def lilota_app_options():
            return {"registry": myapp.tasks.lilota.registry, "number_of_workers": 2}

    ``registry=`` shares the tasks registered on a module-level ``Lilota`` of your app
    (worker processes import that module); ``script_path=`` names a worker script instead.
    ``db_url`` defaults to ``lilota_db_url``; ``number_of_workers`` to 2 (``lilota_app``);
    ``stop_timeout`` (seconds, default 30) bounds ``stop()`` at teardown. Override it in
    one test module only, or per test with
    ``@pytest.mark.parametrize("lilota_app_options", [{...}])``.
    """
    return {}


@pytest.fixture
def lilota_app_factory(
    lilota_db_url: str, lilota_app_options: dict[str, Any]
) -> Iterator[Callable[..., Lilota]]:
    """``make(**overrides) -> Lilota``: a started ``Lilota`` made from ``lilota_app_options``
    updated with ``overrides`` (e.g. ``make(number_of_workers=4)`` or ``make(start=False)``);
    every instance it made is stopped at teardown, within its ``stop_timeout``."""
    made: list[tuple[Lilota, float]] = []

    def make(**overrides: Any) -> Lilota:
        __tracebackhide__ = True
        from lilota.core import Lilota

        options: dict[str, Any] = {
            "db_url": lilota_db_url,
            "number_of_workers": DEFAULT_APP_WORKERS,
            **lilota_app_options,
            **overrides,
        }
        stop_timeout = float(options.pop("stop_timeout", DEFAULT_STOP_TIMEOUT))
        start = bool(options.pop("start", True))
        if (
            options.get("registry") is None
            and options.get("script_path") is None
            and options["number_of_workers"] != 0
        ):
            pytest.fail(
                "lilota_app has no tasks to run: override the lilota_app_options fixture in "
                "your conftest.py to return {'registry': <your module-level Lilota>.registry} "
                "or {'script_path': <your worker script>} (or pass number_of_workers=0 for a "
                "scheduler without workers)",
                pytrace=False,
            )
        lilota = Lilota(**options)
        made.append((lilota, stop_timeout))
        if start:
            lilota.start()
        return lilota

    try:
        yield make
    finally:
        _stop_all(made)


@pytest.fixture
def lilota_app(lilota_app_factory: Callable[..., Lilota]) -> Lilota:
    """A started ``Lilota`` on ``lilota_db_url`` running your tasks (``lilota_app_options``)
    in worker processes; stopped at teardown (``stop_timeout``, default 30 s, then the
    workers are killed), whether the test passed or not."""
    return lilota_app_factory()


@pytest.fixture
def lilota_inline(lilota_db_url: str, lilota_app_options: dict[str, Any]) -> Iterator[Lilota]:
    """A ``Lilota`` on ``lilota_db_url`` with the tasks of ``lilota_app_options`` and no
    worker processes: schedule, then run the tasks in the test with
    ``run_pending(lilota_inline)``, or wrap the code under test in
    ``with eager(lilota_inline):``."""
    from lilota.core import Lilota

    options = {
        key: value
        for key, value in {"db_url": lilota_db_url, **lilota_app_options}.items()
        if key not in ("number_of_workers", "stop_timeout", "start", "script_path")
    }
    lilota = Lilota(**options, number_of_workers=0)
    lilota.store.ensure_schema()
    try:
        yield lilota
    finally:
        _stop_all([(lilota, DEFAULT_STOP_TIMEOUT)])
