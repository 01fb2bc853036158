"""Shared fixtures of lilota's own test suite.

The PostgreSQL and SQLite database fixtures (``lilota_db_url`` and friends) come from
lilota's pytest plugin, ``lilota.testing``; pyproject.toml runs every test that uses
``lilota_db_url`` on both backends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from hypothesis import HealthCheck, settings

from lilota.store import TaskStore, utcnow

# Hypothesis: "quick" for local runs, "ci" (more examples) when CI is set.
settings.register_profile(
    "quick", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "quick")
)


class FakeClock:
    """A clock for the store that moves only when told to (naive UTC, like the store's)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(lilota_db_url: str, clock: FakeClock) -> Iterator[TaskStore]:
    """A TaskStore with its schema, on each backend, with a clock the test controls."""
    task_store = TaskStore(lilota_db_url, clock=clock)
    task_store.ensure_schema()
    yield task_store
    task_store.dispose()
