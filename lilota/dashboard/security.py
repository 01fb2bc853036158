"""The dashboard's security: headers on every response, the token, CSRF and origin checks.

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
import ipaddress
import secrets
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lilota.dashboard.views import error

CSRF_COOKIE = "lilota_csrf"
AUTH_COOKIE = "lilota_auth"
CSRF_HEADER = "x-csrf-token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'self'; frame-ancestors 'none'"
)

# Added to every response that does not set them itself.
_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)


class SecurityHeaders:
    """ASGI middleware: adds the security headers to every response; refuses Host headers
    not in ``allowed_hosts`` (None, or a ``*`` among them: any)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None = None) -> None:
        self.app = app
        self.allowed_hosts = (
            None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
        )

    def host_allowed(self, scope: Scope) -> bool:
        if self.allowed_hosts is None or "*" in self.allowed_hosts:
            return True
        return host_name(header(scope, b"host")) in self.allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.host_allowed(scope):
            await error(400, "this Host is not allowed")(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _with_security_headers(message)}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _with_security_headers(start: Message) -> list[tuple[bytes, bytes]]:
    headers = list(start.get("headers", []))
    present = {name.lower() for name, _ in headers}
    headers.extend((name, value) for name, value in _HEADERS if name not in present)
    return headers


def header(scope: Scope, name: bytes) -> str:
    """The request header ``name`` (lower case) from an ASGI scope, or ``""``."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def host_name(host: str) -> str:
    """The name part of a Host header: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.1``, ``::1``...)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Security:
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

    def token_matches(self, given: str) -> bool:
        """True if ``given`` (typed into the login form) is the token."""
        assert self.token is not None
        return hmac.compare_digest(given.encode(), self.token.encode())

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


def csrf_token(request: Request) -> tuple[str, bool]:
    """The browser's CSRF token, and whether it is new (and must be set as a cookie)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if 32 <= len(token) <= 128 and token.replace("-", "").replace("_", "").isalnum():
        return token, False
    return secrets.token_urlsafe(32), True


def base_path(request: Request) -> str:
    """The app's own URL path with a trailing slash (``/lilota/`` when mounted there)."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return root + "/"


def set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    """Set an HttpOnly, ``SameSite=Strict`` cookie for the app's path (Secure over https)."""
    response.set_cookie(
        name,
        value,
        path=base_path(request),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
