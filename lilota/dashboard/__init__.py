"""A web dashboard for lilota's tasks: live list, counts, task pages, cancel and retry.

``create_app()`` returns an ASGI application (Starlette). Run it on its own with
``lilota dashboard`` / ``python -m lilota.dashboard``, or mount it in your own ASGI app::

    from fastapi import FastAPI
    from lilota.dashboard import create_app

    app = FastAPI()
    app.mount("/lilota", create_app("postgresql+psycopg://.../app", token="..."))

Needs the ``dashboard`` extra (``pip install 'lilota[dashboard]'``: Starlette, uvicorn).

Security (see README, "Dashboard"):

* Every response carries a strict Content-Security-Policy (scripts from this app only, no
  inline script), ``X-Content-Type-Options: nosniff`` and ``frame-ancestors 'none'``. The
  page renders every task field with ``textContent``; the server's only HTML (the page
  shell and login form) escapes what it inserts.
* Actions (cancel, retry, login, logout) are POST only. A POST from a browser must carry
  the CSRF token (double-submit: a random value in an HttpOnly ``SameSite=Strict`` cookie,
  repeated by the page in the ``X-CSRF-Token`` header or the form) and, when the browser
  sends them, an ``Origin`` equal to the request's host and ``Sec-Fetch-Site`` of
  ``same-origin``. A request authenticated with ``Authorization: Bearer <token>`` needs no
  CSRF token (browsers never add that header on their own), but the origin checks still apply.
* With a token (``token=`` or ``LILOTA_DASHBOARD_TOKEN``) every page and endpoint but the
  login form and static files requires it: as a bearer header, or through the login form,
  which sets an HttpOnly cookie holding an HMAC of the token (never the token itself).
* ``allowed_hosts`` limits the ``Host`` header (against DNS rebinding); ``serve()`` sets it to
  the loopback names when it binds to a loopback address, which it does by default.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import RedirectResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the lilota dashboard needs Starlette and uvicorn: pip install 'lilota[dashboard]'"
    ) from missing

from lilota.errors import (
    ConfigurationError,
    DatabaseError,
    LilotaError,
    TaskAlreadyFinished,
    TaskNotFound,
)
from lilota.models import Task, TaskStatus
from lilota.store import TaskStore

log = logging.getLogger(__name__)

__all__ = ["ENV_DB_URL", "ENV_TOKEN", "create_app", "serve"]

ENV_TOKEN = "LILOTA_DASHBOARD_TOKEN"
ENV_DB_URL = "LILOTA_DB_URL"
DEFAULT_DB_URL = "sqlite:///lilota.db"

CSRF_COOKIE = "lilota_csrf"
AUTH_COOKIE = "lilota_auth"
CSRF_HEADER = "x-csrf-token"

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_ID = 2**63 - 1  # task ids are 64-bit; larger numbers cannot name a task
PREVIEW_CHARS = 160
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# Counts by status scan the whole table (an index-only scan, but still every row), so they
# are cached: for at least COUNTS_MIN_AGE seconds, and for COUNTS_COST_FACTOR times as long
# as the last count took, so that however big the table, counting stays a small share of
# the database's time however many pages poll.
COUNTS_MIN_AGE = 1.0
COUNTS_COST_FACTOR = 20.0

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'self'; frame-ancestors 'none'"
)

STATIC_DIR = Path(str(resources.files(__name__).joinpath("static")))
TEMPLATE_DIR = Path(str(resources.files(__name__).joinpath("templates")))

T = TypeVar("T")

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


# ---------------------------------------------------------------------- JSON views


def _plain(value: Any, depth: int = 0) -> Any:
    """A decoded task input/output as JSON the browser reads without loss or error."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        # JavaScript numbers are doubles: wider ints would be shown rounded.
        return value if abs(value) <= 2**53 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth > 200:
        return "…"
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return [_plain(v, depth + 1) for v in sorted(value, key=repr)]
    if isinstance(value, (datetime, date, dt_time)):
        return value.isoformat()
    if isinstance(value, (timedelta, Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        text = repr(bytes(value[:1024]))
        return text if len(value) <= 1024 else text + "…"
    return str(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _preview(value: Any) -> str:
    if value is None:
        return ""
    text = json.dumps(_plain(value), ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def task_summary(task: Task) -> dict[str, Any]:
    """What a row of the task list shows."""
    duration = task.duration
    return {
        "id": task.id,
        "name": task.name,
        "status": task.status.value,
        "progress": task.progress_percentage,
        "description": task.description,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "priority": task.priority,
        "created_at": _iso(task.created_at),
        "run_at": _iso(task.run_at),
        "started_at": _iso(task.start_date_time),
        "ended_at": _iso(task.end_date_time),
        "duration": None if duration is None else duration.total_seconds(),
        "cancel_requested": task.cancel_requested,
        "input_preview": _preview(task.input),
        "error": None if task.exception is None else str(task.exception)[:PREVIEW_CHARS],
    }


def task_detail(task: Task) -> dict[str, Any]:
    """Everything the task page shows."""
    detail = task_summary(task)
    detail.update(
        input=_plain(task.input),
        output=_plain(task.output),
        exception=None if task.exception is None else task.exception.as_dict(),
        worker_id=task.worker_id,
        pid=task.pid,
        unique_key=task.unique_key,
        lease_expires_at=_iso(task.lease_expires_at),
    )
    return detail


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, default=str).encode()


def _error(status_code: int, message: str) -> JSON:
    return JSON({"error": message}, status_code=status_code)


# ---------------------------------------------------------------------- security pieces


class _SecurityHeaders:
    """Adds the security headers to every response; refuses Host headers not allowed."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None = None) -> None:
        self.app = app
        self.allowed_hosts = (
            None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed_hosts is not None and "*" not in self.allowed_hosts:
            host = _host_name(_header(scope, b"host"))
            if host not in self.allowed_hosts:
                await _error(400, "this Host is not allowed")(scope, receive, send)
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in (
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                    (b"cache-control", b"no-store"),
                ):
                    if name not in present:
                        headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def _host_name(host: str) -> str:
    """The name part of a Host header: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Security:
    """Authentication (optional token) and cross-site request checks."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        # The login cookie holds an HMAC of the token: it proves the browser was given the
        # token without storing it, and is the same in every process serving the app.
        self.auth_cookie = (
            None
            if token is None
            else hmac.new(token.encode(), b"lilota dashboard login v1", hashlib.sha256).hexdigest()
        )

    def bearer(self, request: Request) -> bool:
        """True if the request carries the right ``Authorization: Bearer`` token."""
        if self.token is None:
            return False
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token.encode()
        )

    def authenticated(self, request: Request) -> bool:
        if self.token is None or self.bearer(request):
            return True
        cookie = request.cookies.get(AUTH_COOKIE, "")
        assert self.auth_cookie is not None
        return hmac.compare_digest(cookie.encode(), self.auth_cookie.encode())

    @staticmethod
    def cross_site(request: Request) -> str | None:
        """Why a state-changing request looks cross-site, or None if it does not."""
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return f"cross-site request refused (Sec-Fetch-Site: {fetch_site})"
        origin = request.headers.get("origin")
        if origin is not None:
            host = request.headers.get("host", "")
            if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
                return "cross-site request refused (Origin does not match Host)"
        return None

    @staticmethod
    def csrf_ok(request: Request, sent: str | None) -> bool:
        cookie = request.cookies.get(CSRF_COOKIE, "")
        return (
            bool(cookie)
            and sent is not None
            and hmac.compare_digest(cookie.encode(), sent.encode())
        )


def _csrf_token(request: Request) -> tuple[str, bool]:
    """The browser's CSRF token, and whether it is new (and must be set as a cookie)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if 32 <= len(token) <= 128 and token.replace("-", "").replace("_", "").isalnum():
        return token, False
    return secrets.token_urlsafe(32), True


def _base_path(request: Request) -> str:
    """The app's own URL path with a trailing slash (``/lilota/`` when mounted there)."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return root + "/"


def _set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        path=_base_path(request),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


# ---------------------------------------------------------------------- the application


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
        if len(self.cache) > 1000:  # names typed into the filter one letter at a time
            self.cache.clear()
        self.cache[name] = (expires, counts)
        return counts

    def forget(self) -> None:
        """After an action, so that the counts the page gets next include it."""
        self.cache.clear()


def _read_page(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text(encoding="utf-8")


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
    if token is None:
        token = os.environ.get(ENV_TOKEN) or None
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigurationError("the dashboard token must be a non-empty string")
    owns_store = store is None
    if store is None:
        store = TaskStore(db_url or os.environ.get(ENV_DB_URL) or DEFAULT_DB_URL)
    task_store: TaskStore = store
    security = _Security(token)
    counts = _Counts(task_store)
    page_template = _read_page("index.html")
    login_template = _read_page("login.html")
    from lilota import __version__

    version = html.escape(__version__, quote=True)

    async def db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)

    def guard_api(request: Request) -> Response | None:
        if not security.authenticated(request):
            response = _error(401, "authentication required: log in or send a bearer token")
            response.headers["www-authenticate"] = 'Bearer realm="lilota"'
            return response
        return None

    def guard_post(request: Request, sent_csrf: str | None) -> Response | None:
        reason = security.cross_site(request)
        if reason is not None:
            return _error(403, reason)
        if not security.bearer(request) and not security.csrf_ok(request, sent_csrf):
            return _error(403, "missing or wrong CSRF token; reload the page")
        return None

    def render(request: Request, template: str, **values: str) -> Response:
        csrf, new = _csrf_token(request)
        fields = {
            "base": _base_path(request),
            "csrf": csrf,
            "version": version,
            "auth": "token" if token is not None else "none",
            **values,
        }
        text = _PLACEHOLDER.sub(lambda m: html.escape(fields[m[1]], quote=True), template)
        response = Response(text, media_type="text/html; charset=utf-8")
        if new:
            _set_cookie(request, response, CSRF_COOKIE, csrf)
        return response

    def to_login(request: Request) -> Response:
        return RedirectResponse(_base_path(request) + "login", status_code=303)

    # -- pages

    async def list_page(request: Request) -> Response:
        if not security.authenticated(request):
            return to_login(request)
        return render(request, page_template, view="list", task_id="")

    async def task_page(request: Request) -> Response:
        if not security.authenticated(request):
            return to_login(request)
        return render(request, page_template, view="task", task_id=str(request.path_params["id"]))

    async def login_page(request: Request) -> Response:
        if token is None:
            return RedirectResponse(_base_path(request), status_code=303)
        if request.method == "GET":
            return render(request, login_template, error="")
        body = (await request.body()).decode("utf-8", "replace")
        form = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
        refused = guard_post(request, form.get("csrf"))
        if refused is not None:
            return refused
        given = form.get("token", "").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            log.warning("dashboard: failed login from %s", request.client and request.client.host)
            response = render(request, login_template, error="Wrong token.")
            response.status_code = 401
            return response
        response = RedirectResponse(_base_path(request), status_code=303)
        assert security.auth_cookie is not None
        _set_cookie(request, response, AUTH_COOKIE, security.auth_cookie)
        return response

    async def logout(request: Request) -> Response:
        body = (await request.body()).decode("utf-8", "replace")
        form = {k: v[0] for k, v in parse_qs(body).items()}
        refused = guard_post(request, request.headers.get(CSRF_HEADER) or form.get("csrf"))
        if refused is not None:
            return refused
        response = RedirectResponse(_base_path(request) + "login", status_code=303)
        response.delete_cookie(AUTH_COOKIE, path=_base_path(request))
        return response

    # -- JSON

    async def api_tasks(request: Request) -> Response:
        refused = guard_api(request)
        if refused is not None:
            return refused
        query = request.query_params
        status = query.get("status") or None
        name = query.get("name") or None
        try:
            if status is not None:
                TaskStatus(status)
            limit = int(query.get("limit") or DEFAULT_LIMIT)
            before = query.get("before_id")
            before_id = int(before) if before else None
        except ValueError:
            return _error(400, "bad query: status must be a task status; limit, before_id ints")
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, f"limit must be from 1 to {MAX_LIMIT}")
        if before_id is not None and not 1 <= before_id <= MAX_ID:
            return _error(400, "before_id must be a positive 64-bit int")
        tasks = await db(
            task_store.list_tasks, status=status, name=name, limit=limit + 1, before_id=before_id
        )
        more = len(tasks) > limit
        tasks = tasks[:limit]
        return JSON(
            {
                "tasks": [task_summary(t) for t in tasks],
                "next_before_id": tasks[-1].id if more else None,
                "counts": await db(counts.get, name),
                "now": datetime.now(timezone.utc).isoformat(),
            }
        )

    async def api_counts(request: Request) -> Response:
        refused = guard_api(request)
        if refused is not None:
            return refused
        return JSON(await db(counts.get, request.query_params.get("name") or None))

    async def api_task(request: Request) -> Response:
        refused = guard_api(request)
        if refused is not None:
            return refused
        task_id = int(request.path_params["id"])
        task = None if task_id > MAX_ID else await db(task_store.get, task_id)
        if task is None:
            return _error(404, f"no task with id {request.path_params['id']}")
        return JSON(task_detail(task))

    async def api_workers(request: Request) -> Response:
        refused = guard_api(request)
        if refused is not None:
            return refused
        workers = await db(task_store.workers, seen_within=timedelta(minutes=5))
        now = task_store.clock()
        return JSON(
            {
                "workers": [
                    {
                        "id": w["id"],
                        "hostname": w["hostname"],
                        "pid": w["pid"],
                        "started_at": _iso(w["started_at"]),
                        "seconds_since_heartbeat": (now - w["heartbeat_at"]).total_seconds(),
                        "task_names": list(w["task_names"]),
                    }
                    for w in workers
                ],
                "task_names": sorted({n for w in workers for n in w["task_names"]}),
            }
        )

    async def api_action(request: Request) -> Response:
        refused = guard_api(request)
        if refused is None:
            refused = guard_post(request, request.headers.get(CSRF_HEADER))
        if refused is not None:
            return refused
        task_id = int(request.path_params["id"])
        action = request.path_params["action"]
        if task_id > MAX_ID:
            return _error(404, f"no task with id {task_id}")
        try:
            if action == "cancel":
                await db(task_store.cancel, task_id)
            elif action == "retry":
                await db(task_store.retry, task_id)
            else:
                return _error(404, f"no action {action!r}")
        except TaskNotFound as e:
            return _error(404, str(e))
        except (TaskAlreadyFinished, ValueError) as e:
            return _error(409, str(e))
        counts.forget()
        log.info("dashboard: %s task %d", action, task_id)
        task = await db(task_store.get, task_id)
        return JSON({"ok": True, "task": None if task is None else task_detail(task)})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if owns_store:
            task_store.dispose()

    routes = [
        Route("/", list_page),
        Route("/tasks/{id:int}", task_page),
        Route("/login", login_page, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/tasks", api_tasks),
        Route("/api/counts", api_counts),
        Route("/api/workers", api_workers),
        Route("/api/tasks/{id:int}", api_task),
        Route("/api/tasks/{id:int}/{action:str}", api_action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]

    async def database_error(request: Request, exc: Exception) -> Response:
        log.warning("dashboard: database error: %s", exc)
        return _error(503, f"database error: {exc}")

    async def lilota_error(request: Request, exc: Exception) -> Response:
        return _error(500, f"{type(exc).__name__}: {exc}")

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={DatabaseError: database_error, LilotaError: lilota_error},
    )
    app.state.store = task_store
    app.add_middleware(_SecurityHeaders, allowed_hosts=allowed_hosts)
    return app


def serve(
    db_url: str | None = None,
    *,
    store: TaskStore | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    log_level: str = "info",
) -> None:
    """Run the dashboard with uvicorn until interrupted (what ``lilota dashboard`` does).

    Bound to a loopback address (the default), only loopback Host names are accepted.
    A SQLite ``db_url`` must name an existing file: a mistyped path is an error here,
    not a new empty database.
    """
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(
            "serving the lilota dashboard needs uvicorn: pip install 'lilota[dashboard]'"
        ) from e

    if store is None:
        store = TaskStore(db_url or os.environ.get(ENV_DB_URL) or DEFAULT_DB_URL)
        path = store.url.database or ""
        local_file = path not in ("", ":memory:") and not path.startswith("file:")
        if store.is_sqlite and local_file and not os.path.exists(path):
            store.dispose()
            raise ConfigurationError(
                f"no SQLite database at {os.path.abspath(path)}; pass --db-url or set {ENV_DB_URL}"
            )

    if token is None:
        token = os.environ.get(ENV_TOKEN) or None
    loopback = _is_loopback(host)
    if not loopback and token is None:
        log.warning(
            "the dashboard listens on %s without a token: anyone who can reach it can see "
            "task inputs and outputs and cancel tasks; pass --token or set %s",
            host,
            ENV_TOKEN,
        )
    app = create_app(
        store=store, token=token, allowed_hosts=list(LOOPBACK_HOSTS) if loopback else None
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
