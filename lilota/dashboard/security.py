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
  which starts a session (:class:`Sessions`): an HttpOnly cookie naming a random session
  id and its expiry, signed with a key derived from the token (never the token itself).
  Logout revokes that session id, so a copy of the cookie stops working too.
* Wrong tokens (login form or bearer header) are throttled per client address
  (:class:`LoginThrottle`): a few are free, then the address is refused with 429 and
  ``Retry-After`` for a time that doubles with each further wrong token.
* ``allowed_hosts`` limits the ``Host`` header (against DNS rebinding); ``serve()`` sets it to
  the loopback names when it binds to a loopback address, which it does by default, and
  refuses any other address without a token unless told ``insecure=True``.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lilota.dashboard.views import error

CSRF_COOKIE = "lilota_csrf"
AUTH_COOKIE = "lilota_auth"
CSRF_HEADER = "x-csrf-token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# A login session lasts this long. Logout revokes a session in the process that served it;
# where several processes serve the dashboard, the others learn nothing of it, so a copied
# cookie is refused there only once it expires: a working day, not for ever.
SESSION_LIFETIME = 12 * 3600.0

# Wrong tokens from one client address: the first FREE_FAILURES - 1 are free (typing
# mistakes); after the next, and each one after it, the address is refused for a time
# doubling from THROTTLE_FIRST up to THROTTLE_MAX seconds: a person who mistyped waits
# seconds, a guesser gets a few hundred tries a day instead of hundreds a second. A count is forgotten after THROTTLE_FORGET
# seconds without a wrong token, and at most THROTTLE_MAX_CLIENTS addresses are kept (the
# oldest go first), so that addresses made up by the thousand cannot fill the memory.
FREE_FAILURES = 5
THROTTLE_FIRST = 1.0
THROTTLE_MAX = 300.0
THROTTLE_FORGET = 3600.0
THROTTLE_MAX_CLIENTS = 10_000

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


class Sessions:
    """Login sessions. A cookie is ``<id>.<expiry>.<signature>``: a random id, the Unix time
    it ends (after :data:`SESSION_LIFETIME`) and an HMAC of both keyed from the token, so
    every process serving the app with the same token accepts it, and a new token ends
    every session. :meth:`revoke` (logout) refuses the id from then on in this process."""

    def __init__(self, token: str, clock: Callable[[], float] = time.time) -> None:
        self._key = hmac.new(token.encode(), b"lilota dashboard session v2", hashlib.sha256)
        self._clock = clock
        self._revoked: dict[str, float] = {}  # session id -> when it would have ended
        self._lock = threading.Lock()

    def _sign(self, body: str) -> str:
        mac = self._key.copy()
        mac.update(body.encode())
        return mac.hexdigest()

    def new(self) -> str:
        """A new session's cookie value."""
        body = f"{secrets.token_urlsafe(18)}.{int(self._clock() + SESSION_LIFETIME)}"
        return f"{body}.{self._sign(body)}"

    def _parse(self, cookie: str) -> tuple[str, float] | None:
        """(id, expiry) of a cookie this app signed that has not expired, else None."""
        session_id, _, rest = cookie.partition(".")
        expiry, _, signature = rest.partition(".")
        body = f"{session_id}.{expiry}"
        if not (session_id and expiry.isdigit()) or not hmac.compare_digest(
            signature.encode(), self._sign(body).encode()
        ):
            return None
        return (session_id, float(expiry)) if float(expiry) > self._clock() else None

    def valid(self, cookie: str) -> bool:
        parsed = self._parse(cookie)
        with self._lock:
            return parsed is not None and parsed[0] not in self._revoked

    def revoke(self, cookie: str) -> None:
        """End the cookie's session (logout); forget revocations of expired sessions."""
        parsed = self._parse(cookie)
        now = self._clock()
        with self._lock:
            for session_id in [i for i, ends in self._revoked.items() if ends <= now]:
                del self._revoked[session_id]
            if parsed is not None:
                self._revoked[parsed[0]] = parsed[1]


def client_key(host: str | None) -> str:
    """Whom to count wrong tokens against: the client address (an IPv6 one by its /64,
    which one host is given whole)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host or "unknown"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class LoginThrottle:
    """Counts wrong tokens per client (:func:`client_key`) and says how long a client must
    wait before its next try. ``clock`` is injectable (monotonic seconds)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # client -> (wrong tokens, last wrong one, refused until); oldest first.
        self._clients: collections.OrderedDict[str, tuple[int, float, float]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int | None:
        """Whole seconds ``client`` must wait before trying a token again, or None."""
        with self._lock:
            entry = self._clients.get(client)
        if entry is None or entry[2] <= self._clock():
            return None
        return max(1, math.ceil(entry[2] - self._clock()))

    def failed(self, client: str) -> int:
        """Count a wrong token from ``client``; returns how many it has sent in a row."""
        now = self._clock()
        with self._lock:
            count, last, _ = self._clients.pop(client, (0, now, now))
            count = 1 if now - last > THROTTLE_FORGET else count + 1
            over = count - FREE_FAILURES  # 0 at the last free one: the next waits
            until = now + min(THROTTLE_MAX, THROTTLE_FIRST * 2**over) if over >= 0 else now
            self._clients[client] = (count, now, until)
            while len(self._clients) > THROTTLE_MAX_CLIENTS:
                self._clients.popitem(last=False)
        return count

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)


class Security:
    """Authentication (optional token), login sessions and throttling, cross-site checks."""

    def __init__(self, token: str | None, clock: Callable[[], float] = time.time) -> None:
        self.token = token
        self.sessions = None if token is None else Sessions(token, clock)
        self.throttle = LoginThrottle()

    @staticmethod
    def sends_bearer(request: Request) -> bool:
        """Whether the request tries a bearer token (right or wrong)."""
        scheme, _, _ = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer"

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
        assert self.sessions is not None
        return self.sessions.valid(request.cookies.get(AUTH_COOKIE, ""))

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
