"""One transaction per store method: retried when the error is transient, and driver
errors translated into lilota's (:class:`DatabaseUnavailable`, :class:`DatabaseError`)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Concatenate, ParamSpec, Protocol, TypeVar

from sqlalchemy import exc
from sqlalchemy.engine import Connection

from lilota.errors import DatabaseError, DatabaseUnavailable

if TYPE_CHECKING:
    from lilota.dialects import Dialect

P = ParamSpec("P")
R = TypeVar("R")


class Transactional(Protocol):
    """What :func:`transaction` needs of the object whose methods it decorates."""

    dialect: Dialect

    def ensure_schema(self) -> None: ...


S = TypeVar("S", bound=Transactional)


def retry_after(dialect: Dialect, attempt: int, error: exc.DBAPIError) -> float | None:
    """Seconds to wait before running a transaction again after its ``attempt``-th run
    raised ``error`` (0.05, 0.1, 0.2...), or None: a permanent error, or no runs left."""
    if attempt < dialect.retries and dialect.is_transient(error):
        return 0.05 * 2.0 ** (attempt - 1)
    return None


def transaction(
    *, read_only: bool = False, single: bool = False, schema: bool = False
) -> Callable[[Callable[Concatenate[S, Connection, P], R]], Callable[Concatenate[S, P], R]]:
    """Run the decorated method in one transaction, on a connection passed after ``self``.

    A transient error (:meth:`Dialect.is_transient`) rolls it back and runs it again a few
    times, waiting 0.05, 0.1, 0.2... s: the method must be safe to repeat. A permanent one
    (:meth:`Dialect.permanent_error`: a read-only or corrupt SQLite file...) is raised at
    once; others become :class:`DatabaseUnavailable` or :class:`DatabaseError`. ``read_only``
    takes no write lock (SQLite: BEGIN, not BEGIN IMMEDIATE); ``single`` is for one
    statement, autocommit where the dialect can (PostgreSQL: one round trip); ``schema``
    ensures the tables first."""

    def decorate(
        method: Callable[Concatenate[S, Connection, P], R],
    ) -> Callable[Concatenate[S, P], R]:
        @functools.wraps(method)
        def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            if schema:
                self.ensure_schema()
            dialect = self.dialect
            for attempt in range(1, dialect.retries + 1):
                try:
                    with dialect.connect(read_only, single) as conn, conn.begin():
                        return method(self, conn, *args, **kwargs)
                except exc.DBAPIError as e:
                    permanent = dialect.permanent_error(e)
                    if permanent is not None:
                        raise permanent from e
                    delay = retry_after(dialect, attempt, e)
                    if delay is not None:
                        time.sleep(delay)
                        continue
                    if isinstance(e, (exc.OperationalError, exc.InterfaceError)):
                        where = dialect.url.render_as_string(hide_password=True)
                        raise DatabaseUnavailable(
                            f"the database at {where} cannot be reached: {e.orig}"
                        ) from e
                    raise DatabaseError(f"the database refused a statement: {e.orig}") from e
                except exc.SQLAlchemyError as e:
                    raise DatabaseError(f"database error: {e}") from e
            raise AssertionError("unreachable")

        return run

    return decorate
