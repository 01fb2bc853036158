"""The dashboard application: its route table, the handlers, ``create_app`` and ``serve``.

Each route is one small method of :class:`_Dashboard`, which holds what they share (the
store, the security checks, the cached counts, the page templates). Pages are two HTML
shells filled by ``static/dashboard.js`` from the JSON API; :mod:`.views` shapes the
JSON, :mod:`.security` checks who may see and act.
"""

from __future__ import annotations

import html
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from lilota import __version__, metrics, validation
from lilota.dashboard.security import (
    AUTH_COOKIE,
    CSRF_COOKIE,
    CSRF_HEADER,
    LOOPBACK_HOSTS,
    Security,
    SecurityHeaders,
    base_path,
    client_key,
    csrf_token,
    is_loopback,
    set_cookie,
)
from lilota.dashboard.views import JSON, error, task_detail, task_summary, worker_view
from lilota.errors import (
    ConfigurationError,
    DatabaseError,
    LilotaError,
    TaskAlreadyFinished,
    TaskNotFound,
)
from lilota.models import TaskStatus
from lilota.settings import ENV_DB_URL, default_db_url
from lilota.store import TaskStore

log = logging.getLogger(__name__)

ENV_TOKEN = "LILOTA_DASHBOARD_TOKEN"

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_ID = validation.MAX_ID  # task ids are 64-bit; larger numbers cannot name a task
# The dashboard lists the workers with a heartbeat this recent: a live worker beats at
# least every lease/3 (10 s by default), so a few minutes also shows one that just died.
WORKERS_SEEN_WITHIN = timedelta(minutes=5)

# Counts by status scan the whole table (an index-only scan, but still every row), so they
# are cached: for at least COUNTS_MIN_AGE seconds, and for COUNTS_COST_FACTOR times as long
# as the last count took, so that however big the table, counting stays a small share of
# the database's time however many pages poll.
COUNTS_MIN_AGE = 1.0
COUNTS_COST_FACTOR = 20.0
# Names typed into the filter one letter at a time each get a cache entry: past this
# many, the cache starts again rather than grow without end.
COUNTS_MAX_ENTRIES = 1000

# The package's directories (importlib.resources: also right for an installed wheel).
STATIC_DIR = Path(str(resources.files("lilota.dashboard").joinpath("static")))
TEMPLATE_DIR = Path(str(resources.files("lilota.dashboard").joinpath("templates")))

T = TypeVar("T")

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class _Counts:
    """count_by_status with a cache whose lifetime grows with the cost of counting."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.cache: dict[str | None, tuple[float, dict[str, int]]] = {}
        self.cost = 0.0

    def get(self, name: str | None) -> dict[str, int]:
        now = time.monotonic()
        hit = self.cache.get(name)
        if hit is not None and now < hit[0]:
            return hit[1]
        counts = self.store.count_by_status(name=name)
        took = time.monotonic() - now
        expires = time.monotonic() + max(COUNTS_MIN_AGE, took * COUNTS_COST_FACTOR)
        if len(self.cache) > COUNTS_MAX_ENTRIES:
            self.cache.clear()
        self.cache[name] = (expires, counts)
        return counts

    def forget(self) -> None:
        """After an action, so that the counts the page gets next include it."""
        self.cache.clear()


@dataclass(frozen=True)
class _ListQuery:
    """The query of ``GET /api/tasks``, checked."""

    status: str | None
    name: str | None
    limit: int
    before_id: int | None

    @classmethod
    def parse(cls, query: QueryParams) -> _ListQuery | Response:
        """The query, or the 400 response that says what is wrong with it."""
        status = query.get("status") or None
        try:
            if status is not None:
                TaskStatus(status)
            limit = int(query.get("limit") or DEFAULT_LIMIT)
            before = query.get("before_id")
            before_id = int(before) if before else None
        except ValueError:
            return error(400, "bad query: status must be a task status; limit, before_id ints")
        if not 1 <= limit <= MAX_LIMIT:
            return error(400, f"limit must be from 1 to {MAX_LIMIT}")
        if before_id is not None and not 1 <= before_id <= MAX_ID:
            return error(400, "before_id must be a positive 64-bit int")
        return cls(status, query.get("name") or None, limit, before_id)


def _read_page(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text(encoding="utf-8")


async def _form(request: Request, *, keep_blank_values: bool = False) -> dict[str, str]:
    """A urlencoded request body as a dict (the first value of each field)."""
    body = (await request.body()).decode("utf-8", "replace")
    fields = parse_qs(body, keep_blank_values=keep_blank_values)
    return {key: values[0] for key, values in fields.items()}


class _Dashboard:
    """The route handlers, sharing one store, one security policy and the page templates."""

    def __init__(self, store: TaskStore, token: str | None, owns_store: bool) -> None:
        self.store = store
        self.token = token
        self.owns_store = owns_store
        self.security = Security(token)
        self.counts = _Counts(store)
        self.page_template = _read_page("index.html")
        self.login_template = _read_page("login.html")
        self.version = html.escape(__version__, quote=True)
        self.registry: Any = None  # the metrics registry, made at the first scrape

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.list_page),
            Route("/tasks/{id:int}", self.task_page),
            Route("/login", self.login_page, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/api/tasks", self.api_tasks),
            Route("/api/counts", self.api_counts),
            Route("/api/workers", self.api_workers),
            Route("/api/tasks/{id:int}", self.api_task),
            Route("/api/tasks/{id:int}/{action:str}", self.api_action, methods=["POST"]),
            Route("/metrics", self.metrics),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        if self.owns_store:
            self.store.dispose()

    # -- shared steps

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call off the event loop."""
        return await run_in_threadpool(fn, *args, **kwargs)

    def guard_api(self, request: Request) -> Response | None:
        """A 401 response unless the request is authenticated; 429 for a bearer token
        from a client that sent too many wrong ones (see :meth:`throttled`)."""
        bearer = self.security.sends_bearer(request)
        refused = self.throttled(request) if bearer else None
        if refused is None and not self.security.authenticated(request):
            if bearer:
                self.wrong_token(request, "bearer token")
            refused = error(401, "authentication required: log in or send a bearer token")
            refused.headers["www-authenticate"] = 'Bearer realm="lilota"'
        return refused

    def throttled(self, request: Request) -> Response | None:
        """A 429 response, with ``Retry-After``, if this client must wait before trying a
        token again (whether the token is right or not: it is not looked at)."""
        wait = self.security.throttle.retry_after(client_key(_client_host(request)))
        if wait is None:
            return None
        response = error(429, f"too many wrong tokens from this address; try again in {wait} s")
        response.headers["retry-after"] = str(wait)
        return response

    def wrong_token(self, request: Request, how: str) -> None:
        host = _client_host(request)
        count = self.security.throttle.failed(client_key(host))
        log.warning("dashboard: wrong %s from %s (%d in a row)", how, host, count)

    def guard_post(self, request: Request, sent_csrf: str | None) -> Response | None:
        """A 403 response for a cross-site POST, or one without the right CSRF token."""
        reason = self.security.cross_site(request)
        if reason is not None:
            return error(403, reason)
        if not self.security.bearer(request) and not self.security.csrf_ok(request, sent_csrf):
            return error(403, "missing or wrong CSRF token; reload the page")
        return None

    def render(self, request: Request, template: str, **values: str) -> Response:
        """An HTML page: ``template`` with its ``{{placeholders}}`` filled, escaped."""
        csrf, new = csrf_token(request)
        fields = {
            "base": base_path(request),
            "csrf": csrf,
            "version": self.version,
            "auth": "token" if self.token is not None else "none",
            **values,
        }
        text = _PLACEHOLDER.sub(lambda m: html.escape(fields[m[1]], quote=True), template)
        response = Response(text, media_type="text/html; charset=utf-8")
        if new:
            set_cookie(request, response, CSRF_COOKIE, csrf)
        return response

    # -- pages

    async def list_page(self, request: Request) -> Response:
        if not self.security.authenticated(request):
            return _to_login(request)
        return self.render(request, self.page_template, view="list", task_id="")

    async def task_page(self, request: Request) -> Response:
        if not self.security.authenticated(request):
            return _to_login(request)
        task_id = str(request.path_params["id"])
        return self.render(request, self.page_template, view="task", task_id=task_id)

    async def login_page(self, request: Request) -> Response:
        if self.token is None:
            return RedirectResponse(base_path(request), status_code=303)
        if request.method == "GET":
            return self.render(request, self.login_template, error="")
        return await self.login(request)

    async def login(self, request: Request) -> Response:
        """The login form's POST: the token, checked, sets the login cookie."""
        form = await _form(request, keep_blank_values=True)
        refused = self.guard_post(request, form.get("csrf"))
        if refused is not None:
            return refused
        throttled = self.throttled(request)
        if throttled is not None:
            wait = throttled.headers["retry-after"]
            message = f"Too many wrong tokens: try again in {wait} s."
            response = self.render(request, self.login_template, error=message)
            response.status_code, response.headers["retry-after"] = 429, wait
            return response
        if not self.security.token_matches(form.get("token", "").strip()):
            self.wrong_token(request, "token at login")
            response = self.render(request, self.login_template, error="Wrong token.")
            response.status_code = 401
            return response
        self.security.throttle.succeeded(client_key(_client_host(request)))
        response = RedirectResponse(base_path(request), status_code=303)
        assert self.security.sessions is not None
        set_cookie(request, response, AUTH_COOKIE, self.security.sessions.new())
        return response

    async def logout(self, request: Request) -> Response:
        form = await _form(request)
        refused = self.guard_post(request, request.headers.get(CSRF_HEADER) or form.get("csrf"))
        if refused is not None:
            return refused
        if self.security.sessions is not None:  # a copy of the cookie stops working too
            self.security.sessions.revoke(request.cookies.get(AUTH_COOKIE, ""))
        response = RedirectResponse(base_path(request) + "login", status_code=303)
        response.delete_cookie(AUTH_COOKIE, path=base_path(request))
        return response

    # -- JSON

    async def api_tasks(self, request: Request) -> Response:
        refused = self.guard_api(request)
        if refused is not None:
            return refused
        query = _ListQuery.parse(request.query_params)
        if isinstance(query, Response):
            return query
        tasks = await self.db(
            self.store.list_tasks,
            status=query.status,
            name=query.name,
            limit=query.limit + 1,  # one more than shown: is there an older page?
            before_id=query.before_id,
        )
        more = len(tasks) > query.limit
        tasks = tasks[: query.limit]
        return JSON(
            {
                "tasks": [task_summary(t) for t in tasks],
                "next_before_id": tasks[-1].id if more else None,
                "counts": await self.db(self.counts.get, query.name),
                "now": datetime.now(timezone.utc).isoformat(),
            }
        )

    async def api_counts(self, request: Request) -> Response:
        refused = self.guard_api(request)
        if refused is not None:
            return refused
        return JSON(await self.db(self.counts.get, request.query_params.get("name") or None))

    async def api_task(self, request: Request) -> Response:
        refused = self.guard_api(request)
        if refused is not None:
            return refused
        task_id = int(request.path_params["id"])
        task = None if task_id > MAX_ID else await self.db(self.store.get, task_id)
        if task is None:
            return error(404, f"no task with id {request.path_params['id']}")
        return JSON(task_detail(task))

    async def api_workers(self, request: Request) -> Response:
        refused = self.guard_api(request)
        if refused is not None:
            return refused
        workers = await self.db(self.store.workers, seen_within=WORKERS_SEEN_WITHIN)
        unserved = await self.db(self.store.unserved, WORKERS_SEEN_WITHIN)
        now = self.store.clock()
        return JSON(
            {
                "workers": [worker_view(w, now) for w in workers],
                "task_names": sorted({n for w in workers for n in w["task_names"]}),
                # pending tasks by name that no live worker runs
                "unserved": dict(sorted(unserved.items())),
            }
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics (lilota[metrics]): the database counts, and the run times of
        workers on this host when ``PROMETHEUS_MULTIPROC_DIR`` names their directory.
        Guarded as the API is: with a token, Prometheus sends it as a bearer token."""
        refused = self.guard_api(request)
        if refused is not None:
            return refused
        try:
            if self.registry is None:
                self.registry = metrics.registry_for(self.store)
        except metrics.MetricsUnavailable as e:
            return error(501, str(e))
        from prometheus_client.exposition import choose_encoder

        # The format Prometheus asks for (text, or OpenMetrics), as its own server does.
        encode, media_type = choose_encoder(request.headers.get("accept", ""))
        body = await self.db(encode, self.registry)
        return Response(body, media_type=media_type)

    async def api_action(self, request: Request) -> Response:
        refused = self.guard_api(request)
        if refused is None:
            refused = self.guard_post(request, request.headers.get(CSRF_HEADER))
        if refused is not None:
            return refused
        task_id = int(request.path_params["id"])
        action = request.path_params["action"]
        if task_id > MAX_ID:
            return error(404, f"no task with id {task_id}")
        actions: dict[str, Callable[[int], object]] = {
            "cancel": self.store.cancel,
            "retry": self.store.retry,
        }
        if action not in actions:
            return error(404, f"no action {action!r}")
        try:
            await self.db(actions[action], task_id)
        except TaskNotFound as e:
            return error(404, str(e))
        except (TaskAlreadyFinished, ValueError) as e:
            return error(409, str(e))
        self.counts.forget()
        log.info("dashboard: %s task %d", action, task_id)
        task = await self.db(self.store.get, task_id)
        return JSON({"ok": True, "task": None if task is None else task_detail(task)})


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def _to_login(request: Request) -> Response:
    return RedirectResponse(base_path(request) + "login", status_code=303)


async def _database_error(request: Request, exc: Exception) -> Response:
    log.warning("dashboard: database error: %s", exc)
    return error(503, f"database error: {exc}")


async def _lilota_error(request: Request, exc: Exception) -> Response:
    return error(500, f"{type(exc).__name__}: {exc}")


def _checked_token(token: str | None) -> str | None:
    """``token``, else ``LILOTA_DASHBOARD_TOKEN``, else None; a blank one is refused."""
    if token is None:
        token = os.environ.get(ENV_TOKEN) or None
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigurationError("the dashboard token must be a non-empty string")
    return token


def create_app(
    db_url: str | None = None,
    *,
    token: str | None = None,
    store: TaskStore | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The dashboard as an ASGI application.

    ``db_url``: the database lilota uses (default: ``LILOTA_DB_URL``, else
    ``sqlite:///lilota.db``), or pass an existing ``store`` (e.g. ``Lilota(...).store``).
    ``token``: required to see anything (default: ``LILOTA_DASHBOARD_TOKEN`` if set; no
    token means anyone who can reach the app can see and act on tasks).
    ``allowed_hosts``: Host header names accepted (default: any).
    """
    if store is not None and db_url is not None:
        raise ConfigurationError("pass db_url or store to create_app(), not both")
    token = _checked_token(token)
    owns_store = store is None
    if store is None:
        store = TaskStore(db_url or default_db_url())
    dashboard = _Dashboard(store, token, owns_store)
    app = Starlette(
        routes=dashboard.routes(),
        lifespan=dashboard.lifespan,
        exception_handlers={DatabaseError: _database_error, LilotaError: _lilota_error},
    )
    app.state.store = store
    app.add_middleware(SecurityHeaders, allowed_hosts=allowed_hosts)
    return app


def _store_for(db_url: str | None) -> TaskStore:
    """A store for ``db_url``; a SQLite file must exist (a typo is not a new database)."""
    store = TaskStore(db_url or default_db_url())
    path = store.url.database or ""
    local_file = path not in ("", ":memory:") and not path.startswith("file:")
    if store.is_sqlite and local_file and not os.path.exists(path):
        store.dispose()
        raise ConfigurationError(
            f"no SQLite database at {os.path.abspath(path)}; pass --db-url or set {ENV_DB_URL}"
        )
    return store


def serve(
    db_url: str | None = None,
    *,
    store: TaskStore | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    log_level: str = "info",
    insecure: bool = False,
) -> None:
    """Run the dashboard with uvicorn until interrupted (what ``lilota dashboard`` does).

    Bound to a loopback address (the default), only loopback Host names are accepted.
    Any other address needs a token: without one, :class:`ConfigurationError` unless
    ``insecure`` (``--insecure``), which serves it to anyone who can reach it, with a
    warning. A SQLite ``db_url`` must name an existing file: a mistyped path is an error
    here, not a new empty database.
    """
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(
            "serving the lilota dashboard needs uvicorn: pip install 'lilota[dashboard]'"
        ) from e

    if token is None:
        token = os.environ.get(ENV_TOKEN) or None
    loopback = is_loopback(host)
    if not loopback and token is None:
        exposed = "anyone who can reach it can read every task's input and output and cancel tasks"
        if not insecure:
            raise ConfigurationError(
                f"refusing to serve the dashboard on {host} without a token: {exposed}; pass "
                f"--token (or set {ENV_TOKEN}), or --insecure to serve it anyway"
            )
        log.warning("the dashboard listens on %s without a token (--insecure): %s", host, exposed)
    if store is None:
        store = _store_for(db_url)
    app = create_app(
        store=store, token=token, allowed_hosts=list(LOOPBACK_HOSTS) if loopback else None
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
