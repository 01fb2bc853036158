"""Database URLs: validated, with lilota's driver defaults and connection settings."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import make_url
from sqlalchemy.engine.url import URL

from lilota.errors import ConfigurationError

# libpq settings unless the URL sets them: connecting gives up after 10 s (default: never),
# keepalives notice a dead peer of an idle connection in a minute, and the server ends a
# session idle in a transaction for 10 s (a cut-off worker's row locks would hide its tasks).
POSTGRES_CONNECT_DEFAULTS: dict[str, Any] = dict(
    connect_timeout=10, keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3
) | {"options": "-c idle_in_transaction_session_timeout=10s"}


# lilota's own options in a PostgreSQL URL's query (removed before the driver sees it):
# ``lilota_pooler=transaction``: the URL points at a pooler in transaction mode (PgBouncer),
# so no session state may be relied on (no server-side prepared statements, no startup
# ``options``, no LISTEN through it); ``lilota_direct=host:port``: where idle workers
# LISTEN instead, on a direct connection to the server (same user, password, database).
POOLER_OPTION, DIRECT_OPTION = "lilota_pooler", "lilota_direct"
POOLER_MODES = ("transaction", "session")


def lilota_options(url: URL) -> tuple[URL, str | None, URL | None]:
    """``url`` without lilota's query options, the pooler mode, and the direct URL."""
    query = dict(url.query)
    pooler, direct = query.pop(POOLER_OPTION, None), query.pop(DIRECT_OPTION, None)
    if isinstance(pooler, tuple) or isinstance(direct, tuple):
        raise ConfigurationError(f"{POOLER_OPTION} and {DIRECT_OPTION} may be given once each")
    if pooler is not None and pooler not in POOLER_MODES:
        raise ConfigurationError(
            f"{POOLER_OPTION}={pooler!r}: expected one of {', '.join(POOLER_MODES)}"
        )
    stripped = url.set(query=query)
    if direct is None:
        return stripped, pooler, None
    host, _, port = direct.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{DIRECT_OPTION}={direct!r}: expected host:port")
    return stripped, pooler, stripped.set(host=host.strip("[]"), port=int(port))


def parse_url(db_url: object) -> URL:
    """``db_url`` validated, with lilota's driver defaults (``postgresql://`` means psycopg
    3, ``postgresql+psycopg://``). Raises :class:`ConfigurationError` naming the problem."""
    if not isinstance(db_url, (str, URL)):
        raise ConfigurationError(f"db_url must be a string, got {type(db_url).__name__}")
    try:
        url = make_url(db_url)
    except exc.ArgumentError as e:
        raise ConfigurationError(
            f"db_url {str(db_url)!r} is not a database URL; expected e.g. "
            "'sqlite:///lilota.db' or 'postgresql+psycopg://user:password@host:5432/dbname'"
        ) from e
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres") and url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    shown = url.render_as_string(hide_password=True)
    database = (url.database or "") if backend == "sqlite" else ""
    if database and database != ":memory:" and not database.startswith("file:"):
        parent = os.path.dirname(os.path.abspath(database))
        if not os.path.isdir(parent):
            raise ConfigurationError(f"db_url {shown!r}: the directory {parent!r} does not exist")
    if url.get_backend_name() == "postgresql":
        lilota_options(url)  # ConfigurationError for a bad lilota_pooler / lilota_direct
    elif POOLER_OPTION in url.query or DIRECT_OPTION in url.query:
        raise ConfigurationError(f"db_url {shown!r}: {POOLER_OPTION} is for PostgreSQL URLs")
    try:
        url.get_dialect()
    except exc.NoSuchModuleError as e:
        raise ConfigurationError(
            f"db_url {shown!r}: SQLAlchemy has no dialect {url.drivername!r}"
        ) from e
    return url


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (url.database or ":memory:") == ":memory:"


def postgres_connect_args(url: URL) -> dict[str, Any]:
    """:data:`POSTGRES_CONNECT_DEFAULTS` that the URL's query does not set."""
    return {k: v for k, v in POSTGRES_CONNECT_DEFAULTS.items() if k not in url.query}
