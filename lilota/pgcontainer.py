"""A throwaway PostgreSQL server in a Docker container, for tests.

The container source of :func:`lilota.pgcluster.find_postgres` (documented in
:mod:`lilota.testing`, "Finding a PostgreSQL server"):

- :func:`docker_client` answers only when a Docker engine answers a ping.
- :func:`choose_image`: ``LILOTA_TEST_POSTGRES_IMAGE`` if set, else the official image when
  it is loaded, else the image made by ``scripts/postgres-image.sh`` (:data:`LOCAL_IMAGE`)
  when it is loaded, else the official image, pulled.
- :class:`ContainerServer` runs it through testcontainers on the host network, the server
  listening on 127.0.0.1 only, on a free port: test traffic never leaves loopback and never
  goes to a container's bridge address.
- Clean-up: every container carries :data:`OWNER_LABEL` (host, pid and start time of the
  process that made it). ``stop()`` removes it; a watchdog process removes it when the test
  process dies without stopping it (SIGKILL); :func:`sweep_stale` removes those of dead
  processes of this host that were left anyway (a watchdog killed too), at every start.

The docker SDK and testcontainers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CONTAINER_IMAGE",
    "ENV_POSTGRES_IMAGE",
    "LOCAL_IMAGE",
    "OWNER_LABEL",
    "ContainerServer",
    "ContainerUnavailable",
    "choose_image",
    "docker_client",
    "sweep_stale",
]

logger = logging.getLogger("lilota.testing")

ENV_POSTGRES_IMAGE = "LILOTA_TEST_POSTGRES_IMAGE"
#: The official image, used where it is loaded or can be pulled.
CONTAINER_IMAGE = "postgres:16-alpine"
#: The default name of the image ``scripts/postgres-image.sh`` makes without a registry
#: (Debian's postgresql-15 with an entrypoint like the official one); keep it in step with
#: the script's IMAGE.
LOCAL_IMAGE = "lilota-postgres:15-bookworm-r2"
#: Label of every container this module starts; its value is :func:`_owner_token`.
OWNER_LABEL = "org.lilota.testing.owner"
# The server answers within a few seconds (initdb, then start); an image pulled first or a
# loaded machine takes longer. Past this the container is removed and the source given up.
READY_TIMEOUT = 120.0
# A free port is found, then given to the server in the container: another process may take
# it in between. The server then exits at once ("could not bind"), and we try another port.
PORT_ATTEMPTS = 3

USER = PASSWORD = DATABASE = "postgres"

# Runs in its own session (Ctrl-C and a kill of the test's process group spare it): waits
# until its stdin, a pipe from the test process, reaches end of file (the test process
# closed it, or died, however), then removes the container if it is still there.
_WATCHDOG = """
import sys
sys.stdin.buffer.read()
import docker
client = docker.from_env(timeout=30)
try:
    client.containers.get(sys.argv[1]).remove(force=True, v=True)
except docker.errors.NotFound:
    pass
"""


class ContainerUnavailable(Exception):
    """Docker or the container cannot give a server; the message says why (for the log)."""


def docker_client(timeout: float = 2) -> Any:
    """A docker SDK client whose engine answered a ping within ``timeout`` seconds; raises
    :class:`ContainerUnavailable` saying why not."""
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        raise ContainerUnavailable("no Docker engine (DOCKER_HOST unset, no /var/run/docker.sock)")
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        raise ContainerUnavailable(
            "the docker SDK is not installed (pip install lilota[testing])"
        ) from None
    import gc
    import warnings

    client: Any = None
    error: str | None = None
    # A failed ping leaves an unclosed socket behind: collect it here, quietly, rather than
    # have its ResourceWarning surface in some later test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=timeout)
            client.ping()
        except Exception as exc:
            error = f"no Docker engine answers ({exc})"
            if client is not None:
                client.close()
        gc.collect()
    if error is not None:
        raise ContainerUnavailable(error)
    return client


def _image_loaded(client: Any, image: str) -> bool:
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def choose_image(client: Any) -> str:
    """The image to run: ``LILOTA_TEST_POSTGRES_IMAGE``, else :data:`CONTAINER_IMAGE` if
    loaded, else :data:`LOCAL_IMAGE` if loaded, else :data:`CONTAINER_IMAGE` (pulled)."""
    explicit = os.environ.get(ENV_POSTGRES_IMAGE, "").strip()
    if explicit:
        return explicit
    for image in (CONTAINER_IMAGE, LOCAL_IMAGE):
        if _image_loaded(client, image):
            return image
    return CONTAINER_IMAGE


# --------------------------------------------------------------------------------------------
# Owners: which process made a container, and whether it still runs
# --------------------------------------------------------------------------------------------


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` (Linux: /proc/<pid>/stat, field 22), so that a
    reused pid is not taken for the process that made a container; "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def _owner_is_gone(token: str) -> bool:
    """Whether the process named by ``token`` has ended. Processes of other hosts (a shared
    engine) count as alive: we cannot tell."""
    host, _, rest = token.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    return bool(started) and _start_time(pid) not in ("", started)


def sweep_stale(client: Any) -> list[str]:
    """Remove the containers labelled :data:`OWNER_LABEL` whose owner process has ended
    (left by a test run killed with its watchdog); return their short ids."""
    removed: list[str] = []
    for container in client.containers.list(all=True, filters={"label": OWNER_LABEL}):
        token = container.labels.get(OWNER_LABEL, "")
        if not _owner_is_gone(token):
            continue
        with contextlib.suppress(Exception):  # removed meanwhile, by its watchdog say
            container.remove(force=True, v=True)
            removed.append(container.short_id)
    if removed:
        logger.info("removed %d stale test container(s): %s", len(removed), " ".join(removed))
    return removed


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def _disable_ryuk_unless_loaded(client: Any) -> None:
    """Ryuk is testcontainers' reaper: a container of its own image that removes a session's
    containers when the session's connection to it drops. Its image must be pulled, which
    an air-gapped machine cannot do (the first container would fail), and its port is
    published on Docker's bridge network, which the engine scripts/test.sh starts does not
    have. The owner label, the watchdog and the sweep do its work here, so ryuk is left on
    only when its image is already loaded and the user has not decided
    (``TESTCONTAINERS_RYUK_DISABLED``)."""
    from testcontainers.core.config import testcontainers_config as config

    if "TESTCONTAINERS_RYUK_DISABLED" in os.environ:
        return
    if not _image_loaded(client, config.ryuk_image):
        config.ryuk_disabled = True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ContainerServer:
    """A PostgreSQL container on the host network, serving 127.0.0.1:``port``.

    ``start()`` runs ``image`` with the server ``settings`` (``name=value``) and waits until
    it answers; ``url`` is its admin URL (user, password and database ``postgres``).
    ``stop()`` removes the container; if the process dies first, its watchdog does.
    """

    def __init__(self, client: Any, image: str, settings: Sequence[str] = ()) -> None:
        self.client = client
        self.image = image
        self.settings = tuple(settings)
        self.port = 0
        self.container_id = ""
        self._container: Any = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    def __repr__(self) -> str:
        return f"<ContainerServer {self.image} 127.0.0.1:{self.port} {self.container_id[:12]}>"

    def start(self) -> None:
        """Start the container and wait until the server answers; raise
        :class:`ContainerUnavailable` (the container removed) if it does not."""
        _disable_ryuk_unless_loaded(self.client)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.port = _free_port()
            self._run()
            try:
                self._wait_ready()
                return
            except ContainerUnavailable as exc:
                logs = self._logs()
                self.stop()
                if "could not bind" in logs and attempt < PORT_ATTEMPTS:
                    continue
                raise ContainerUnavailable(f"{exc}; container log: {logs[-1500:]}") from None

    def _run(self) -> None:
        from testcontainers.core.container import DockerContainer

        command = ["postgres", "-p", str(self.port), "-c", "listen_addresses=127.0.0.1"]
        for setting in self.settings:
            command += ["-c", setting]
        container = DockerContainer(self.image).with_command(command)
        container.with_envs(POSTGRES_USER=USER, POSTGRES_PASSWORD=PASSWORD, POSTGRES_DB=DATABASE)
        # network="host": the container shares the host's network, so the server's
        # 127.0.0.1 is the host's loopback; nothing is published, no bridge is involved.
        container.with_kwargs(network="host", labels={OWNER_LABEL: _owner_token()})
        try:
            container.start()
        except Exception as exc:
            with contextlib.suppress(Exception):
                container.stop()
            raise ContainerUnavailable(f"starting a {self.image} container failed: {exc}") from None
        self._container = container
        self.container_id = container.get_container_id()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, self.container_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_ready(self) -> None:
        import psycopg

        libpq = f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                psycopg.connect(libpq, connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                error = exc
            self._container.reload()
            if self._container.status not in ("created", "running"):
                raise ContainerUnavailable(f"the {self.image} container exited ({error})")
            if time.monotonic() > deadline:
                raise ContainerUnavailable(
                    f"the {self.image} container did not answer within {READY_TIMEOUT:.0f} s"
                    f" ({error})"
                )
            time.sleep(0.1)

    def _logs(self) -> str:
        try:
            stdout, stderr = self._container.get_logs()
            return str((stdout + stderr).decode(errors="replace"))
        except Exception:
            return ""

    def stop(self) -> None:
        """Remove the container (``docker rm -f``) and end its watchdog."""
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()
            self._container = None
        if self._watchdog is not None:
            watchdog, self._watchdog = self._watchdog, None
            with contextlib.suppress(Exception):
                watchdog.stdin.close()  # type: ignore[union-attr]
                watchdog.wait(timeout=30)
