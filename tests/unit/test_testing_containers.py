"""The container source of lilota.testing (lilota.pgcontainer): which source is chosen, the
image, the host network on loopback, and clean-up after a normal end, a kill, and a sweep.

Tests that need a Docker engine skip without one, unless LILOTA_TEST_REQUIRE_DOCKER is set
(scripts/test.sh sets it when it has Docker running): then they fail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lilota import pgcluster, pgcontainer
from lilota.pgcluster import PostgresProvider
from lilota.pgcontainer import (
    CONTAINER_IMAGE,
    LOCAL_IMAGE,
    OWNER_LABEL,
    ContainerUnavailable,
    choose_image,
    docker_client,
    sweep_stale,
)
from tests.unit import test_testing_plugin
from tests.unit.test_testing_plugin import Inner

pytest_plugins = test_testing_plugin.pytest_plugins

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Inner:
    return Inner(pytester, monkeypatch)


@pytest.fixture(scope="module")
def docker() -> Iterator[Any]:
    """A client of the Docker engine, or a skip (a failure with LILOTA_TEST_REQUIRE_DOCKER)."""
    try:
        client = docker_client()
    except ContainerUnavailable as exc:
        if os.environ.get("LILOTA_TEST_REQUIRE_DOCKER"):
            pytest.fail(f"LILOTA_TEST_REQUIRE_DOCKER is set, but {exc}", pytrace=False)
        pytest.skip(str(exc))
    yield client
    client.close()


def _ours(client: Any) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": OWNER_LABEL}))


def _wait_until_gone(client: Any, container_id: str, timeout: float = 60) -> bool:
    import docker as sdk  # type: ignore[import-untyped]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.containers.get(container_id)
        except sdk.errors.NotFound:
            return True
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------------------------
# The order of the sources, and the image (no Docker needed)
# --------------------------------------------------------------------------------------------


def test_the_container_is_tried_first_when_no_url_is_set_and_local_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("LILOTA_TEST_POSTGRES_URL", *(v for v in os.environ if "DISABLE" in v)):
        monkeypatch.delenv(name, raising=False)
    tried: list[str] = []

    def container(setup: object) -> PostgresProvider:
        tried.append("container")
        raise pgcluster._SourceUnavailable("no Docker engine (test)")

    def local(setup: object) -> PostgresProvider:
        tried.append("local")
        return PostgresProvider("postgresql://u@127.0.0.1:1/postgres", "local")

    monkeypatch.setattr(pgcluster, "_from_container", container)
    monkeypatch.setattr(pgcluster, "_from_local", local)
    provider = pgcluster.find_postgres()
    provider._closed = True  # nothing to drop or stop
    assert tried == ["container", "local"]
    assert provider.kind == "local"


class _Images:
    def __init__(self, loaded: set[str]) -> None:
        self.loaded = loaded

    def get(self, name: str) -> object:
        import docker as sdk

        if name not in self.loaded:
            raise sdk.errors.ImageNotFound(name)
        return object()


class _Client:
    def __init__(self, *loaded: str) -> None:
        self.images = _Images(set(loaded))


@pytest.mark.parametrize(
    ("explicit", "loaded", "expected"),
    [
        ("my/pg:15", (CONTAINER_IMAGE, LOCAL_IMAGE), "my/pg:15"),
        ("", (CONTAINER_IMAGE, LOCAL_IMAGE), CONTAINER_IMAGE),
        ("", (LOCAL_IMAGE,), LOCAL_IMAGE),
        ("", (), CONTAINER_IMAGE),  # to be pulled
    ],
)
def test_image_is_the_explicit_one_else_the_official_else_the_local_build(
    monkeypatch: pytest.MonkeyPatch, explicit: str, loaded: tuple[str, ...], expected: str
) -> None:
    monkeypatch.setenv("LILOTA_TEST_POSTGRES_IMAGE", explicit)
    assert choose_image(_Client(*loaded)) == expected


def test_local_image_is_the_default_of_the_image_script() -> None:
    script = (REPO / "scripts" / "postgres-image.sh").read_text()
    values = dict(re.findall(r"^(\w+)=\$\{LILOTA_\w+:-([^}]+)\}$", script, re.MULTILINE))
    recipe = re.search(r"^RECIPE=(\d+)$", script, re.MULTILINE)
    assert recipe is not None
    tag = f"lilota-postgres:{values['PG_MAJOR']}-{values['SUITE']}-r{recipe.group(1)}"
    assert tag == LOCAL_IMAGE


def test_owner_of_a_container_is_gone_only_when_its_process_has_ended() -> None:
    assert not pgcontainer._owner_is_gone(pgcontainer._owner_token())
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    token = pgcontainer._owner_token(ended.pid)
    ended.wait()
    assert pgcontainer._owner_is_gone(token)
    host, pid, started = pgcontainer._owner_token().split(":")
    assert not pgcontainer._owner_is_gone(f"another-{host}:{pid}:{started}")  # can't tell
    if started:  # Linux: the same pid with another start time is another process
        assert pgcontainer._owner_is_gone(f"{host}:{pid}:{int(started) + 1}")


# --------------------------------------------------------------------------------------------
# With a Docker engine
# --------------------------------------------------------------------------------------------

_CONTAINER_SESSION = """
    import os
    import psycopg
    import docker
    from testcontainers.core.config import testcontainers_config

    def test_server_in_a_container(lilota_postgres, lilota_postgres_url):
        assert lilota_postgres.kind == "container" and not lilota_postgres.can_control
        server = lilota_postgres._container
        with open("container.txt", "w") as out:
            out.write(server.container_id + " " + server.image)
        client = docker.from_env()
        attrs = client.containers.get(server.container_id).attrs
        ryuk_loaded = bool(client.images.list(testcontainers_config.ryuk_image))
        client.close()
        assert attrs["HostConfig"]["NetworkMode"] == "host"
        assert attrs["Config"]["Labels"]["org.lilota.testing.owner"].split(":")[1] == str(
            os.getpid()
        )
        assert "127.0.0.1:" in lilota_postgres.url
        url = lilota_postgres_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url) as conn:
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
        if "TESTCONTAINERS_RYUK_DISABLED" not in os.environ:
            assert testcontainers_config.ryuk_disabled is not ryuk_loaded
"""


def test_container_is_chosen_when_docker_answers_and_no_url_is_set_and_removed_at_the_end(
    inner: Inner, docker: Any
) -> None:
    # No URL, local binaries not switched off: Docker answers, so the container is used.
    inner.pytester.makepyfile(_CONTAINER_SESSION)
    result = inner.run("-v", "-o", "log_cli=true", "--log-cli-level=INFO")
    result.assert_outcomes(passed=1)
    container_id, image = inner.read_lines("container.txt")
    result.stdout.fnmatch_lines(
        [
            f"*started a PostgreSQL container from {image} (host network) on 127.0.0.1:*",
            "*using PostgreSQL from docker (LILOTA_TEST_POSTGRES_URL is not set)*",
            f"lilota.testing: PostgreSQL from a container of {image} (127.0.0.1:*)",
        ]
    )
    # close() removed it before the session ended: no waiting needed.
    assert container_id not in {c.id for c in _ours(docker)}


def test_container_of_a_killed_session_is_removed_by_its_watchdog(
    inner: Inner, docker: Any
) -> None:
    inner.env(LILOTA_TEST_POSTGRES_DISABLE_LOCAL="1")
    inner.pytester.makepyfile(
        """
        import os, signal

        def test_killed(lilota_postgres, lilota_postgres_url):
            with open("container.txt", "w") as out:
                out.write(lilota_postgres._container.container_id)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = inner.run()
    assert result.ret == -signal.SIGKILL
    (container_id,) = inner.read_lines("container.txt")
    assert _wait_until_gone(docker, container_id), "the killed session's container is still there"


def test_stale_containers_of_dead_processes_are_swept_and_live_ones_kept(
    docker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TESTCONTAINERS_RYUK_DISABLED", raising=False)
    image = choose_image(docker)
    try:
        docker.images.get(image)
    except Exception:
        pytest.skip(f"{image} is not loaded (scripts/test.sh loads or makes one)")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner = pgcontainer._owner_token(ended.pid)
    ended.wait()
    # Created, never started: a container that a killed session (and its watchdog) left.
    stale = docker.containers.create(image, labels={OWNER_LABEL: dead_owner}, command=["true"])
    live = docker.containers.create(
        image, labels={OWNER_LABEL: pgcontainer._owner_token()}, command=["true"]
    )
    try:
        assert stale.short_id in sweep_stale(docker)
        remaining = {c.id for c in _ours(docker)}
        assert live.id in remaining and stale.id not in remaining
    finally:
        live.remove(force=True)
        if stale.id in {c.id for c in _ours(docker)}:
            stale.remove(force=True)


def test_find_postgres_sweeps_before_it_starts_a_container(
    inner: Inner, docker: Any, tmp_path: Path
) -> None:
    image = choose_image(docker)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner = pgcontainer._owner_token(ended.pid)
    ended.wait()
    stale = docker.containers.create(image, labels={OWNER_LABEL: dead_owner}, command=["true"])
    inner.env(LILOTA_TEST_POSTGRES_DISABLE_LOCAL="1")
    inner.pytester.makepyfile(
        textwrap.dedent(
            """
            def test_uses_a_container(lilota_postgres):
                assert lilota_postgres.kind == "container"
            """
        )
    )
    result = inner.run("-o", "log_cli=true", "--log-cli-level=INFO")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*removed 1 stale test container(s): {stale.short_id}*"])
    assert stale.id not in {c.id for c in _ours(docker)}
