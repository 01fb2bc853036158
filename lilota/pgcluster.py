"""A throwaway PostgreSQL server for tests, and the databases made on it.

The provisioning behind the PostgreSQL fixtures of :mod:`lilota.testing`, usable without
pytest too:

- :func:`find_postgres` finds or starts a server, trying ``LILOTA_TEST_POSTGRES_URL``, a
  Docker container (testcontainers, :mod:`lilota.pgcontainer`), then a throwaway cluster
  from the local binaries (:mod:`lilota.pglocal`); it returns a :class:`PostgresProvider` or raises
  :class:`PostgresUnavailable` saying what was tried. The order, and the environment
  variables that steer it, are documented in :mod:`lilota.testing` ("Finding a PostgreSQL
  server").
- :class:`PostgresProvider` makes a template database once (filled by ``template_setup``)
  and clones a database per test from it (``create_database`` / ``drop_database``); for a
  local cluster it can also stop and start the server mid-test.
- :func:`missing_server_is_failure`: whether a run that found no server must fail its
  PostgreSQL tests rather than skip them (the URL was asked for explicitly, or ``CI`` is set).

Heavy imports (psycopg, docker, testcontainers) happen inside the functions that need them.
Database administration (CREATE/DROP DATABASE) is the only SQL here; lilota's own SQL lives
in ``lilota.store``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from lilota.pgcontainer import (
    CONTAINER_IMAGE,
    ENV_POSTGRES_IMAGE,
    LOCAL_IMAGE,
    ContainerServer,
    ContainerUnavailable,
    choose_image,
    docker_client,
    sweep_stale,
)
from lilota.pglocal import (
    ENV_POSTGRES_BINDIR,
    SERVER_SETTINGS,
    UNPRIVILEGED_USER,
    ClusterError,
    LocalPostgresCluster,
    find_postgres_bindir,
)

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "CONTAINER_IMAGE",
    "ENV_CI",
    "ENV_DISABLE_DOCKER",
    "ENV_DISABLE_LOCAL",
    "ENV_POSTGRES_BINDIR",
    "ENV_POSTGRES_IMAGE",
    "ENV_POSTGRES_URL",
    "HOW_TO_ENABLE",
    "LOCAL_IMAGE",
    "UNPRIVILEGED_USER",
    "Kind",
    "LocalPostgresCluster",
    "PostgresProvider",
    "PostgresUnavailable",
    "TemplateSetup",
    "find_postgres",
    "find_postgres_bindir",
    "missing_server_is_failure",
    "normalize_postgres_url",
    "running_in_ci",
]

# The plugin's documented logger (lilota.testing): it says which source was chosen and why
# the earlier ones were not.
logger = logging.getLogger("lilota.testing")

ENV_POSTGRES_URL = "LILOTA_TEST_POSTGRES_URL"
ENV_DISABLE_DOCKER = "LILOTA_TEST_POSTGRES_DISABLE_DOCKER"
ENV_DISABLE_LOCAL = "LILOTA_TEST_POSTGRES_DISABLE_LOCAL"
ENV_CI = "CI"

HOW_TO_ENABLE = (
    "PostgreSQL tests need a server: set LILOTA_TEST_POSTGRES_URL=postgresql://... or "
    "install PostgreSQL server binaries (initdb/pg_ctl) or run Docker"
)

#: ``f(template_url)``: fills the template database once per session; closes its connections.
TemplateSetup = Callable[[str], None]
#: Where the server comes from: the environment, a Docker container, a local cluster.
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


def missing_server_is_failure() -> bool:
    """Whether finding no server must fail the PostgreSQL tests instead of skipping them:
    ``LILOTA_TEST_POSTGRES_URL`` is set (the server was asked for explicitly) or we run in
    CI (:func:`running_in_ci`), where a skip would hide that nothing was tested."""
    explicit = bool(os.environ.get(ENV_POSTGRES_URL, "").strip())
    return explicit or running_in_ci()


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
# The provider
# --------------------------------------------------------------------------------------------


class PostgresProvider:
    """A PostgreSQL server for tests and the databases made on it.

    ``url`` is the admin URL (``postgresql+psycopg://``) and ``kind`` where the server comes
    from: ``"env"`` (``LILOTA_TEST_POSTGRES_URL``), ``"container"`` (Docker) or ``"local"``
    (a throwaway cluster of this process). Per-test databases are cloned from a template
    database made once (and filled by ``template_setup``, if given). ``stop()``, ``start()``
    and ``restart()`` need the local kind (see ``can_control``); for the others they skip
    the calling test. ``close()`` (also at exit) drops what is left on an ``"env"`` server
    and stops a server it started.
    """

    def __init__(
        self,
        url: str,
        kind: Kind,
        *,
        cluster: LocalPostgresCluster | None = None,
        container: Any = None,
        template_setup: TemplateSetup | None = None,
        description: str = "",
    ) -> None:
        self.url = normalize_postgres_url(url)
        self.kind: Kind = kind
        #: Where the server is, for people: "a container of postgres:16-alpine (...)".
        self.description = description or f"{kind} server {_redact(self.url)}"
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
        """The template database that per-test databases are cloned from (made on first
        use, once per provider)."""
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
        """The local cluster; skips the calling test (``pytest.skip``) for other kinds."""
        if self._cluster is None:
            import pytest  # only a test calls stop()/start()/restart()

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
        """``stop(mode)`` then ``start()``."""
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
    return PostgresProvider(
        url,
        "env",
        template_setup=template_setup,
        description=f"{ENV_POSTGRES_URL} ({_redact(url)})",
    )


def _from_container(template_setup: TemplateSetup | None) -> PostgresProvider:
    """A server in a Docker container (:mod:`lilota.pgcontainer`): the engine must answer
    a ping within 2 s; stale containers of killed runs are removed first."""
    try:
        client = docker_client()
        try:
            import testcontainers  # noqa: F401
        except ImportError:
            raise ContainerUnavailable(
                "Docker answers but testcontainers is not installed (pip install lilota[testing])"
            ) from None
        sweep_stale(client)
        image = choose_image(client)
        server = ContainerServer(client, image, SERVER_SETTINGS)
        started = time.perf_counter()
        server.start()
    except ContainerUnavailable as exc:
        raise _SourceUnavailable(str(exc)) from None
    logger.info(
        "started a PostgreSQL container from %s (host network) on 127.0.0.1:%d in %.2f s",
        image,
        server.port,
        time.perf_counter() - started,
    )
    return PostgresProvider(
        server.url,
        "container",
        container=server,
        template_setup=template_setup,
        description=f"a container of {image} (127.0.0.1:{server.port})",
    )


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
        if isinstance(exc, (ClusterError, OSError, subprocess.SubprocessError)):
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
    return PostgresProvider(
        cluster.url,
        "local",
        cluster=cluster,
        template_setup=template_setup,
        description=f"a throwaway cluster of {bindir} (127.0.0.1:{cluster.port})",
    )


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
