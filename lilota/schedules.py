"""Periodic tasks: ``every(timedelta)`` and ``crontab(...)`` schedules, and the thread that
turns their ticks into tasks.

A schedule is a fixed set of instants ("ticks") derived from wall-clock UTC time alone,
so every process, on every host, computes the same ticks. Each tick becomes at most one
task: it is inserted with ``schedule_key = "<task name>@<tick, ISO 8601 UTC>"``, a column
with a unique index, so when several worker processes (of one or many supervisors or
hosts) insert the same tick the database keeps the first and ignores the others.

Ticks are fired by every worker process that has the periodic task registered. A tick is
created when it is due; if a process was stopped (or stalled) across several ticks, it
creates only the most recent one that is due, never the ones in between: after downtime
a periodic task runs once, not once per missed tick. And only if that tick is not too
late: a tick found more than the schedule's maximum lateness after its time (by default
the smaller of the period and one hour) is skipped and logged, so a nightly task whose
worker starts at 18:41 waits for the next night instead of running in the middle of the
day. ``catch_up=True`` on a schedule runs the latest tick however late it is.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING

from croniter import croniter

from lilota.errors import DatabaseError, InvalidArgument, InvalidArgumentType, LilotaError
from lilota.registry import new_task

if TYPE_CHECKING:
    from lilota.store import TaskStore

log = logging.getLogger(__name__)

# Ticks of every(...) are multiples of the interval counted from this instant (naive UTC),
# so every(timedelta(hours=1)) ticks on the hour and every(timedelta(days=1)) at midnight
# UTC, the same in every process.
EPOCH = datetime(1970, 1, 1)

# Longest sleep of the tick thread: the wall clock can be set while it sleeps (NTP steps,
# a suspended laptop); it looks again at least this often.
MAX_TICK_SLEEP = 60.0

# The default maximum lateness of a tick is the smaller of its period and this: a tick
# more than an hour late is no longer "on schedule" even for a daily or weekly task.
DEFAULT_MAX_LATENESS = timedelta(hours=1)


class Schedule(abc.ABC):
    """When a periodic task runs. Times are naive UTC datetimes, like the task store's.

    ``max_lateness`` (None: the default) and ``catch_up`` say how late a tick may be
    created; see ``lateness_limit()``.
    """

    max_lateness: timedelta | None
    catch_up: bool

    @abc.abstractmethod
    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment``."""

    @abc.abstractmethod
    def latest(self, now: datetime) -> datetime:
        """The most recent tick at or before ``now``."""

    def ticks_between(self, start: datetime, end: datetime) -> Iterator[datetime]:
        """Every tick ``t`` with ``start < t <= end``, in order."""
        tick = self.next_after(start)
        while tick <= end:
            yield tick
            tick = self.next_after(tick)

    def lateness_limit(self, tick: datetime) -> timedelta | None:
        """How long after ``tick`` its task may still be created; None: any time.

        ``max_lateness`` if given, else the smaller of the period (the time from ``tick``
        to the next tick) and ``DEFAULT_MAX_LATENESS``; None with ``catch_up``."""
        if self.catch_up:
            return None
        if self.max_lateness is not None:
            return self.max_lateness
        return min(self.next_after(tick) - tick, DEFAULT_MAX_LATENESS)

    def _check_options(self, maker: str) -> None:
        """Refuses a bad ``max_lateness``/``catch_up`` (``maker`` names the factory)."""
        if self.max_lateness is not None and (
            not isinstance(self.max_lateness, timedelta) or self.max_lateness <= timedelta(0)
        ):
            raise InvalidArgument(
                f"{maker}(max_lateness=) takes a positive timedelta, got {self.max_lateness!r}"
            )
        if not isinstance(self.catch_up, bool):
            raise InvalidArgumentType(
                f"{maker}(catch_up=) takes True or False, got {self.catch_up!r}"
            )
        if self.catch_up and self.max_lateness is not None:
            raise InvalidArgument(f"{maker}() takes max_lateness= or catch_up=True, not both")

    def _options_repr(self) -> str:
        if self.catch_up:
            return ", catch_up=True"
        if self.max_lateness is not None:
            return f", max_lateness={self.max_lateness!r}"
        return ""


@dataclass(frozen=True)
class Every(Schedule):
    """A tick every ``interval``, on multiples of it since 1970-01-01 00:00 UTC."""

    interval: timedelta
    max_lateness: timedelta | None = None
    catch_up: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.interval, timedelta):
            raise InvalidArgumentType(f"every() takes a timedelta, got {self.interval!r}")
        if self.interval < timedelta(milliseconds=1):
            raise InvalidArgument(
                f"every() needs an interval of at least 1 ms, got {self.interval}"
            )
        self._check_options("every")

    def latest(self, now: datetime) -> datetime:
        return EPOCH + ((now - EPOCH) // self.interval) * self.interval

    def next_after(self, moment: datetime) -> datetime:
        return self.latest(moment) + self.interval

    def __repr__(self) -> str:
        return f"every({self.interval!r}{self._options_repr()})"


# The keyword fields of crontab(), in the order of a cron expression; of these, the time
# fields default to 0 (not *) when a coarser field is given (see crontab()).
_FIELDS = ("minutes", "hours", "days", "months", "weekdays")
_TIME_FIELDS = ("minutes", "hours")


@dataclass(frozen=True)
class Crontab(Schedule):
    """Ticks at the times a five-field cron expression matches (in ``tz``, UTC by default).

    Parsing and matching are croniter's; lilota only converts times.
    """

    expression: str
    tz: tzinfo = timezone.utc
    max_lateness: timedelta | None = None
    catch_up: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.expression, str) or len(self.expression.split()) != 5:
            raise InvalidArgument(
                f"crontab() takes five fields 'minute hour day month weekday', "
                f"got {self.expression!r}"
            )
        if not croniter.is_valid(self.expression):
            raise InvalidArgument(f"{self.expression!r} is not a valid cron expression")
        self._check_options("crontab")

    def _local(self, moment: datetime) -> datetime:
        return moment.replace(tzinfo=timezone.utc).astimezone(self.tz)

    @staticmethod
    def _utc(moment: datetime) -> datetime:
        return moment.astimezone(timezone.utc).replace(tzinfo=None)

    def next_after(self, moment: datetime) -> datetime:
        local = self._local(moment)
        return self._utc(croniter(self.expression, local).get_next(datetime))

    def latest(self, now: datetime) -> datetime:
        local = self._local(now)
        previous = croniter(self.expression, local).get_prev(datetime)
        # get_prev() is strictly before its start: ``now`` itself may be a tick.
        following = croniter(self.expression, previous).get_next(datetime)
        return self._utc(following if following <= local else previous)

    def __repr__(self) -> str:
        zone = "" if self.tz is timezone.utc else f", tz={self.tz!r}"
        return f"crontab({self.expression!r}{zone}{self._options_repr()})"


def every(
    interval: timedelta, *, max_lateness: timedelta | None = None, catch_up: bool = False
) -> Every:
    """A schedule ticking every ``interval`` (at least 1 ms).

    Ticks are multiples of ``interval`` counted from 1970-01-01 00:00 UTC, so all processes
    agree on them: ``every(timedelta(minutes=15))`` ticks at :00, :15, :30 and :45.
    A tick found more than ``max_lateness`` after its time (default: the smaller of
    ``interval`` and one hour) is skipped; ``catch_up=True`` creates it however late.
    """
    return Every(interval, max_lateness, catch_up)


def crontab(
    expression: str | None = None,
    *,
    minutes: str | int | None = None,
    hours: str | int | None = None,
    days: str | int | None = None,
    months: str | int | None = None,
    weekdays: str | int | None = None,
    tz: tzinfo | str | None = None,
    max_lateness: timedelta | None = None,
    catch_up: bool = False,
) -> Crontab:
    """A cron schedule: ``crontab("*/5 * * * *")`` or the keyword form ``crontab(hours="*/2")``.

    The keyword form builds the expression ``minutes hours days months weekdays``; each
    value is a cron field (``"*/2"``, ``"9-17"``, ``"mon-fri"``, ``0``). A field left out is
    ``0`` when it is a time field finer than the finest one given, else ``*``: so
    ``crontab(hours="*/2")`` is ``"0 */2 * * *"`` (on the hour, every two hours),
    ``crontab(weekdays="mon")`` is ``"0 0 * * mon"``, and ``crontab(minutes="*/10")`` is
    ``"*/10 * * * *"``. ``tz`` (a tzinfo or an IANA name) is the time zone the fields are
    read in; UTC by default. A tick found more than ``max_lateness`` after its time
    (default: the smaller of the time to the next tick and one hour) is skipped, so
    ``crontab(hours="3")`` first started at 18:41 runs at the next 03:00, not at once;
    ``catch_up=True`` creates the latest tick however late.
    """
    zone: tzinfo
    if tz is None:
        zone = timezone.utc
    elif isinstance(tz, str):
        from zoneinfo import ZoneInfo

        zone = ZoneInfo(tz)
    else:
        zone = tz
    given: Mapping[str, str | int | None] = {
        "minutes": minutes,
        "hours": hours,
        "days": days,
        "months": months,
        "weekdays": weekdays,
    }
    named = [name for name in _FIELDS if given[name] is not None]
    if expression is not None:
        if named:
            raise InvalidArgument("crontab() takes an expression or keyword fields, not both")
        return Crontab(expression, zone, max_lateness, catch_up)
    if not named:
        raise InvalidArgument('crontab() needs an expression or a field, e.g. crontab(hours="*/2")')
    finest = _FIELDS.index(named[0])
    parts = []
    for position, name in enumerate(_FIELDS):
        value = given[name]
        if value is None:
            value = "0" if name in _TIME_FIELDS and position < finest else "*"
        text = str(value).strip()
        if not text or " " in text:
            raise InvalidArgument(f"crontab({name}={value!r}): a field is one cron field")
        parts.append(text)
    return Crontab(" ".join(parts), zone, max_lateness, catch_up)


def schedule_key(name: str, tick: datetime) -> str:
    """The value that makes one tick of one periodic task one task in the database."""
    return f"{name}@{tick.isoformat(timespec='microseconds')}"


@dataclass
class TickPlanner:
    """Decides which ticks are due; no threads, no database (the clock is passed in).

    ``due(now)`` returns, for each schedule whose next tick has come, its most recent tick
    at or before ``now`` (never the ones skipped in between). At the first call that is
    the most recent tick of every schedule, so a process that starts catches up once;
    but a tick later than its schedule's ``lateness_limit()`` is not returned: ``due()``
    logs it (INFO) and counts it as done, so the schedule waits for its next tick.
    """

    schedules: Mapping[str, Schedule]
    _last: dict[str, datetime] = field(default_factory=dict)

    def due(self, now: datetime) -> list[tuple[str, datetime]]:
        found = []
        for name, schedule in self.schedules.items():
            last = self._last.get(name)
            if last is not None and schedule.next_after(last) > now:
                continue
            tick = schedule.latest(now)
            if tick == last:
                continue
            limit = schedule.lateness_limit(tick)
            if limit is not None and now - tick > limit:
                log.info(
                    "periodic task %s: skipping the tick of %s UTC, found %s after it "
                    "(max lateness %s; catch_up=True would run it); next tick at %s UTC",
                    name,
                    tick,
                    now - tick,
                    limit,
                    schedule.next_after(tick),
                )
                self._last[name] = tick
                continue
            found.append((name, tick))
        return found

    def done(self, name: str, tick: datetime) -> None:
        """Record that ``tick`` of ``name`` exists in the database (made here or elsewhere)."""
        self._last[name] = tick

    def next_due(self, now: datetime) -> datetime | None:
        """When the next tick of any schedule comes (None without schedules)."""
        times = [
            schedule.next_after(self._last.get(name, now))
            for name, schedule in self.schedules.items()
        ]
        return min(times, default=None)


class TickThread:
    """A daemon thread of a worker process that inserts the due ticks of its periodic tasks.

    Many of these run at once (one per worker process, on any number of hosts); the
    unique ``schedule_key`` lets exactly one insert of each tick succeed.
    """

    def __init__(
        self,
        store: TaskStore,
        schedules: Mapping[str, Schedule],
        *,
        max_attempts: Mapping[str, int] | None = None,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        self.store = store
        self.planner = TickPlanner(dict(schedules))
        self.max_attempts = dict(max_attempts or {})
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._thread: threading.Thread | None = None
        self.failed = False  # the last fire_due() could not insert a tick

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lilota-ticks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def fire_due(self) -> list[int]:
        """Insert the ticks due now; returns the ids of the tasks this call created.

        A tick that could not be inserted (database unavailable) stays due: the next call
        tries again, with the then most recent tick."""
        created = []
        self.failed = False
        for name, tick in self.planner.due(self.store.clock()):
            try:
                task_id = self.store.add(
                    new_task(
                        name,
                        run_at=tick,
                        max_attempts=self.max_attempts.get(name, 1),
                        schedule_key=schedule_key(name, tick),
                    )
                )
            except DatabaseError as e:
                log.warning("periodic task %s: could not create the tick at %s: %s", name, tick, e)
                self.failed = True
                continue
            self.planner.done(name, tick)
            if task_id >= 0:
                log.debug("periodic task %s: tick %s is task %d", name, tick, task_id)
                created.append(task_id)
        return created

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fire_due()
            except LilotaError as e:  # keep ticking whatever one insert did
                log.error("periodic tasks: %s", e)
            now = self.store.clock()
            next_due = self.planner.next_due(now)
            pause = MAX_TICK_SLEEP if next_due is None else (next_due - now).total_seconds()
            if self.failed:
                pause = min(pause, 1.0)
            if self._wait(min(max(pause, 0.001), MAX_TICK_SLEEP)):
                return


__all__ = ["Crontab", "Every", "Schedule", "TickPlanner", "TickThread", "crontab", "every"]
