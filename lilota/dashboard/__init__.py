"""A web dashboard for lilota's tasks: live list, counts, task pages, cancel and retry.

``create_app()`` returns an ASGI application (Starlette). Run it on its own with
``lilota dashboard`` / ``python -m lilota.dashboard``, or mount it in your own ASGI app::

    from fastapi import FastAPI
    from lilota.dashboard import create_app

    app = FastAPI()
    app.mount("/lilota", create_app("postgresql+psycopg://.../app", token="..."))

Needs the ``dashboard`` extra (``pip install 'lilota[dashboard]'``: Starlette, uvicorn);
importing this package without them raises ImportError saying so.

The package: :mod:`.app` (the route table and its handlers, ``create_app``, ``serve``),
:mod:`.views` (the JSON the API returns, built on ``Task.to_json()``), :mod:`.security`
(headers, token, CSRF and origin checks: read its docstring, and the README's
"Dashboard"), and the page's assets in ``static/`` and ``templates/``.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401  (the error below names the extra to install)
except ImportError as missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the lilota dashboard needs Starlette and uvicorn: pip install 'lilota[dashboard]'"
    ) from missing

from lilota.dashboard.app import COUNTS_COST_FACTOR as COUNTS_COST_FACTOR
from lilota.dashboard.app import COUNTS_MIN_AGE as COUNTS_MIN_AGE
from lilota.dashboard.app import DEFAULT_LIMIT as DEFAULT_LIMIT
from lilota.dashboard.app import ENV_TOKEN, create_app, serve
from lilota.dashboard.app import MAX_ID as MAX_ID
from lilota.dashboard.app import MAX_LIMIT as MAX_LIMIT
from lilota.dashboard.app import STATIC_DIR as STATIC_DIR
from lilota.dashboard.app import TEMPLATE_DIR as TEMPLATE_DIR
from lilota.dashboard.security import AUTH_COOKIE as AUTH_COOKIE
from lilota.dashboard.security import CSP as CSP
from lilota.dashboard.security import CSRF_COOKIE as CSRF_COOKIE
from lilota.dashboard.security import CSRF_HEADER as CSRF_HEADER
from lilota.dashboard.security import LOOPBACK_HOSTS as LOOPBACK_HOSTS
from lilota.dashboard.views import JSON as JSON
from lilota.dashboard.views import PREVIEW_CHARS as PREVIEW_CHARS
from lilota.dashboard.views import task_detail as task_detail
from lilota.dashboard.views import task_summary as task_summary
from lilota.settings import DEFAULT_DB_URL as DEFAULT_DB_URL
from lilota.settings import ENV_DB_URL

__all__ = ["ENV_DB_URL", "ENV_TOKEN", "create_app", "serve"]
