"""Tests of the pytest plugin ``lilota.testing``.

Most tests run an inner pytest session in a subprocess (``pytester``), so they see what a
user of the plugin sees: options, parametrisation, skips, and real databases.
The PostgreSQL server for the inner sessions comes from this session's own
``lilota_postgres`` fixture (handed over as ``LILOTA_TEST_POSTGRES_URL``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from importlib.metadata import entry_points
from pathlib import Path

import psycopg
import pytest

from lilota import Lilota
from lilota.testing import (
    HOW_TO_ENABLE,
    PostgresProvider,
    find_postgres_bindir,
    normalize_postgres_url,
    running_in_ci,
)


def _plugin_is_autoloaded() -> bool:
    """Whether pytest loads lilota.testing by itself (installed lilota, autoload not off)."""
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(
        ep.name == "lilota" and ep.value == "lilota.testing"
        for ep in entry_points(group="pytest11")
    )


# Loading the plugin a second time under another name is an error, so name it only when
# pytest does not load it anyway (it is fine to also pass "-p lilota.testing" then).
pytest_plugins = ["pytester"] if _plugin_is_autoloaded() else ["pytester", "lilota.testing"]

REPO = Path(__file__).resolve().parents[2]
SYSTEM_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
_ENV_TO_CLEAR = (
    "LILOTA_TEST_POSTGRES_URL",
    "LILOTA_TEST_POSTGRES_DISABLE_DOCKER",
    "LILOTA_TEST_POSTGRES_DISABLE_LOCAL",
    "LILOTA_TEST_POSTGRES_BINDIR",
    "CI",
    "PYTEST_XDIST_WORKER",
    "PYTEST_XDIST_WORKER_COUNT",
    "PYTEST_ADDOPTS",
)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _database_exists(url: str) -> bool:
    try:
        psycopg.connect(_libpq(url), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        if "does not exist" in str(exc):
            return False
        raise
    return True


def _plugin_args() -> list[str]:
    # "-p lilota.testing" on top of the installed entry point would load the module twice.
    return [] if _plugin_is_autoloaded() else ["-p", "lilota.testing"]


class Inner:
    """Runs an inner pytest session in a subprocess with a clean lilota environment."""

    def __init__(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pytester = pytester
        self.monkeypatch = monkeypatch
        for name in _ENV_TO_CLEAR:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("PYTHONPATH", str(REPO))

    def env(self, **values: str) -> Inner:
        for name, value in values.items():
            self.monkeypatch.setenv(name, value)
        return self

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(
            *_plugin_args(),
            "-p",
            "no:cacheprovider",
            "--strict-markers",
            "-W",
            "error",
            *args,
            timeout=120,
        )

    def read_lines(self, name: str) -> list[str]:
        return (self.pytester.path / name).read_text().split()


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Inner:
    return Inner(pytester, monkeypatch)


@pytest.fixture
def admin_url(lilota_postgres: PostgresProvider) -> str:
    """An admin URL the inner sessions may use (this session's own server)."""
    return lilota_postgres.url


# --------------------------------------------------------------------------------------------
# In-process checks of the small helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h:5/db", "postgresql+psycopg://u@h:5/db"),
        (
            "postgres://u:p%40w@h/db?sslmode=disable",
            "postgresql+psycopg://u:p%40w@h/db?sslmode=disable",
        ),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg://u@h/db"),
    ],
)
def test_normalize_postgres_url(given: str, expected: str) -> None:
    assert normalize_postgres_url(given) == expected


def test_normalize_postgres_url_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        normalize_postgres_url("mysql://u@h/db")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("", False),
        ("0", False),
        ("false", False),
        ("FALSE", False),
        ("true", True),
        ("1", True),
        ("yes", True),
    ],
)
def test_running_in_ci(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert running_in_ci() is expected


def test_find_postgres_bindir_finds_server_binaries() -> None:
    bindir = find_postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries on this machine")
    assert (bindir / "initdb").exists() and (bindir / "pg_ctl").exists()


# --------------------------------------------------------------------------------------------
# lilota_db_url and the backend options
# --------------------------------------------------------------------------------------------


def test_db_url_is_a_fresh_sqlite_file_per_test(inner: Inner) -> None:
    inner.pytester.makepyfile(
        """
        import sqlalchemy as sa

        def check(url, tmp_path):
            assert url == f"sqlite:///{tmp_path / 'lilota.db'}"
            engine = sa.create_engine(url)
            with engine.begin() as conn:
                assert sa.inspect(conn).get_table_names() == []
                conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
            engine.dispose()
            with open("urls.txt", "a") as out:
                out.write(url + "\\n")

        def test_a(lilota_db_url, tmp_path):
            check(lilota_db_url, tmp_path)

        def test_b(lilota_db_url, tmp_path):
            check(lilota_db_url, tmp_path)

        def test_sqlite_url(lilota_sqlite_url, tmp_path):
            assert lilota_sqlite_url == f"sqlite:///{tmp_path / 'lilota.db'}"
        """
    )
    result = inner.run("-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*lilota backends: sqlite*",
            "*::test_a[[]sqlite[]] PASSED*",
            "*::test_b[[]sqlite[]] PASSED*",
        ]
    )
    urls = inner.read_lines("urls.txt")
    assert len(set(urls)) == 2


def test_backend_option_runs_a_test_on_sqlite_and_postgres(inner: Inner, admin_url: str) -> None:
    inner.env(LILOTA_TEST_POSTGRES_URL=admin_url)
    inner.pytester.makepyfile(
        """
        import psycopg
        import sqlalchemy as sa

        LEFT_OPEN = []

        def test_db(lilota_db_url, request):
            backend = request.node.callspec.id
            scheme = {"sqlite": "sqlite:///", "postgres": "postgresql+psycopg://"}[backend]
            assert lilota_db_url.startswith(scheme)
            assert (request.node.get_closest_marker("postgres") is not None) == (
                backend == "postgres"
            )
            engine = sa.create_engine(lilota_db_url)
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
            engine.dispose()
            if backend == "postgres":
                # A connection left open (as by a killed worker) must not block the drop.
                libpq = lilota_db_url.replace("postgresql+psycopg://", "postgresql://")
                LEFT_OPEN.append(psycopg.connect(libpq))
            with open(f"{backend}.txt", "w") as out:
                out.write(lilota_db_url)
        """
    )
    result = inner.run("-v", "--lilota-backend=sqlite,postgres")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*::test_db[[]sqlite[]] PASSED*", "*::test_db[[]postgres[]] PASSED*"]
    )
    postgres_url = inner.read_lines("postgres.txt")[0]
    assert postgres_url.startswith("postgresql+psycopg://")
    assert not _database_exists(postgres_url), "the test's database was not dropped"

    # The ini option does the same; the postgres parameter carries the "postgres" marker.
    inner.pytester.makeini("[pytest]\nlilota_backends = sqlite, postgres\n")
    result = inner.run("-v", "-m", "not postgres")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*::test_db[[]sqlite[]] PASSED*"])


def test_unknown_backend_is_a_usage_error(inner: Inner) -> None:
    inner.pytester.makepyfile("def test_x(lilota_db_url):\n    pass\n")
    result = inner.run("--lilota-backend=sqlite,mysql")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown lilota backend 'mysql'*"])


# --------------------------------------------------------------------------------------------
# Per-test PostgreSQL databases
# --------------------------------------------------------------------------------------------

_ISOLATION_TESTS = """
    import psycopg
    import pytest

    def libpq(url):
        return url.replace("postgresql+psycopg://", "postgresql://")

    def record(url):
        with open("urls.txt", "a") as out:
            out.write(url + "\\n")

    @pytest.mark.parametrize("n", range({count}))
    def test_own_database(lilota_postgres_url, request, n):
        assert request.node.get_closest_marker("postgres") is not None
        record(lilota_postgres_url)
        with psycopg.connect(libpq(lilota_postgres_url), autocommit=True) as conn:
            # From the template (lilota_template_setup in conftest.py):
            assert conn.execute("SELECT n FROM from_template").fetchone() == (42,)
            # Nothing from any other test:
            assert conn.execute("SELECT to_regclass('made_by_a_test')").fetchone() == (None,)
            conn.execute("CREATE TABLE made_by_a_test (x int)")

    @pytest.mark.lilota_backends("sqlite", "postgres")
    def test_marker_chooses_backends(lilota_db_url):
        record(lilota_db_url)
"""

_TEMPLATE_CONFTEST = """
    import psycopg
    import pytest

    @pytest.fixture(scope="session")
    def lilota_template_setup():
        def setup(url):
            libpq = url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(libpq, autocommit=True) as conn:
                conn.execute("CREATE TABLE from_template (n int)")
                conn.execute("INSERT INTO from_template VALUES (42)")
        return setup
"""


def test_each_test_gets_its_own_postgres_database(inner: Inner, admin_url: str) -> None:
    inner.env(LILOTA_TEST_POSTGRES_URL=admin_url)
    inner.pytester.makeconftest(_TEMPLATE_CONFTEST)
    inner.pytester.makepyfile(_ISOLATION_TESTS.format(count=3))
    result = inner.run("-v")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        [
            "*test_marker_chooses_backends[[]sqlite[]] PASSED*",
            "*test_marker_chooses_backends[[]postgres[]] PASSED*",
        ]
    )
    urls = inner.read_lines("urls.txt")
    postgres_urls = [u for u in urls if u.startswith("postgresql+psycopg://")]
    assert len(postgres_urls) == len(set(postgres_urls)) == 4
    assert all("_main_" in u for u in postgres_urls)  # the xdist worker id ("main" without)
    assert not any(_database_exists(u) for u in postgres_urls)


def test_database_names_do_not_collide_under_xdist(inner: Inner, admin_url: str) -> None:
    inner.env(LILOTA_TEST_POSTGRES_URL=admin_url)
    inner.pytester.makeconftest(_TEMPLATE_CONFTEST)
    inner.pytester.makepyfile(_ISOLATION_TESTS.format(count=6))
    result = inner.run("-n", "2", "-p", "xdist")
    result.assert_outcomes(passed=8)
    postgres_urls = [u for u in inner.read_lines("urls.txt") if u.startswith("postgresql")]
    assert len(set(postgres_urls)) == 7
    assert all("_gw" in u for u in postgres_urls)
    assert not any(_database_exists(u) for u in postgres_urls)


# --------------------------------------------------------------------------------------------
# Where the server comes from
# --------------------------------------------------------------------------------------------

_NEEDS_POSTGRES = """
    def test_sqlite_or_postgres(lilota_db_url):
        pass
"""


def test_no_server_skips_with_a_reason_or_fails_under_ci(inner: Inner) -> None:
    inner.env(LILOTA_TEST_POSTGRES_DISABLE_DOCKER="1", LILOTA_TEST_POSTGRES_DISABLE_LOCAL="1")
    inner.pytester.makepyfile(_NEEDS_POSTGRES)
    inner.env(CI="0")
    result = inner.run("-rs", "--lilota-backend=sqlite,postgres")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([f"SKIPPED*{HOW_TO_ENABLE}*disabled by*"])

    inner.env(CI="true")
    result = inner.run("--lilota-backend=sqlite,postgres")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*{HOW_TO_ENABLE}*"])


def test_broken_explicit_url_fails_even_outside_ci(inner: Inner) -> None:
    inner.env(LILOTA_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:1/postgres")
    inner.pytester.makepyfile(_NEEDS_POSTGRES)
    result = inner.run("--lilota-backend=postgres")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*LILOTA_TEST_POSTGRES_URL is set, but the server*"])


@pytest.fixture
def system_postgres() -> str:
    """The machine's own server on 127.0.0.1:5432 (started if it is down)."""

    def answers() -> bool:
        try:
            psycopg.connect(SYSTEM_POSTGRES, connect_timeout=3).close()
        except psycopg.OperationalError:
            return False
        return True

    if not answers():
        versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
        for version in versions:
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        if not answers():
            pytest.skip(f"no PostgreSQL server answers at {SYSTEM_POSTGRES}")
    return SYSTEM_POSTGRES


def test_url_from_environment_is_used(inner: Inner, system_postgres: str) -> None:
    inner.env(LILOTA_TEST_POSTGRES_URL=system_postgres)
    inner.pytester.makepyfile(
        """
        def test_env(lilota_postgres, lilota_postgres_url):
            assert lilota_postgres.kind == "env"
            assert lilota_postgres.url == "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
            assert lilota_postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:5432/lilota_")
            assert not lilota_postgres.can_control
            with open("template.txt", "w") as out:
                base = lilota_postgres.url.rsplit("/", 1)[0]
                out.write(base + "/" + lilota_postgres.template_name)

        def test_restart_needs_a_local_cluster(lilota_postgres):
            lilota_postgres.restart()
        """
    )
    result = inner.run("-rs", "-o", "log_cli=true", "--log-cli-level=INFO")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*using the PostgreSQL server from LILOTA_TEST_POSTGRES_URL*",
            "SKIPPED*restart() needs the throwaway local cluster*",
        ]
    )
    template_url = inner.read_lines("template.txt")[0]
    assert not _database_exists(template_url), "the template database was left behind"


_LOCAL_CLUSTER_TESTS = """
    import json
    import os

    import psycopg
    import pytest

    def libpq(url):
        return url.replace("postgresql+psycopg://", "postgresql://")

    def test_stop_start_restart(lilota_postgres, lilota_postgres_url):
        assert lilota_postgres.kind == "local" and lilota_postgres.can_control
        cluster = lilota_postgres.cluster
        if os.geteuid() == 0:
            assert os.stat(cluster.data_dir).st_uid != 0, "the server must not run as root"
        with open("cluster.json", "w") as out:
            json.dump({"dir": str(cluster.base_dir), "url": lilota_postgres.url}, out)
        url = libpq(lilota_postgres_url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (1)")
        held = psycopg.connect(url, autocommit=True)

        lilota_postgres.stop()
        assert not lilota_postgres.is_running()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        lilota_postgres.start()
        assert lilota_postgres.is_running()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT x FROM kept").fetchone() == (1,)

        lilota_postgres.restart(mode="immediate")
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
        held.close()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

    def test_forked_child_does_not_tear_down(lilota_postgres, lilota_postgres_url):
        pid = os.fork()
        if pid == 0:  # like a worker process that exits through its atexit handlers
            lilota_postgres.close()
            lilota_postgres.cluster.cleanup()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert lilota_postgres.is_running()
        with psycopg.connect(libpq(lilota_postgres_url)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

    def test_leaves_the_server_stopped(lilota_postgres, lilota_postgres_url):
        lilota_postgres.stop(mode="immediate")

    def test_next_test_still_gets_a_database(lilota_postgres_url):
        with psycopg.connect(libpq(lilota_postgres_url)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
"""


def test_local_cluster_stop_start_restart_and_cleanup(inner: Inner) -> None:
    if find_postgres_bindir() is None:
        pytest.skip("no PostgreSQL server binaries on this machine")
    inner.env(LILOTA_TEST_POSTGRES_DISABLE_DOCKER="1")
    inner.pytester.makepyfile(_LOCAL_CLUSTER_TESTS)
    result = inner.run("-v", "-o", "log_cli=true", "--log-cli-level=INFO")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "*started a throwaway PostgreSQL cluster*",
            "*using PostgreSQL from local binaries (*docker: disabled by*",
        ]
    )
    info = json.loads((inner.pytester.path / "cluster.json").read_text())
    assert not Path(info["dir"]).exists(), "the cluster's directory was not removed"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_libpq(info["url"]), connect_timeout=2)


def test_local_cluster_is_removed_after_ctrl_c(inner: Inner) -> None:
    if find_postgres_bindir() is None:
        pytest.skip("no PostgreSQL server binaries on this machine")
    inner.env(LILOTA_TEST_POSTGRES_DISABLE_DOCKER="1")
    inner.pytester.makepyfile(
        """
        def test_interrupted(lilota_postgres, lilota_postgres_url):
            with open("cluster.txt", "w") as out:
                out.write(str(lilota_postgres.cluster.base_dir) + " " + lilota_postgres.url)
            raise KeyboardInterrupt
        """
    )
    result = inner.run()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    base_dir, url = inner.read_lines("cluster.txt")
    assert not Path(base_dir).exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_libpq(url), connect_timeout=2)


def test_module_imports_no_heavy_dependencies() -> None:
    # Whatever the lilota package itself imports, the plugin adds no Docker or driver imports.
    code = textwrap.dedent(
        """
        import sys
        import lilota
        before = set(sys.modules)
        import lilota.testing
        heavy = ("testcontainers", "docker", "psycopg", "sqlalchemy")
        added = [m for m in set(sys.modules) - before if m.split(".")[0] in heavy]
        assert not added, added
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# lilota_app teardown
# --------------------------------------------------------------------------------------------


def test_lilota_app_teardown_after_a_failed_test_cancels_its_tasks_and_stops_soon(
    inner: Inner,
) -> None:
    # A failing test that scheduled a 60 s task: the teardown does not wait for it (the
    # default stop timeout is 30 s), it cancels it and stops within a short grace.
    inner.env(PYTHONPATH=os.pathsep.join([str(REPO), str(inner.pytester.path)]))
    inner.pytester.makepyfile(
        sleepy_app="""
        import time
        from lilota import Lilota

        app = Lilota(number_of_workers=0)

        @app.register("sleepy")
        def sleepy() -> None:
            time.sleep(60)
        """,
        conftest="""
        import pytest
        import sleepy_app

        @pytest.fixture
        def lilota_app_options():
            return {"registry": sleepy_app.app.registry, "number_of_workers": 1}
        """,
        test_fails="""
        import time

        def test_fails(lilota_app, lilota_db_url):
            task_id = lilota_app.schedule("sleepy")
            while lilota_app.get_task_by_id(task_id).status.value != "running":
                time.sleep(0.05)
            with open("task.txt", "w") as out:
                out.write(f"{lilota_db_url} {task_id}")
            assert False, "the test fails while its task runs"
        """,
    )
    began = time.monotonic()
    result = inner.run()
    elapsed = time.monotonic() - began

    result.assert_outcomes(failed=1)
    db_url, task_id = inner.read_lines("task.txt")
    with Lilota(db_url, number_of_workers=0) as reader:
        task = reader.get_task_by_id(int(task_id))
    assert task is not None and task.cancel_requested
    assert elapsed < 20, f"the teardown waited for the task ({elapsed:.1f} s)"
