"""WorkerSettings: the tuning of a worker, built and validated once.

:class:`~lilota.core.Lilota` (or a :class:`~lilota.worker.LilotaWorker` started by hand)
builds the settings from its arguments and the user's environment, which refuses a bad
value at once with a :class:`~lilota.errors.ConfigurationError`; a supervisor ships them
to its worker processes as one JSON value in ``LILOTA_WORKER_SETTINGS``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from lilota.errors import ConfigurationError
from lilota.logs import log_level_number
from lilota.registry import Registry
from lilota.validation import check_int

ENV_DB_URL = "LILOTA_DB_URL"  # the database when no db_url is given
DEFAULT_DB_URL = "sqlite:///lilota.db"  # the zero-set-up default: a file beside the app


def default_db_url() -> str:
    """``$LILOTA_DB_URL``, else ``sqlite:///lilota.db``: the database of every entry point
    (Lilota, LilotaWorker, the command, the dashboard) that is given none."""
    return os.environ.get(ENV_DB_URL) or DEFAULT_DB_URL


ENV_SETTINGS = "LILOTA_WORKER_SETTINGS"  # WorkerSettings as JSON, built once by the parent
# Settings a user may give in the environment (documented in the README).
ENV_LEASE_SECONDS = "LILOTA_LEASE_SECONDS"
ENV_CANCEL_GRACE_SECONDS = "LILOTA_CANCEL_GRACE_SECONDS"
ENV_ASYNC_CONCURRENCY = "LILOTA_ASYNC_CONCURRENCY"
ENV_CPU_BOUND_PROCESSES = "LILOTA_CPU_BOUND_PROCESSES"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """Tuning of a worker. The defaults suit tasks from milliseconds to hours.

    Built and validated once (by :class:`~lilota.core.Lilota` or :class:`LilotaWorker`)
    and shipped to worker processes as one JSON value (:meth:`to_json`)."""

    # How long a claim lasts without renewal. A worker that dies keeps its tasks this long
    # at most; live workers look for expired leases every max(heartbeat, lease/6), so its
    # tasks are pending again within 1.2 leases (35 s). Shorter recovers faster but a
    # stalled (swapping, paused) machine loses tasks it is still running; 30 s survives
    # long GC pauses and slow disks.
    lease: timedelta = timedelta(seconds=30)
    # How often leases are renewed (and cancellation requests noticed) while tasks run.
    # Must stay well under ``lease``: a third of it leaves two chances before expiry.
    heartbeat: timedelta = timedelta(seconds=1)
    # Longest idle wait between two looks for work when no wake-up arrives: only a
    # safety net for lost notifications, never the normal path.
    idle_poll: float = 5.0
    # Time a running task gets to end by itself after cancellation is requested (it is
    # told within a heartbeat), before its process is replaced. 10 s lets a task finish
    # the step it is in; LILOTA_CANCEL_GRACE_SECONDS or Lilota(cancel_grace=) change it.
    cancel_grace: timedelta = timedelta(seconds=10)
    # Async tasks one worker process runs at once on its event loop. 10 keeps a burst of
    # I/O-bound tasks from opening more connections to other services than a typical
    # pool allows; raise it for tasks that mostly wait (100s are fine for one loop).
    async_concurrency: int = 10
    # Processes of a worker's pool for cpu_bound tasks. 1 per worker process: with the
    # default of one worker process per core, that is already one more process per core.
    cpu_bound_processes: int = 1

    def __post_init__(self) -> None:
        if self.lease <= timedelta(seconds=0):
            raise ConfigurationError(f"lease must be positive, got {self.lease}")
        if self.heartbeat * 2 > self.lease:
            raise ConfigurationError(
                f"heartbeat ({self.heartbeat}) must be at most half the lease ({self.lease})"
            )
        if self.cancel_grace < timedelta(0):
            raise ConfigurationError(f"cancel_grace must be >= 0, got {self.cancel_grace}")
        for option in ("async_concurrency", "cpu_bound_processes"):
            check_int(getattr(self, option), option, 1, error=ConfigurationError)

    @classmethod
    def from_env(cls, **overrides: Any) -> WorkerSettings:
        """Settings from ``overrides`` (None: not given), else the environment: the
        settings a parent shipped (``LILOTA_WORKER_SETTINGS``), else the user's
        ``LILOTA_LEASE_SECONDS`` and friends, else the defaults. A lease without a
        heartbeat brings a heartbeat of a third of it (at most 1 s)."""
        shipped = os.environ.get(ENV_SETTINGS)
        values = cls.from_json(shipped).as_values() if shipped else _user_env()
        given = {k: v for k, v in overrides.items() if v is not None}
        if "lease" in given and "heartbeat" not in given:
            given["heartbeat"] = _heartbeat_for(given["lease"])
        return cls(**{**values, **given})

    def as_values(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """The settings as one JSON value (durations in seconds), for a worker process."""
        values = self.as_values()
        return json.dumps(
            {k: v.total_seconds() if isinstance(v, timedelta) else v for k, v in values.items()}
        )

    @classmethod
    def from_json(cls, text: str) -> WorkerSettings:
        values = json.loads(text)
        for name in ("lease", "heartbeat", "cancel_grace"):
            values[name] = timedelta(seconds=values[name])
        return cls(**values)


def check_overrides(
    *,
    lease: object = None,
    cancel_grace: object = None,
    async_concurrency: object = None,
    cpu_bound_processes: object = None,
    startup_timeout: object = None,
    registry: object = None,
) -> None:
    """Check the settings a ``Lilota`` or ``LilotaWorker`` was given (None: not given) when
    it is made, rather than when its workers start. Raises :class:`ConfigurationError`
    naming the setting."""
    if registry is not None and not isinstance(registry, Registry):
        raise ConfigurationError(
            f"registry must be a lilota Registry (another instance's .registry), "
            f"got {type(registry).__name__}"
        )
    if startup_timeout is not None and (
        isinstance(startup_timeout, bool)
        or not isinstance(startup_timeout, (int, float))
        or not startup_timeout > 0
    ):
        raise ConfigurationError(
            f"startup_timeout must be a number of seconds > 0, got {startup_timeout!r}"
        )
    if lease is not None and (not isinstance(lease, timedelta) or lease <= timedelta(0)):
        raise ConfigurationError(f"lease must be a positive timedelta, got {lease!r}")
    if cancel_grace is not None and (
        not isinstance(cancel_grace, timedelta) or cancel_grace < timedelta(0)
    ):
        raise ConfigurationError(f"cancel_grace must be a timedelta >= 0, got {cancel_grace!r}")
    for option, value in (
        ("async_concurrency", async_concurrency),
        ("cpu_bound_processes", cpu_bound_processes),
    ):
        if value is not None:
            check_int(value, option, 1, error=ConfigurationError)


def _heartbeat_for(lease: timedelta) -> timedelta:
    return timedelta(seconds=min(1.0, lease.total_seconds() / 3))


def _env_number(variable: str, kind: type[float] | type[int]) -> Any:
    """``$variable`` as ``kind``; None if unset; ConfigurationError naming it if malformed."""
    text = os.environ.get(variable)
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ConfigurationError(f"{variable} must be a {kind.__name__}, got {text!r}") from None


def _user_env() -> dict[str, Any]:
    """The settings a user put in the environment."""
    values: dict[str, Any] = {}
    lease = _env_number(ENV_LEASE_SECONDS, float)
    if lease is not None:
        values["lease"] = timedelta(seconds=lease)
        values["heartbeat"] = _heartbeat_for(values["lease"])
    grace = _env_number(ENV_CANCEL_GRACE_SECONDS, float)
    if grace is not None:
        values["cancel_grace"] = timedelta(seconds=grace)
    for option, variable in (
        ("async_concurrency", ENV_ASYNC_CONCURRENCY),
        ("cpu_bound_processes", ENV_CPU_BOUND_PROCESSES),
    ):
        if (number := _env_number(variable, int)) is not None:
            values[option] = number
    return values


def set_logging_level(
    level: int | str | None, option: str = "logging_level", *, earlier: int | str | None = None
) -> int | None:
    """``log_level=`` (or the earlier release's ``logging_level=``, given as ``earlier``:
    not both) of Lilota, LilotaWorker and TaskRunner: set the level of the ``lilota``
    logger (and so of its children, ``lilota.worker`` and the rest) in this process; None
    leaves it as it is. Returns the level number (None if not given); a bad one raises
    ConfigurationError (see :func:`log_level_number`)."""
    if level is not None and earlier is not None:
        raise ConfigurationError("give log_level or logging_level (its earlier name), not both")
    if level is None:
        level, option = earlier, "logging_level"
    if level is None:
        return None
    number = log_level_number(level, option)
    logging.getLogger("lilota").setLevel(number)
    return number


__all__ = ["DEFAULT_DB_URL", "ENV_DB_URL", "ENV_SETTINGS", "WorkerSettings", "default_db_url"]
