"""Workers in the foreground of a shell, for ``lilota worker``.

Finding what to run (a script, or a module's ``Lilota`` instance), then running its worker
processes until a signal: the first SIGTERM/SIGINT drains (running tasks finish), a
second one stops at once (workers give their tasks back, or are killed after
:data:`FORCE_GRACE`). :mod:`lilota.cli` parses the options and calls these steps.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import threading
import time
from types import FrameType, ModuleType
from typing import Any

from lilota.core import Lilota
from lilota.errors import WorkerStartupError
from lilota.logs import ENV_LOG_LEVEL
from lilota.render import EXIT_OK, CommandError
from lilota.settings import ENV_DB_URL, default_db_url
from lilota.supervisor import ENV_SCRIPT, boot_script
from lilota.worker import ENV_BURST, LilotaWorker

log = logging.getLogger(__name__)

# After a second signal, workers get this long to give their tasks back and exit before
# they are killed (a task blocked in C code does not see the signal until it returns).
FORCE_GRACE = 3.0
# How often the main thread looks for a signal while the workers run. The handlers only
# record a signal, so this bounds how late the drain starts; a wake-up costs nothing.
SIGNAL_POLL = 0.5


class _StopNow(BaseException):
    """Raised by the signal handler for a second signal while workers are starting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """Counts SIGINT/SIGTERM. Handlers only record; the main thread acts on them."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0
        self.received = threading.Event()
        self.starting = False

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.last = signum
        self.received.set()
        if self.count >= 2 and self.starting:
            raise _StopNow(signum)

    def name(self) -> str:
        return signal.Signals(self.last).name if self.last else "a signal"


# ---------------------------------------------------------------------- what to run


def setup_logging(level: str | None) -> None:
    """``lilota worker --log-level``: this process logs to stderr at ``level`` (default
    info); its worker processes get ``level`` for their lilota loggers (without it, a
    script's ``LilotaWorker(logging_level=)``, else info; see :mod:`lilota.logs`)."""
    logging.basicConfig(
        level=getattr(logging, (level or "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    if level:
        os.environ[ENV_LOG_LEVEL] = level


def looks_like_script(target: str) -> bool:
    """True if TARGET names a file (``tasks.py``, ``dir/tasks``) rather than a module."""
    return target.endswith(".py") or os.sep in target or os.path.isfile(target)


def check_script(path: str) -> str:
    """The script's absolute path, after checking it exists and compiles."""
    if not os.path.exists(path):
        raise CommandError(f"cannot load {path}: no such file")
    if not os.path.isfile(path):
        raise CommandError(f"cannot load {path}: not a file")
    try:
        with open(path, "rb") as f:
            source = f.read()
        compile(source, path, "exec")
    except SyntaxError as e:
        where = f"{e.filename or path}, line {e.lineno}" if e.lineno else path
        raise CommandError(f"cannot load {path}: {e.msg} ({where})") from None
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot load {path}: {e}") from None
    return os.path.abspath(path)


def _import_target(module_name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path:  # like `python -m`: modules of the current directory import
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except SyntaxError as e:
        raise CommandError(
            f"cannot import {module_name}: {e.msg} ({e.filename}, line {e.lineno})"
        ) from None
    except Exception as e:
        raise CommandError(f"cannot import {module_name}: {type(e).__name__}: {e}") from None


def _named_instance(module: ModuleType, module_name: str, attr: str, target: str) -> Lilota:
    if not attr.isidentifier():
        raise CommandError(f"{attr!r} in {target!r} is not an attribute name")
    instance = getattr(module, attr, None)
    if instance is None:
        raise CommandError(f"module {module_name} has no attribute {attr!r}")
    if not isinstance(instance, Lilota):
        raise CommandError(
            f"{module_name}:{attr} is a {type(instance).__name__}, not a Lilota instance"
        )
    return instance


def find_instance(target: str) -> tuple[Lilota, str]:
    """Import ``package.module[:attr]`` and return its Lilota instance and a display name."""
    module_name, _, attr = target.partition(":")
    if not module_name or not all(part.isidentifier() for part in module_name.split(".")):
        raise CommandError(
            f"{target!r} is neither a .py script nor a module (package.module or "
            "package.module:attribute)"
        )
    module = _import_target(module_name)
    if attr:
        return _named_instance(module, module_name, attr, target), f"{module_name}:{attr}"
    found = [(name, value) for name, value in vars(module).items() if isinstance(value, Lilota)]
    unique = {id(value): (name, value) for name, value in found}
    if not unique:
        raise CommandError(f"module {module_name} has no Lilota instance at module level")
    if len(unique) > 1:
        names = ", ".join(f"{module_name}:{name}" for name, _ in found)
        raise CommandError(f"module {module_name} has several Lilota instances; name one: {names}")
    name, instance = next(iter(unique.values()))
    return instance, f"{module_name}:{name}"


def instance_workers(target: str, workers: int, db_url: str | None) -> tuple[Lilota, str]:
    """A Lilota that runs the tasks registered on TARGET's instance in ``workers``
    processes, on ``db_url`` (None: the instance's own), and TARGET's display name."""
    instance, label = find_instance(target)
    if not len(instance.registry):
        raise CommandError(f"{label} has no registered tasks")
    runner = Lilota(
        db_url or instance.db_url,
        number_of_workers=workers,
        set_progress_manually=instance.set_progress_manually,
        lease=instance.lease,
        startup_timeout=instance.startup_timeout,
        registry=instance.registry,
    )
    return runner, label


# ---------------------------------------------------------------------- running


def run_burst(target: str, db_url: str | None) -> int:
    """Run TARGET's due tasks in this process until none is due (``--burst``); returns 0.

    A script runs as ``__main__`` with ``LILOTA_BURST=1``, so its ``worker.start()`` drains
    and returns; a module's instance gets a worker on its registry here."""
    if looks_like_script(target):
        path = check_script(target)
        os.environ[ENV_DB_URL] = db_url or default_db_url()
        os.environ[ENV_BURST] = "1"
        os.environ[ENV_SCRIPT] = path
        boot_script()
        return 0
    instance, label = find_instance(target)
    if not len(instance.registry):
        raise CommandError(f"{label} has no registered tasks")
    worker = LilotaWorker(
        db_url or instance.db_url,
        instance.set_progress_manually,
        registry=instance.registry,
        lease=instance.lease,
    )
    worker.start(burst=True)
    return 0


def run_until_signalled(lilota: Lilota, label: str, workers: int) -> int:
    """Start ``lilota``'s workers, wait for SIGTERM/SIGINT, stop; returns the exit status
    (0 after a drain, 128 + the signal after a second signal)."""
    signals = _Signals()
    signals.install()
    stopped = _start(lilota, label, signals)
    if stopped is not None:
        return stopped
    log.info(
        "%d worker processes running %s on %s (pids %s); Ctrl-C or SIGTERM stops them",
        workers,
        label,
        lilota.store.safe_url,
        " ".join(map(str, lilota.worker_pids)),
    )
    while not signals.received.wait(SIGNAL_POLL):
        pass
    return _stop(lilota, signals)


def _start(lilota: Lilota, label: str, signals: _Signals) -> int | None:
    """Start the workers; an exit status if a second signal came first, else None."""
    signals.starting = True
    try:
        lilota.start()
        signals.starting = False
    except _StopNow as e:
        _kill_now(lilota)
        log.warning("stopped by %s while starting", signal.Signals(e.signum).name)
        return 128 + e.signum
    except WorkerStartupError as e:
        raise CommandError(f"cannot start workers for {label}: {startup_reason(e)}") from None
    finally:
        signals.starting = False
    return None


def startup_reason(error: Exception) -> str:
    """One line out of a WorkerStartupError: the exit status and the last line the worker
    printed (its exception), which the supervisor has already forwarded in full."""
    head, _, output = str(error).partition("\n--- end of its output ---\n")
    head = head.strip().splitlines()[0] if head.strip() else ""
    status = re.search(r"could not start: (.*)$", head)
    reason = status.group(1) if status else head
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
    return f"{reason}: {last}" if last and last not in reason else reason


def _stop(lilota: Lilota, signals: _Signals) -> int:
    """Drain after the first signal; after a second one, stop the workers at once."""
    log.warning(
        "received %s: finishing the running tasks, then stopping (send it again to stop now)",
        signals.name(),
    )
    supervisor = getattr(lilota, "_supervisor", None)  # for a second signal: see _kill_now
    failure: list[BaseException] = []

    def drain() -> None:
        try:
            lilota.stop()
        except BaseException as e:  # reported by the main thread
            failure.append(e)

    thread = threading.Thread(target=drain, name="lilota-cli-stop", daemon=True)
    thread.start()
    while thread.is_alive() and signals.count < 2:
        thread.join(0.1)
    if thread.is_alive():
        log.warning(
            "received %s again: stopping now; running tasks go back to pending", signals.name()
        )
        _kill_now(lilota, supervisor, thread)
        return 128 + signals.last
    if failure:
        raise failure[0]
    log.info("workers stopped")
    return EXIT_OK


def _kill_now(
    lilota: Lilota, supervisor: Any = None, draining: threading.Thread | None = None
) -> None:
    """Stop every worker at once. A second SIGTERM makes a worker give its tasks back and
    exit; one still alive after FORCE_GRACE (busy in C code) is killed."""
    if supervisor is None:
        supervisor = getattr(lilota, "_supervisor", None)
    if supervisor is None:
        return
    if draining is None:
        draining = threading.Thread(target=lilota.stop, name="lilota-cli-stop", daemon=True)
        draining.start()
    deadline = time.monotonic() + FORCE_GRACE
    while draining.is_alive() and time.monotonic() < deadline:
        # Repeated: two signals that reach a busy process close together count as one.
        _signal_workers(supervisor, signal.SIGTERM)
        draining.join(0.5)
    if draining.is_alive():
        log.warning("workers %s did not exit; killing them", supervisor.pids)
        _signal_workers(supervisor, signal.SIGKILL)
        draining.join(FORCE_GRACE)


def _signal_workers(supervisor: Any, signum: int) -> None:
    for pid in supervisor.pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
