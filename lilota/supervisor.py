"""Starts, watches and stops worker processes.

Each worker is a fresh Python process (never a fork of the caller, whose threads and
connections a fork would copy). It gets two pipes: a control pipe on which it says
"ready" with its task names once it can take tasks, and a lifeline whose write end only
the supervisor holds; when the supervisor's process dies for any reason the lifeline
reads end-of-file and the worker gives its tasks back and exits. No orphans.

Policy for a dead worker (one rule, written down): a worker that exits on its own is
started again. Exits for a task timeout, a forced cancellation, a lost lease or a SQLite
file deleted or replaced under it are expected and restarted at once; any other exit
counts as a crash and waits 0.5 s, 1 s, 2 s ... up to 30 s before the next start, the
count resetting once a worker has lived 30 s. At ``start()``, a worker slot that crashes
three times before it is ready makes ``start()`` raise
:class:`~lilota.errors.WorkerStartupError` with the end of its output.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from lilota.errors import WorkerStartupError
from lilota.logs import ENV_WORKER_NAME
from lilota.worker import ENV_CONTROL_FD, ENV_LIFELINE_FD, WorkerExit

log = logging.getLogger(__name__)

ENV_WORKER_PROCESS = "LILOTA_WORKER_PROCESS"  # set in every worker process
ENV_BOOT = "LILOTA_BOOT"  # JSON: where a worker finds its tasks, and settings (instance mode)
ENV_SCRIPT = "LILOTA_SCRIPT"  # path of the worker script (script mode)

# A worker that lived this long before dying is not crash-looping: start it again at once.
HEALTHY_AFTER = 30.0
# Back-off after repeated crashes: doubling from 0.5 s up to 30 s keeps a broken deploy
# from burning a core on restarts while a transient failure recovers within seconds.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# start() gives up on a slot after this many crashes before it ever became ready.
STARTUP_CRASHES = 3
# Exits that are no crash: the worker asked to be replaced (see the policy above).
_REPLACE_AT_ONCE = (
    WorkerExit.TASK_TIMEOUT,
    WorkerExit.CANCEL_FORCED,
    WorkerExit.LEASE_LOST,
    WorkerExit.DATABASE_REPLACED,
)
# Lines of a worker's stderr kept to explain why it died.
STDERR_TAIL = 40


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)
    message: dict[str, Any] = field(default_factory=dict)
    crashes: int = 0
    restart_at: float | None = None
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL)
    )


# A worker's stderr is read in chunks of up to this many bytes, passed on whole lines at a
# time; writes of the supervisor's threads to its stderr never interleave within a chunk.
FORWARD_CHUNK = 65536
_stderr_lock = threading.Lock()


def _pass_on(slot: _Slot, data: bytes) -> None:
    text = data.decode(errors="replace")
    # The last lines only (the tail a crash report shows), without splitting all of them.
    slot.stderr_tail.extend(
        line + "\n" for line in text.rstrip("\n").rsplit("\n", STDERR_TAIL)[-STDERR_TAIL:]
    )
    with _stderr_lock:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):  # the caller's stderr is closed
            pass


def is_worker_process() -> bool:
    """True inside a process that a supervisor started as a worker."""
    return os.environ.get(ENV_WORKER_PROCESS) == "1"


class Supervisor:
    """Runs ``number_of_workers`` copies of ``argv`` as worker processes."""

    def __init__(
        self,
        argv: Sequence[str],
        number_of_workers: int,
        *,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_exit: Callable[[int, int], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        # Told (pid, exit status) of a worker that exited on its own, before it is replaced.
        self._on_exit = on_exit
        self.number_of_workers = number_of_workers
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self._sleep = sleep
        self._clock = clock
        self._slots = [_Slot(index=i) for i in range(number_of_workers)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lifeline_r: int | None = None
        self._lifeline_w: int | None = None

    # ------------------------------------------------------------------ public

    @property
    def pids(self) -> list[int]:
        """Process ids of the live worker processes."""
        with self._lock:
            return [
                s.process.pid
                for s in self._slots
                if s.process is not None and s.process.poll() is None
            ]

    @property
    def task_names(self) -> frozenset[str]:
        """Task names the workers reported when they became ready."""
        names: set[str] = set()
        with self._lock:
            for slot in self._slots:
                names.update(slot.message.get("names", []))
        return frozenset(names)

    def start(self) -> None:
        """Start every worker and return once all are ready to take tasks.

        Raises :class:`WorkerStartupError` (after stopping the others) if one cannot start.
        """
        self._lifeline_r, self._lifeline_w = os.pipe()
        for slot in self._slots:
            self._spawn(slot)
        deadline = self._clock() + self.startup_timeout
        try:
            for slot in self._slots:
                self._wait_ready(slot, deadline)
        except BaseException:
            self.stop(timeout=5.0)
            raise
        self._monitor = threading.Thread(target=self._watch, name="lilota-supervisor", daemon=True)
        self._monitor.start()
        log.info("%d worker processes ready (pids %s)", self.number_of_workers, self.pids)

    def stop(self, timeout: float | None = None) -> None:
        """Ask every worker to finish its running task and exit; wait ``timeout`` seconds
        (None: as long as it takes), then kill what is left."""
        self._stopping.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join()
        with self._lock:
            processes = [s.process for s in self._slots if s.process is not None]
        for p in processes:
            self._signal(p, signal.SIGTERM)
        deadline = None if timeout is None else self._clock() + timeout
        for p in processes:
            try:
                p.wait(timeout=None if deadline is None else max(0.0, deadline - self._clock()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time; killing it", p.pid)
                self._signal(p, signal.SIGKILL)
                p.wait()
        self._close_lifeline()

    def kill(self) -> None:
        """End every worker at once (SIGKILL). Their tasks come back when leases expire."""
        self._stopping.set()
        with self._lock:
            processes = [s.process for s in self._slots if s.process is not None]
        for p in processes:
            self._signal(p, signal.SIGKILL)
            p.wait()
        self._close_lifeline()

    # ------------------------------------------------------------------ processes

    def _spawn(self, slot: _Slot) -> None:
        assert self._lifeline_r is not None
        control_r, control_w = os.pipe()
        env = dict(os.environ)
        env.update(self.extra_env)
        env[ENV_WORKER_PROCESS] = "1"
        env[ENV_WORKER_NAME] = f"worker-{slot.index + 1}"  # in its log lines
        env[ENV_CONTROL_FD] = str(control_w)
        env[ENV_LIFELINE_FD] = str(self._lifeline_r)
        slot.ready.clear()
        slot.message = {}
        try:
            process = subprocess.Popen(
                self.argv,
                env=env,
                pass_fds=(control_w, self._lifeline_r),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # Own session: a Ctrl-C in the terminal reaches the supervisor only, which
                # then drains the workers; they don't all die mid-task at once.
                start_new_session=True,
            )
        finally:
            os.close(control_w)
        slot.process = process
        slot.started_at = self._clock()
        slot.restart_at = None
        threading.Thread(
            target=self._read_control, args=(slot, control_r), name="lilota-control", daemon=True
        ).start()
        assert process.stderr is not None
        threading.Thread(
            target=self._forward_stderr,
            args=(slot, process.stderr),
            name="lilota-stderr",
            daemon=True,
        ).start()
        log.debug("worker slot %d: started pid %d", slot.index, process.pid)

    @staticmethod
    def _read_control(slot: _Slot, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            line = pipe.readline()
        if line:
            try:
                slot.message = json.loads(line)
            except ValueError:
                slot.message = {"ready": False, "error": line.decode(errors="replace")}
        slot.ready.set()

    @staticmethod
    def _forward_stderr(slot: _Slot, stream: IO[bytes]) -> None:
        """Pass a worker's stderr on to ours in whole lines, as many as have arrived in one
        write (a busy worker logs a line per task: one write per line would cost the
        supervisor more than the worker spent on the task)."""
        fd = stream.fileno()
        pending = b""
        while True:
            try:
                chunk = os.read(fd, FORWARD_CHUNK)
            except OSError:
                chunk = b""
            if not chunk:
                break
            data = pending + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) < FORWARD_CHUNK:  # no whole line yet
                pending = data
                continue
            cut = cut or len(data)  # an endless line is passed on in pieces
            pending = data[cut:]
            _pass_on(slot, data[:cut])
        if pending:
            _pass_on(slot, pending)
        stream.close()

    def _wait_ready(self, slot: _Slot, deadline: float) -> None:
        while True:
            left = deadline - self._clock()
            if left <= 0:
                raise WorkerStartupError(
                    f"worker {slot.index} was not ready within {self.startup_timeout:g} s"
                    f"{self._tail(slot)}"
                )
            if slot.ready.wait(min(left, 0.1)):
                if slot.message.get("ready"):
                    return
                # EOF or an error: the process is ending or has ended.
                assert slot.process is not None
                try:
                    slot.process.wait(timeout=max(0.1, deadline - self._clock()))
                except subprocess.TimeoutExpired:
                    continue
                slot.crashes += 1
                if slot.crashes >= STARTUP_CRASHES:
                    reason = slot.message.get("error") or f"exit status {slot.process.returncode}"
                    raise WorkerStartupError(
                        f"worker process {slot.process.pid} ({' '.join(self.argv)}) could not "
                        f"start: {reason}{self._tail(slot)}"
                    )
                self._sleep(FIRST_BACKOFF * 2 ** (slot.crashes - 1))
                self._spawn(slot)

    @staticmethod
    def _tail(slot: _Slot) -> str:
        time.sleep(0.05)  # let the stderr forwarder catch the last lines
        lines = "".join(slot.stderr_tail).rstrip()
        return f"\n--- end of its output ---\n{lines}" if lines else " (it printed nothing)"

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            for slot in self._slots:
                self._check(slot)

    def _check(self, slot: _Slot) -> None:
        process = slot.process
        if process is None or process.poll() is None or self._stopping.is_set():
            return
        now = self._clock()
        if slot.restart_at is None:
            code = process.returncode
            if self._on_exit is not None:
                self._on_exit(process.pid, code)
            lived = now - slot.started_at
            if code in _REPLACE_AT_ONCE:
                log.info(
                    "worker pid %d replaced after %s", process.pid, WorkerExit(code).name.lower()
                )
                delay = 0.0
            else:
                if lived >= HEALTHY_AFTER:
                    slot.crashes = 0
                slot.crashes += 1
                delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (slot.crashes - 1))
                log.error(
                    "worker pid %d died (exit status %s) after %.1f s; starting another in %.1f s%s",
                    process.pid,
                    code,
                    lived,
                    delay,
                    self._tail(slot) if slot.crashes >= STARTUP_CRASHES else "",
                )
            slot.restart_at = now + delay
        if now >= slot.restart_at:
            with self._lock:
                if not self._stopping.is_set():
                    self._spawn(slot)

    @staticmethod
    def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    def _close_lifeline(self) -> None:
        for fd in (self._lifeline_r, self._lifeline_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lifeline_r = self._lifeline_w = None


def wait_until_finished(
    unfinished: Callable[[set[int]], set[int]], ids: set[int], deadline: float | None
) -> None:
    """The drain of a graceful stop: wait until none of ``ids`` is unfinished (as the
    store's ``unfinished`` says) or the monotonic ``deadline`` passed. Looks at 5 ms,
    doubling to 100 ms: a short wait is noticed at once, a long one costs ten reads a
    second."""
    pause = 0.005
    while ids:
        ids = unfinished(ids)
        if not ids or (deadline is not None and time.monotonic() >= deadline):
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _import_main(spec: dict[str, Any]) -> types.ModuleType | None:
    """Import the parent's main module as ``__mp_main__`` (its ``if __name__ ==
    "__main__":`` block does not run), as multiprocessing's spawn does."""
    main_module: types.ModuleType | None = None
    if spec.get("main_module"):
        namespace = runpy.run_module(spec["main_module"], run_name="__mp_main__", alter_sys=False)
        main_module = types.ModuleType("__mp_main__")
        main_module.__dict__.update(namespace)
    elif spec.get("main_path"):
        main_module = types.ModuleType("__mp_main__")
        main_module.__file__ = spec["main_path"]
        sys.modules["__mp_main__"] = main_module
        with open(spec["main_path"], "rb") as f:
            code = compile(f.read(), spec["main_path"], "exec")
        exec(code, main_module.__dict__)
    if main_module is not None:
        sys.modules["__mp_main__"] = main_module
        sys.modules["__main__"] = main_module  # references to __main__.X resolve here
    return main_module


def boot_instance() -> None:
    """Entry point of a worker process in instance mode (tasks registered on a Lilota).

    Imports the caller's main module, finds the object holding the tasks by module and
    attribute name, and runs a worker for them with the parent's database and settings.
    """
    from lilota.worker import LilotaWorker

    spec = json.loads(os.environ.pop(ENV_BOOT))
    sys.path[:0] = [p for p in spec["sys_path"] if p not in sys.path]
    main_module = _import_main(spec)
    module_name = spec["module"]
    module = main_module if module_name == "__main__" else importlib.import_module(module_name)
    holder = getattr(module, spec["attr"], None)
    registry = getattr(holder, "registry", None)
    if registry is None:
        raise SystemExit(
            f"lilota worker: {module_name}.{spec['attr']} holds no tasks in the worker process"
        )
    # The settings come in LILOTA_WORKER_SETTINGS, built once by the parent.
    LilotaWorker(spec["db_url"], spec["set_progress_manually"], registry=registry).start()


def boot_script() -> None:
    """Entry point of a worker process in script mode: run the user's script as
    ``__main__``. A script that registers tasks on a LilotaWorker normally calls
    ``worker.start()`` itself; if it ends without doing so, its one worker is started."""
    from lilota.worker import LilotaWorker

    path = os.environ.pop(ENV_SCRIPT)
    sys.argv = [path]
    sys.path.insert(0, os.path.dirname(path))
    runpy.run_path(path, run_name="__main__")
    if LilotaWorker.started_in_this_process:
        return
    workers = list(LilotaWorker.instances)
    if len(workers) != 1:
        raise SystemExit(
            f"lilota worker: {path} created {len(workers)} LilotaWorker instances and started "
            "none; create one and call its start() (or leave it to lilota)"
        )
    workers[0].start()


BOOT_INSTANCE_ARGV = [
    sys.executable,
    "-c",
    "from lilota.supervisor import boot_instance; boot_instance()",
]
BOOT_SCRIPT_ARGV = [
    sys.executable,
    "-c",
    "from lilota.supervisor import boot_script; boot_script()",
]
