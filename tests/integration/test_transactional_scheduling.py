"""schedule(..., connection=...): the task row is written in the application's transaction.

Every test runs on SQLite and PostgreSQL. The application's side is plain SQLAlchemy (its
own engine, Connection or ORM Session), as a web app's is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from lilota import Lilota, TaskStatus
from lilota.errors import ConfigurationError, InvalidArgument, InvalidArgumentType, InvalidInput
from lilota.settings import ENV_SETTINGS, WorkerSettings
from tests.integration.apps import tasks
from tests.integration.apps.tasks import AddInput


@pytest.fixture
def app(lilota_db_url: str) -> Iterator[Lilota]:
    """A scheduler (no workers) whose tables exist, knowing the tasks of apps/tasks.py."""
    lilota = Lilota(lilota_db_url, number_of_workers=0, registry=tasks.app.registry)
    lilota.start()
    yield lilota
    lilota.stop()
    lilota.store.dispose()


@pytest.fixture
def engine(lilota_db_url: str) -> Iterator[sa.Engine]:
    """The application's own engine on the same database."""
    own = sa.create_engine(lilota_db_url)
    yield own
    own.dispose()


def count(app: Lilota) -> int:
    return sum(app.store.count_by_status().values())


def test_a_task_scheduled_in_a_transaction_appears_when_it_commits(
    app: Lilota, engine: sa.Engine
) -> None:
    with engine.connect() as conn:
        task_id = app.schedule("add", AddInput(a=1, b=2), connection=conn)
        assert app.get_task_by_id(task_id) is None  # invisible to everyone else until commit
        conn.commit()
    task = app.get_task_by_id(task_id)
    assert task is not None and task.status is TaskStatus.PENDING
    assert task.input == {"a": 1, "b": 2}


def test_a_task_scheduled_in_a_transaction_is_gone_when_it_rolls_back(
    app: Lilota, engine: sa.Engine
) -> None:
    with engine.connect() as conn:
        app.schedule("add", AddInput(a=1, b=2), connection=conn)
        app.schedule_many("record", [{"n": 1}, {"n": 2}], connection=conn)
        conn.rollback()
    assert count(app) == 0


def test_schedule_many_in_a_transaction_commits_every_task_with_it(
    app: Lilota, engine: sa.Engine
) -> None:
    with engine.begin() as conn:
        ids = app.schedule_many("record", [{"n": n} for n in range(3)], connection=conn)
        assert app.store.get_many(ids) == {}
    assert [app.get_task_by_id(i).input for i in ids] == [{"n": 0}, {"n": 1}, {"n": 2}]  # type: ignore[union-attr]


def test_an_orm_session_commits_the_task_with_the_application_rows(
    app: Lilota, engine: sa.Engine
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER)"))
    with Session(engine) as session:
        session.execute(sa.text("INSERT INTO orders (id, total) VALUES (1, 30)"))
        kept = app.schedule("add", AddInput(a=10, b=20), connection=session)
        session.commit()
    with Session(engine) as session:
        session.execute(sa.text("INSERT INTO orders (id, total) VALUES (2, 40)"))
        dropped = app.schedule("add", AddInput(a=20, b=20), connection=session)
        session.rollback()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id FROM orders")).scalars().all() == [1]
    assert app.get_task_by_id(kept) is not None
    assert app.get_task_by_id(dropped) is None


def test_sqlite_caller_holding_the_write_lock_writes_the_task_itself(
    app: Lilota, engine: sa.Engine
) -> None:
    # The application's transaction wrote first: on SQLite it holds the only write lock.
    # Were the task written on another connection, it would wait for that lock (the busy
    # timeout) and fail; the caller's connection writes it instead.
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TABLE audit (note TEXT)"))
        conn.execute(sa.text("INSERT INTO audit VALUES ('order saved')"))
        first = app.schedule("add", AddInput(a=1, b=1), connection=conn, unique_key="k")
        again = app.schedule("add", AddInput(a=1, b=1), connection=conn, unique_key="k")
        conn.commit()
    assert first == again  # the key is held by the task of the same transaction
    assert count(app) == 1


def test_bad_connections_are_refused_and_nothing_is_written(app: Lilota, engine: sa.Engine) -> None:
    with pytest.raises(InvalidArgumentType, match=r"connection must be a SQLAlchemy Connection"):
        app.schedule("add", AddInput(a=1, b=2), connection="conn")
    with pytest.raises(InvalidArgumentType, match=r"got Engine\(.*\) \(Engine\)"):
        app.schedule_many("record", [{"n": 1}], connection=engine)
    conn = engine.connect()
    conn.close()
    with pytest.raises(InvalidArgument, match="connection is closed"):
        app.schedule("add", AddInput(a=1, b=2), connection=conn)
    with pytest.raises(InvalidArgument, match="bound to no engine"):
        app.schedule("add", AddInput(a=1, b=2), connection=Session())
    with engine.connect() as conn:  # input errors come first, as without a connection
        with pytest.raises(InvalidInput):
            app.schedule("add", {"a": "x"}, connection=conn)
        assert not conn.in_transaction()
    assert count(app) == 0


def test_a_connection_to_another_database_is_refused(
    app: Lilota, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if app.store.is_sqlite:
        other_url = f"sqlite:///{tmp_path / 'other.db'}"
    else:
        other_url = request.getfixturevalue("lilota_postgres").create_database()
    other = Lilota(other_url, number_of_workers=0)
    other.start()  # lilota's tables there too: only where they are differs
    other_engine = sa.create_engine(other_url)
    try:
        with other_engine.connect() as conn:
            with pytest.raises(InvalidArgument, match="connection is to another database"):
                app.schedule("add", AddInput(a=1, b=2), connection=conn)
            with pytest.raises(InvalidArgument, match="connection is to another database"):
                app.schedule_many("record", [{"n": 1}], connection=conn)
            conn.commit()
        assert count(app) == 0 and count(other) == 0
    finally:
        other_engine.dispose()
        other.store.dispose()


@pytest.mark.lilota_backends(
    "postgres"
)  # the PostgreSQL run checks a SQLite connection; either way is one check
def test_a_connection_of_another_backend_is_refused(app: Lilota, tmp_path: Path) -> None:
    other = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with other.connect() as conn, pytest.raises(InvalidArgument, match="to a sqlite database"):
        app.schedule("add", AddInput(a=1, b=2), connection=conn)
    assert count(app) == 0


def test_without_lilota_tables_the_caller_is_told_to_create_them(
    lilota_db_url: str, engine: sa.Engine
) -> None:
    fresh = Lilota(lilota_db_url, number_of_workers=0, registry=tasks.app.registry)
    try:
        with engine.connect() as conn:
            with pytest.raises(ConfigurationError, match=r"create them first \(Lilota.start\(\)"):
                fresh.schedule("add", AddInput(a=1, b=2), connection=conn)
            assert not sa.inspect(conn).has_table("lilota_task")
    finally:
        fresh.store.dispose()


@pytest.fixture
def idle_worker_app(lilota_db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lilota]:
    """A Lilota with one worker whose idle poll is an hour: only a wake-up starts a task
    scheduled while it is idle (within a test's time)."""
    monkeypatch.setenv(ENV_SETTINGS, WorkerSettings(idle_poll=3600.0).to_json())
    lilota = Lilota(lilota_db_url, number_of_workers=1, registry=tasks.app.registry)
    lilota.start()
    yield lilota
    lilota.stop(timeout=30)
    lilota.store.dispose()


def test_an_idle_worker_is_woken_by_the_commit(idle_worker_app: Lilota, engine: sa.Engine) -> None:
    app = idle_worker_app
    warm_up = app.schedule("add", AddInput(a=0, b=0))
    assert app.wait(warm_up, timeout=60).status is TaskStatus.COMPLETED  # now it is idle
    with engine.connect() as conn:
        task_id = app.schedule("add", AddInput(a=2, b=3), connection=conn)
        conn.commit()
    # Without a wake-up sent on commit, the worker would look again only after an hour.
    task = app.wait(task_id, timeout=60)
    assert task.status is TaskStatus.COMPLETED and task.output == {"sum": 5}
