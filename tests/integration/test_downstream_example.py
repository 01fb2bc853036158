"""The README's "Testing your app with lilota" example, run as a user's project runs it.

The files below are the example, byte for byte as the README shows them. The test writes
them into an empty directory and runs ``pytest`` there in a subprocess: the plugin comes
from the installed package's ``pytest11`` entry point, as in any project that installed
lilota; nothing of lilota's own test suite is on the path.
"""

from __future__ import annotations

import os
import textwrap
from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]

PYPROJECT = """\
# pyproject.toml
[tool.pytest.ini_options]
pythonpath = ["."]
# Every test using lilota_db_url (so lilota_app and lilota_inline) runs on both.
lilota_backends = "sqlite,postgres"
"""

TASKS = """\
# myapp/tasks.py
import logging
import os
from dataclasses import dataclass

from lilota import Lilota
from lilota.context import TaskContext

lilota = Lilota(os.environ.get("MYAPP_DB_URL", "sqlite:///myapp.db"))
log = logging.getLogger(__name__)


@dataclass
class Order:
    id: int
    prices: list[int]  # cents


@dataclass
class Invoice:
    order_id: int
    total: int


def send_mail(to: str, text: str) -> None:
    log.info("mail to %s: %s", to, text)  # the real one talks to an SMTP server


@lilota.register("invoice", input_model=Order, output_model=Invoice)
def invoice(order: Order, ctx: TaskContext) -> Invoice:
    if not order.prices:
        raise ValueError(f"order {order.id} has no items")
    total = 0
    for n, price in enumerate(order.prices, 1):
        total += price
        ctx.progress.set(100 * n // len(order.prices))
    ctx.schedule("mail-invoice", {"order_id": order.id, "total": total})
    return Invoice(order_id=order.id, total=total)


@lilota.register("mail-invoice", max_attempts=5)
def mail_invoice(data: dict) -> None:
    send_mail(f"customer-{data['order_id']}@example.com", f"Total: {data['total'] / 100:.2f}")
"""

SHOP = """\
# myapp/shop.py
from lilota import Lilota

from myapp import tasks


def checkout(order: tasks.Order, queue: Lilota = tasks.lilota) -> int:
    \"\"\"Books the order and queues its invoice; returns the invoice task's id.\"\"\"
    return queue.schedule("invoice", order, unique_key=f"invoice-{order.id}")
"""

CONFTEST = """\
# tests/conftest.py
import pytest

import myapp.tasks


@pytest.fixture
def lilota_app_options():
    # The Lilota that lilota_app and lilota_inline make: the app's tasks, 2 workers.
    return {"registry": myapp.tasks.lilota.registry, "number_of_workers": 2}
"""

TESTS = """\
# tests/test_invoices.py
from lilota import TaskStatus
from lilota.testing import eager, run_pending, wait_for

import myapp.tasks
from myapp.shop import checkout
from myapp.tasks import Invoice, Order


def test_invoice_in_a_worker_process(lilota_app):
    task_id = lilota_app.schedule("invoice", Order(id=1, prices=[250, 100]))
    task = wait_for(lilota_app, task_id, timeout=30)  # fails the test with the task's state
    assert task.status is TaskStatus.COMPLETED
    assert Invoice(**task.output) == Invoice(order_id=1, total=350)


def test_invoice_inline_mails_the_total(lilota_inline, monkeypatch):
    sent = []
    monkeypatch.setattr(myapp.tasks, "send_mail", lambda to, text: sent.append((to, text)))
    lilota_inline.schedule("invoice", Order(id=2, prices=[500, 199]))
    invoice, mail = run_pending(lilota_inline)  # in this process; follow-ups too
    assert invoice.output == {"order_id": 2, "total": 699}
    assert invoice.progress_percentage == 100
    assert mail.name == "mail-invoice" and mail.status is TaskStatus.COMPLETED
    assert sent == [("customer-2@example.com", "Total: 6.99")]


def test_an_empty_order_fails(lilota_inline):
    lilota_inline.schedule("invoice", Order(id=3, prices=[]))
    task = run_pending(lilota_inline)[-1]  # after its last attempt
    assert task.status is TaskStatus.FAILED
    assert (task.exception.type, task.exception.message) == ("ValueError", "order 3 has no items")


def test_a_mail_that_fails_once_is_retried(lilota_inline, monkeypatch):
    def smtp_down_once(to, text):
        monkeypatch.setattr(myapp.tasks, "send_mail", lambda to, text: None)
        raise ConnectionError("SMTP server down")

    monkeypatch.setattr(myapp.tasks, "send_mail", smtp_down_once)
    lilota_inline.schedule("mail-invoice", {"order_id": 4, "total": 100})
    first, second = run_pending(lilota_inline)  # the retry runs at once
    assert first.status is TaskStatus.PENDING and first.exception.type == "ConnectionError"
    assert (second.status, second.attempts) == (TaskStatus.COMPLETED, 2)


def test_checkout_eagerly(lilota_inline):
    with eager(lilota_inline):  # schedule() runs the tasks before it returns
        task_id = checkout(Order(id=5, prices=[100]), queue=lilota_inline)
    assert lilota_inline.get_task_by_id(task_id).output == {"order_id": 5, "total": 100}
    assert lilota_inline.store.count_by_status()["completed"] == 2
"""

EXAMPLE = {
    "pyproject.toml": PYPROJECT,
    "myapp/__init__.py": "",
    "myapp/tasks.py": TASKS,
    "myapp/shop.py": SHOP,
    "tests/conftest.py": CONFTEST,
    "tests/test_invoices.py": TESTS,
}


def _plugin_is_autoloaded() -> bool:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "lilota.testing" for ep in entry_points(group="pytest11"))


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_the_readme_example_passes_in_a_project_of_its_own(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    for name in list(os.environ):
        if name.startswith(("LILOTA_TEST_", "PYTEST_")) or name in ("CI", "PYTHONPATH"):
            monkeypatch.delenv(name)
    if backend == "postgres":
        monkeypatch.setenv(
            "LILOTA_TEST_POSTGRES_URL", request.getfixturevalue("lilota_postgres").url
        )
    for path, text in EXAMPLE.items():
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    # As a user would run it; only the backend is chosen here (the example's pyproject
    # asks for both), and warnings are errors, so a leaked connection or file shows.
    plugin = [] if _plugin_is_autoloaded() else ["-p", "lilota.testing"]
    result = pytester.runpytest_subprocess(
        *plugin,
        f"--lilota-backend={backend}",
        "-W",
        "error",
        "-p",
        "no:cacheprovider",
        timeout=180,
    )
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines([f"lilota backends: {backend}"])
    assert not (pytester.path / "myapp.db").exists()  # the app's own database was not used


def test_the_example_files_are_what_the_readme_shows() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    if "## Testing your app with lilota" not in readme:
        pytest.skip("the README has no 'Testing your app with lilota' section yet")
    for path, text in EXAMPLE.items():
        if text:
            assert textwrap.dedent(text).strip() in readme, f"{path} differs from the README"
