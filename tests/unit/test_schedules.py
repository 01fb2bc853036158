"""Periodic schedules (every, crontab) and the ticks they turn into tasks; no sleeping."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest

import lilota
from conftest import FakeClock
from lilota.errors import ConfigurationError, DatabaseError, RegistrationError
from lilota.registry import Registry
from lilota.schedules import Crontab, Every, TickPlanner, TickThread, crontab, every, schedule_key
from lilota.settings import ENV_ASYNC_CONCURRENCY, WorkerSettings
from lilota.store import TaskStore

# --------------------------------------------------------------------------- every


def test_every_ticks_on_multiples_of_the_interval_since_the_epoch() -> None:
    schedule = every(timedelta(minutes=15))
    now = datetime(2024, 5, 1, 10, 37, 12)
    assert schedule.latest(now) == datetime(2024, 5, 1, 10, 30)
    assert schedule.next_after(now) == datetime(2024, 5, 1, 10, 45)


def test_every_counts_a_tick_at_now_as_the_latest_and_not_as_next() -> None:
    schedule = every(timedelta(seconds=1))
    now = datetime(2024, 5, 1, 10, 0, 5)
    assert schedule.latest(now) == now
    assert schedule.next_after(now) == datetime(2024, 5, 1, 10, 0, 6)


def test_every_ticks_between_excludes_start_and_includes_end() -> None:
    schedule = every(timedelta(seconds=2))
    start = datetime(2024, 1, 1, 0, 0, 0)
    ticks = list(schedule.ticks_between(start, start + timedelta(seconds=6)))
    assert ticks == [start + timedelta(seconds=s) for s in (2, 4, 6)]


@pytest.mark.parametrize("interval", [timedelta(0), timedelta(seconds=-1), 5])
def test_every_refuses_a_non_positive_or_non_timedelta_interval(interval: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        every(interval)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- crontab


def test_crontab_expression_latest_and_next() -> None:
    schedule = crontab("*/5 * * * *")
    assert schedule.latest(datetime(2024, 1, 1, 0, 7, 30)) == datetime(2024, 1, 1, 0, 5)
    assert schedule.next_after(datetime(2024, 1, 1, 0, 7, 30)) == datetime(2024, 1, 1, 0, 10)


def test_crontab_counts_a_tick_at_now_as_the_latest() -> None:
    schedule = crontab("*/5 * * * *")
    assert schedule.latest(datetime(2024, 1, 1, 0, 10)) == datetime(2024, 1, 1, 0, 10)
    assert schedule.next_after(datetime(2024, 1, 1, 0, 10)) == datetime(2024, 1, 1, 0, 15)


@pytest.mark.parametrize(
    ("keywords", "expression"),
    [
        ({"hours": "*/2"}, "0 */2 * * *"),
        ({"minutes": "*/5"}, "*/5 * * * *"),
        ({"minutes": 30}, "30 * * * *"),
        ({"hours": 9, "weekdays": "mon-fri"}, "0 9 * * mon-fri"),
        ({"weekdays": "sun"}, "0 0 * * sun"),
        ({"days": 1}, "0 0 1 * *"),
        ({"months": "1,7", "days": "15"}, "0 0 15 1,7 *"),
        ({"minutes": "15", "days": "1"}, "15 * 1 * *"),
    ],
)
def test_crontab_keyword_form_builds_the_expression(
    keywords: dict[str, object], expression: str
) -> None:
    assert crontab(**keywords).expression == expression  # type: ignore[arg-type]


def test_crontab_keyword_hours_every_two_hours_ticks_on_the_hour() -> None:
    schedule = crontab(hours="*/2")
    ticks = list(schedule.ticks_between(datetime(2024, 3, 1, 0, 30), datetime(2024, 3, 1, 7, 0)))
    assert ticks == [datetime(2024, 3, 1, h) for h in (2, 4, 6)]


@pytest.mark.parametrize(
    "call",
    [
        lambda: crontab(),
        lambda: crontab("* * * * *", hours="1"),
        lambda: crontab("not a cron"),
        lambda: crontab("* * * *"),
        lambda: crontab("0 0 * * * *"),
        lambda: crontab("61 * * * *"),
        lambda: crontab(hours="1 2"),
    ],
)
def test_crontab_refuses_bad_expressions_and_arguments(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]


def test_crontab_in_a_time_zone_returns_utc_ticks() -> None:
    schedule = crontab(hours="9", tz="Europe/Berlin")
    # 09:00 in Berlin is 08:00 UTC in winter (CET) and 07:00 UTC in summer (CEST).
    assert schedule.latest(datetime(2024, 1, 15, 12, 0)) == datetime(2024, 1, 15, 8, 0)
    assert schedule.latest(datetime(2024, 7, 15, 12, 0)) == datetime(2024, 7, 15, 7, 0)


def test_schedules_are_exported_from_the_package_root() -> None:
    assert lilota.every is every and lilota.crontab is crontab
    assert isinstance(every(timedelta(seconds=1)), Every)
    assert isinstance(crontab(hours="*/2"), Crontab)


# --------------------------------------------------------------------------- planner


def test_planner_gives_the_latest_tick_first_and_no_tick_twice() -> None:
    planner = TickPlanner({"t": every(timedelta(seconds=10))})
    now = datetime(2024, 1, 1, 0, 0, 25)
    assert planner.due(now) == [("t", datetime(2024, 1, 1, 0, 0, 20))]
    planner.done("t", datetime(2024, 1, 1, 0, 0, 20))
    assert planner.due(now + timedelta(seconds=4)) == []
    assert planner.due(now + timedelta(seconds=5)) == [("t", datetime(2024, 1, 1, 0, 0, 30))]


def test_planner_after_downtime_gives_only_the_most_recent_missed_tick() -> None:
    planner = TickPlanner({"t": every(timedelta(seconds=10))})
    planner.done("t", datetime(2024, 1, 1, 0, 0, 0))
    later = datetime(2024, 1, 1, 1, 0, 5)  # 360 ticks were missed
    assert planner.due(later) == [("t", datetime(2024, 1, 1, 1, 0, 0))]


def test_planner_next_due_is_the_earliest_next_tick() -> None:
    planner = TickPlanner({"a": every(timedelta(seconds=10)), "b": crontab("* * * * *")})
    now = datetime(2024, 1, 1, 0, 0, 25)
    planner.done("a", datetime(2024, 1, 1, 0, 0, 20))
    planner.done("b", datetime(2024, 1, 1, 0, 0, 0))
    assert planner.next_due(now) == datetime(2024, 1, 1, 0, 0, 30)
    assert TickPlanner({}).next_due(now) is None


# --------------------------------------------------------------------------- ticks in the store


def _ticks(store: TaskStore, name: str) -> list[tuple[datetime, str]]:
    tasks = store.list_tasks(name=name, limit=1000)
    # Task times are aware UTC datetimes; the schedules speak naive UTC like the store.
    return sorted((t.run_at.replace(tzinfo=None), t.status.value) for t in tasks)


def test_each_tick_is_one_task_however_many_processes_fire_it(
    store: TaskStore, clock: FakeClock
) -> None:
    clock.now = datetime(2024, 1, 1, 12, 0, 0, 300_000)
    schedules = {"tick": every(timedelta(seconds=1))}
    threads = [TickThread(store, schedules, max_attempts={"tick": 3}) for _ in range(4)]
    created = [thread.fire_due() for thread in threads]
    assert sum(len(ids) for ids in created) == 1
    for _ in range(4):
        clock.advance(seconds=1)
        created = [thread.fire_due() for thread in threads]
        assert sum(len(ids) for ids in created) == 1
    ticks = _ticks(store, "tick")
    assert [run_at for run_at, _ in ticks] == [datetime(2024, 1, 1, 12, 0, s) for s in range(5)]
    task = store.list_tasks(name="tick", limit=1)[0]
    assert task.max_attempts == 3
    assert task.input is None


def test_ticks_missed_while_no_process_ran_are_not_replayed(
    store: TaskStore, clock: FakeClock
) -> None:
    clock.now = datetime(2024, 1, 1, 12, 0, 0)
    schedules = {"tick": every(timedelta(seconds=1))}
    TickThread(store, schedules).fire_due()
    clock.advance(seconds=30.5)  # every process was down for 30 ticks
    restarted = TickThread(store, schedules)
    assert len(restarted.fire_due()) == 1
    assert restarted.fire_due() == []
    assert [run_at for run_at, _ in _ticks(store, "tick")] == [
        datetime(2024, 1, 1, 12, 0, 0),
        datetime(2024, 1, 1, 12, 0, 30),
    ]


def test_a_restarted_process_does_not_recreate_a_tick_that_already_ran(
    store: TaskStore, clock: FakeClock
) -> None:
    clock.now = datetime(2024, 1, 1, 12, 0, 0, 500_000)
    # catch_up: the 03:00 tick is made at 12:00, to see the database keep it unique.
    schedules = {"nightly": crontab(hours="3", catch_up=True)}
    (task_id,) = TickThread(store, schedules).fire_due()
    assert _ticks(store, "nightly") == [(datetime(2024, 1, 1, 3, 0), "pending")]
    store.cancel(task_id)  # finished (here: cancelled) tasks keep their tick
    clock.advance(hours=1)
    assert TickThread(store, schedules).fire_due() == []
    assert len(_ticks(store, "nightly")) == 1


def test_a_nightly_task_first_started_in_the_afternoon_waits_for_the_next_night(
    store: TaskStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    clock.now = datetime(2024, 1, 1, 18, 41)  # a fresh database; the 03:00 tick is 15 h old
    thread = TickThread(store, {"nightly": crontab("0 3 * * *")})
    with caplog.at_level(logging.INFO, logger="lilota.schedules"):
        assert thread.fire_due() == []
    assert _ticks(store, "nightly") == []
    (record,) = [r for r in caplog.records if "skipping" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "nightly" in record.getMessage() and "2024-01-01 03:00:00" in record.getMessage()
    assert thread.planner.next_due(clock.now) == datetime(2024, 1, 2, 3, 0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lilota.schedules"):
        assert thread.fire_due() == []  # logged once, not at every look
    assert caplog.records == []
    clock.now = datetime(2024, 1, 2, 3, 0, 0, 5_000)
    assert len(thread.fire_due()) == 1
    # A process started 59 minutes after the tick still makes it (within the hour).
    clock.now = datetime(2024, 1, 3, 3, 59)
    assert len(TickThread(store, {"nightly": crontab("0 3 * * *")}).fire_due()) == 1
    assert _ticks(store, "nightly") == [
        (datetime(2024, 1, 2, 3, 0), "pending"),
        (datetime(2024, 1, 3, 3, 0), "pending"),
    ]


def test_max_lateness_is_settable_per_schedule(store: TaskStore, clock: FakeClock) -> None:
    five_minutes = every(timedelta(minutes=5), max_lateness=timedelta(seconds=30))
    clock.now = datetime(2024, 1, 1, 10, 0, 45)
    assert TickThread(store, {"a": five_minutes}).fire_due() == []
    clock.now = datetime(2024, 1, 1, 10, 5, 20)
    assert len(TickThread(store, {"a": five_minutes}).fire_due()) == 1
    nightly = crontab("0 3 * * *", max_lateness=timedelta(hours=16))
    assert len(TickThread(store, {"b": nightly}).fire_due()) == 1  # 7 h 5 min late
    assert [run_at for run_at, _ in _ticks(store, "a")] == [datetime(2024, 1, 1, 10, 5)]
    assert [run_at for run_at, _ in _ticks(store, "b")] == [datetime(2024, 1, 1, 3, 0)]


def test_catch_up_runs_the_latest_missed_tick_however_late(
    store: TaskStore, clock: FakeClock
) -> None:
    clock.now = datetime(2024, 1, 1, 18, 41)
    schedule = crontab(hours="3", catch_up=True)
    assert len(TickThread(store, {"nightly": schedule}).fire_due()) == 1
    assert _ticks(store, "nightly") == [(datetime(2024, 1, 1, 3, 0), "pending")]
    clock.advance(days=3)  # and still only the latest one after days of downtime
    assert len(TickThread(store, {"nightly": schedule}).fire_due()) == 1
    assert [run_at for run_at, _ in _ticks(store, "nightly")][-1] == datetime(2024, 1, 4, 3, 0)
    assert len(_ticks(store, "nightly")) == 2


def test_a_tick_that_an_outage_made_too_late_is_skipped(
    store: TaskStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock.now = datetime(2024, 1, 1, 3, 0, 0, 10_000)
    thread = TickThread(store, {"nightly": crontab(hours="3")})

    def unavailable(task: object) -> int:
        raise DatabaseError("database unavailable")

    monkeypatch.setattr(store, "add", unavailable)
    assert thread.fire_due() == [] and thread.failed
    monkeypatch.undo()
    clock.now = datetime(2024, 1, 1, 4, 30)  # back after 90 minutes: too late for 03:00
    assert thread.fire_due() == [] and not thread.failed
    assert _ticks(store, "nightly") == []


def test_default_max_lateness_is_the_smaller_of_the_period_and_an_hour() -> None:
    tick = datetime(2024, 1, 1, 3, 0)
    assert every(timedelta(minutes=5)).lateness_limit(tick) == timedelta(minutes=5)
    assert every(timedelta(hours=2)).lateness_limit(tick) == timedelta(hours=1)
    assert crontab("0 3 * * *").lateness_limit(tick) == timedelta(hours=1)
    assert crontab("*/10 * * * *").lateness_limit(tick) == timedelta(minutes=10)
    assert crontab("0 3 * * *", max_lateness=timedelta(hours=5)).lateness_limit(tick) == (
        timedelta(hours=5)
    )
    assert crontab("0 3 * * *", catch_up=True).lateness_limit(tick) is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: every(timedelta(minutes=5), max_lateness=timedelta(0)), "positive timedelta"),
        (lambda: every(timedelta(minutes=5), max_lateness=30), "positive timedelta"),
        (lambda: crontab("0 3 * * *", max_lateness=timedelta(seconds=-1)), "positive"),
        (
            lambda: crontab("0 3 * * *", max_lateness=timedelta(hours=2), catch_up=True),
            "not both",
        ),
        (lambda: crontab(hours="3", catch_up="yes"), "True or False"),
    ],
)
def test_lateness_options_are_validated(call: object, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        call()  # type: ignore[operator]


def test_lateness_options_show_in_the_repr_and_equality() -> None:
    assert repr(crontab("0 3 * * *", catch_up=True)) == "crontab('0 3 * * *', catch_up=True)"
    assert "max_lateness=" in repr(every(timedelta(minutes=5), max_lateness=timedelta(1)))
    assert crontab(hours="3") != crontab(hours="3", catch_up=True)


def test_schedule_key_names_the_task_and_the_tick() -> None:
    assert schedule_key("tick", datetime(2024, 1, 1, 12, 0, 5)) == (
        "tick@2024-01-01T12:00:05.000000"
    )


# --------------------------------------------------------------------------- registration


def test_periodic_task_must_not_require_an_input() -> None:
    registry = Registry()
    with pytest.raises(RegistrationError, match="give it a default"):

        @registry.register("p", schedule=every(timedelta(seconds=1)))
        def p(data: dict) -> None:  # type: ignore[type-arg]
            pass

    @registry.register("q", schedule=every(timedelta(seconds=1)))
    def q(data: dict | None = None) -> None:  # type: ignore[type-arg]
        pass

    assert registry.get("q").schedule == every(timedelta(seconds=1))


def test_cpu_bound_task_must_be_defined_at_module_level() -> None:
    registry = Registry()
    with pytest.raises(RegistrationError, match="module level"):

        @registry.register("local", cpu_bound=True)
        def local() -> None:
            pass


def test_async_and_cpu_bound_tasks_run_on_the_event_loop_thread() -> None:
    registry = Registry()

    async def coroutine() -> None:
        pass

    def plain() -> None:
        pass

    registry.register("coroutine", coroutine)
    registry.register("plain", plain)
    registry.register("heavy", cpu_fib_like, cpu_bound=True)
    assert registry.get("coroutine").runs_on_loop
    assert not registry.get("plain").runs_on_loop
    assert registry.get("heavy").runs_on_loop and registry.get("heavy").cpu_bound


def cpu_fib_like() -> int:
    return 1


def test_async_concurrency_defaults_to_10_and_is_validated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert WorkerSettings().async_concurrency == 10
    assert WorkerSettings().cpu_bound_processes == 1
    with pytest.raises(ConfigurationError):
        WorkerSettings(async_concurrency=0)
    with pytest.raises(ConfigurationError):
        lilota.Lilota("sqlite://", async_concurrency=-1)
    monkeypatch.setenv(ENV_ASYNC_CONCURRENCY, "20")
    assert WorkerSettings.from_env().async_concurrency == 20
    assert WorkerSettings.from_env(async_concurrency=5).async_concurrency == 5


def test_every_and_crontab_are_not_equal_to_other_schedules() -> None:
    assert every(timedelta(seconds=60)) != crontab("* * * * *")
    assert crontab("0 * * * *") == crontab(minutes=0)
    assert crontab("0 * * * *").tz is timezone.utc
