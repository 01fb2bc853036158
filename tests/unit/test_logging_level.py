"""The earlier release's keywords: ``logging_level=`` on Lilota, LilotaWorker and TaskRunner,
and TaskRunner's ``number_of_processes=``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lilota import Lilota, LilotaWorker
from lilota.errors import ConfigurationError
from lilota.runner import TaskRunner


@pytest.fixture(autouse=True)
def lilota_level() -> Iterator[None]:
    logger = logging.getLogger("lilota")
    before = logger.level
    logger.setLevel(logging.NOTSET)
    yield
    logger.setLevel(before)


def _makers(tmp_path: Path) -> dict[str, Callable[..., Any]]:
    url = f"sqlite:///{tmp_path}/x.db"
    return {
        "Lilota": lambda **kw: Lilota(url, number_of_workers=0, **kw),
        "LilotaWorker": lambda **kw: LilotaWorker(url, **kw),
        "TaskRunner": lambda **kw: TaskRunner(url, **kw),
    }


@pytest.mark.parametrize("cls", ["Lilota", "LilotaWorker", "TaskRunner"])
@pytest.mark.parametrize(
    ("given", "level"), [("DEBUG", logging.DEBUG), ("warning", logging.WARNING), (15, 15)]
)
def test_logging_level_sets_the_level_of_the_lilota_logger(
    tmp_path: Path, cls: str, given: int | str, level: int
) -> None:
    _makers(tmp_path)[cls](logging_level=given)
    assert logging.getLogger("lilota").level == level
    assert logging.getLogger("lilota.worker").getEffectiveLevel() == level


@pytest.mark.parametrize("cls", ["Lilota", "LilotaWorker", "TaskRunner"])
def test_without_logging_level_the_lilota_logger_is_left_alone(tmp_path: Path, cls: str) -> None:
    logging.getLogger("lilota").setLevel(logging.ERROR)
    _makers(tmp_path)[cls]()
    assert logging.getLogger("lilota").level == logging.ERROR


@pytest.mark.parametrize("cls", ["Lilota", "LilotaWorker", "TaskRunner"])
@pytest.mark.parametrize("bad", ["LOUD", -1, True, 1.5, ""])
def test_a_bad_logging_level_raises_naming_it(tmp_path: Path, cls: str, bad: object) -> None:
    with pytest.raises(ConfigurationError, match=rf"^logging_level must be .*got {bad!r}$"):
        _makers(tmp_path)[cls](logging_level=bad)
    assert logging.getLogger("lilota").level == logging.NOTSET


def test_number_of_processes_is_the_earlier_name_of_number_of_workers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    assert TaskRunner(url, number_of_processes=3).number_of_workers == 3
    assert TaskRunner(url, 2).number_of_workers == 2
    with pytest.raises(ConfigurationError, match="number_of_workers or number_of_processes"):
        TaskRunner(url, number_of_workers=2, number_of_processes=2)
    with pytest.raises(ConfigurationError, match="number_of_processes"):
        TaskRunner(url, number_of_processes=0)


@pytest.mark.parametrize("cls", ["Lilota", "LilotaWorker"])
def test_log_level_is_the_new_name_and_giving_both_is_refused(tmp_path: Path, cls: str) -> None:
    make = _makers(tmp_path)[cls]
    make(log_level="debug")
    assert logging.getLogger("lilota").level == logging.DEBUG
    with pytest.raises(ConfigurationError, match="log_level or logging_level"):
        make(log_level="info", logging_level="info")
    with pytest.raises(ConfigurationError, match="log_level must be a logging level"):
        make(log_level="verbose")


def test_a_bad_level_in_the_environment_is_refused_by_start_before_any_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LILOTA_LOG_LEVEL", "verbose")
    lilota = Lilota(f"sqlite:///{tmp_path}/x.db", number_of_workers=2)

    @lilota.worker_init
    def init() -> None:  # pragma: no cover - must not run: no worker starts
        raise AssertionError("a worker started")

    with pytest.raises(ConfigurationError, match=r"\$LILOTA_LOG_LEVEL must be a logging level"):
        lilota.start()
    assert lilota.worker_pids == []
