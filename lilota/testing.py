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
2. Docker, when the engine answers a ping within 2 s (``pip install lilota[testing]`` for
   testcontainers and the docker SDK): a container on the host network whose server listens
   on 127.0.0.1 only, on a free port, so test traffic stays on loopback. The image is
   ``LILOTA_TEST_POSTGRES_IMAGE`` if set, else ``postgres:16-alpine`` if loaded, else
   ``lilota-postgres:15-bookworm-r2`` if loaded (made without a registry by
   ``scripts/postgres-image.sh`` of lilota's source, for air-gapped machines), else
   ``postgres:16-alpine`` pulled. Containers carry the label ``org.lilota.testing.owner``;
   each is removed at the end of the session, by a watchdog process if the session was
   killed, and containers of dead sessions are swept away when the next one starts.
   testcontainers' reaper (ryuk) is switched off unless its image is loaded (it cannot be
   pulled on such machines; ``TESTCONTAINERS_RYUK_DISABLED`` decides if set). Tests that
   stop the server (``lilota_postgres.stop()``) skip on this kind.
3. The PostgreSQL server binaries on this machine (``initdb``/``pg_ctl`` from ``PATH``,
   ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin`` newest first, or
   ``LILOTA_TEST_POSTGRES_BINDIR``): a throwaway cluster in a temp dir on a free port of
   127.0.0.1 with durability switched off, stopped and removed at the end of the session
   (``atexit`` too). As root, the binaries run as the system user ``lilota-test`` (created
   if missing) or ``nobody``.
4. Otherwise PostgreSQL tests are skipped, saying how to enable them; when the ``CI``
   environment variable is set (non-empty, not ``0``/``false``) they fail instead.

The logger ``lilota.testing`` says which source was chosen and why the earlier ones were
not, and the end of the run names the server used ("lilota.testing: PostgreSQL from ...").
``LILOTA_TEST_POSTGRES_DISABLE_DOCKER=1`` and ``LILOTA_TEST_POSTGRES_DISABLE_LOCAL=1`` skip
steps 2 and 3 (for testing this plugin, or to force a source).


Modules
-------
This module is the plugin: options, hooks, fixtures and :func:`wait_for`. The server and
the databases come from :mod:`lilota.pgcluster` (with :mod:`lilota.pglocal` for the local
cluster and :mod:`lilota.pgcontainer` for the container); the inline mode lives in :mod:`lilota.inline`. Everything public of those is
importable from here as well.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lilota.inline import DEFAULT_MAX_RUNS, eager, run_pending
from lilota.pgcluster import (
    CONTAINER_IMAGE as CONTAINER_IMAGE,
)
from lilota.pgcluster import (
    ENV_CI,
    ENV_DISABLE_DOCKER,
    ENV_DISABLE_LOCAL,
    ENV_POSTGRES_BINDIR,
    ENV_POSTGRES_IMAGE,
    ENV_POSTGRES_URL,
    LocalPostgresCluster,
    PostgresProvider,
    PostgresUnavailable,
    find_postgres,
    find_postgres_bindir,
    normalize_postgres_url,
)
from lilota.pgcluster import (
    HOW_TO_ENABLE as HOW_TO_ENABLE,
)
from lilota.pgcluster import (
    UNPRIVILEGED_USER as UNPRIVILEGED_USER,
)
from lilota.pgcluster import (
    Kind as Kind,
)
from lilota.pgcluster import (
    TemplateSetup as TemplateSetup,
)
from lilota.pgcluster import (
    missing_server_is_failure as missing_server_is_failure,
)
from lilota.pgcluster import (
    running_in_ci as running_in_ci,
)

if TYPE_CHECKING:
    from lilota.core import Lilota
    from lilota.models import Task

__all__ = [
    "DEFAULT_APP_WORKERS",
    "DEFAULT_MAX_RUNS",
    "DEFAULT_STOP_TIMEOUT",
    "ENV_CI",
    "ENV_DISABLE_DOCKER",
    "ENV_DISABLE_LOCAL",
    "ENV_POSTGRES_BINDIR",
    "ENV_POSTGRES_IMAGE",
    "ENV_POSTGRES_URL",
    "LocalPostgresCluster",
    "PostgresProvider",
    "PostgresUnavailable",
    "eager",
    "find_postgres",
    "find_postgres_bindir",
    "normalize_postgres_url",
    "run_pending",
    "wait_for",
]

logger = logging.getLogger("lilota.testing")

BACKENDS = ("sqlite", "postgres")
#: Seconds the app fixtures give ``Lilota.stop()`` at teardown; then workers are killed.
DEFAULT_STOP_TIMEOUT = 30.0
#: After a failed test, the app fixtures cancel the unfinished tasks each app scheduled and
#: give ``stop()`` at most this many seconds: the failure is reported without waiting for
#: tasks nobody needs any more (a task that ignores cancellation is then killed).
FAILED_TEST_STOP_TIMEOUT = 2.0
#: Worker processes of ``lilota_app`` unless ``lilota_app_options`` says otherwise.
DEFAULT_APP_WORKERS = 2

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


# Where this session's PostgreSQL came from (PostgresProvider.description), for the summary.
_POSTGRES_USED = pytest.StashKey[list[str]]()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    used = config.stash.get(_POSTGRES_USED, [])
    if used:
        terminalreporter.write_line(f"lilota.testing: PostgreSQL from {'; '.join(used)}")


@pytest.fixture(scope="session")
def lilota_postgres(
    lilota_template_setup: TemplateSetup | None, request: pytest.FixtureRequest
) -> Iterator[PostgresProvider]:
    """The session's PostgreSQL server (skips, or fails under CI, if there is none)."""
    try:
        provider = find_postgres(lilota_template_setup)
    except PostgresUnavailable as exc:
        if missing_server_is_failure():
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    request.config.stash.setdefault(_POSTGRES_USED, []).append(provider.description)
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


# --------------------------------------------------------------------------------------------
# Apps and waiting
# --------------------------------------------------------------------------------------------
# ``lilota_app`` runs your tasks in real worker processes on the test database, as in
# production; ``wait_for`` waits for one task and fails the test with what the task was doing.
# ``lilota_inline`` gives a Lilota without worker processes for the inline mode
# (``run_pending``, ``eager``: see ``lilota.inline``).


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
# App fixtures
# --------------------------------------------------------------------------------------------


# Each test's reports (setup, call), so that fixture teardowns know whether it failed.
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test (its setup or its call) has failed, as its teardown begins."""
    return any(r.failed for r in request.node.stash.get(_REPORTS, {}).values())


def _cancel_unfinished(lilota: Lilota) -> None:
    """Cancel the pending and running tasks ``lilota`` scheduled (best effort)."""
    from lilota.errors import LilotaError

    try:
        # The instance's own record of what it scheduled (what stop() would wait for).
        unfinished = lilota.store.unfinished(set(lilota._scheduled))
    except LilotaError as error:
        logger.warning("cannot cancel the tasks of %r at teardown: %s", lilota, error)
        return
    for task_id in sorted(unfinished):
        with contextlib.suppress(LilotaError):  # it ended meanwhile
            lilota.cancel(task_id)


def _stop_all(instances: Sequence[tuple[Lilota, float]], *, failed: bool = False) -> None:
    """Stop every instance (last made first), each within its timeout; then close their
    database connections. Raises the first error after trying all of them. After a
    ``failed`` test, their unfinished tasks are cancelled first and the timeout is short."""
    errors: list[BaseException] = []
    for lilota, timeout in reversed(instances):
        try:
            if failed:
                _cancel_unfinished(lilota)
                timeout = min(timeout, FAILED_TEST_STOP_TIMEOUT)
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
    lilota_db_url: str, lilota_app_options: dict[str, Any], request: pytest.FixtureRequest
) -> Iterator[Callable[..., Lilota]]:
    """``make(**overrides) -> Lilota``: a started ``Lilota`` made from ``lilota_app_options``
    updated with ``overrides`` (e.g. ``make(number_of_workers=4)`` or ``make(start=False)``);
    every instance it made is stopped at teardown, within its ``stop_timeout``. After a
    failed test, the unfinished tasks it scheduled are cancelled first, and ``stop()`` gets
    at most ``FAILED_TEST_STOP_TIMEOUT`` (2 s)."""
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
        _stop_all(made, failed=_test_failed(request))


@pytest.fixture
def lilota_app(lilota_app_factory: Callable[..., Lilota]) -> Lilota:
    """A started ``Lilota`` on ``lilota_db_url`` running your tasks (``lilota_app_options``)
    in worker processes; stopped at teardown (``stop_timeout``, default 30 s, then the
    workers are killed). After a failed test, its unfinished tasks are cancelled and
    ``stop()`` gets 2 s: the failure is not held up by the tasks it scheduled."""
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
