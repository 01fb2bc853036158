"""The dashboard in a real headless Chromium, against a real server and real workers.

Needs Debian's ``chromium`` (``apt-get install chromium``; another binary with
``LILOTA_CHROMIUM=/path``) and ``pip install playwright`` (no ``playwright install``: the
system Chromium is used). Without them these tests skip, except when ``CI`` is set: then
they fail, so that CI cannot pass without running them. Select them with ``-m e2e``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from lilota import Lilota, TaskStatus

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("LILOTA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "e2e-token-0123456789"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
WAIT_MS = 30_000  # longest wait for something to show up on the page

XSS_NAME = "<script>window.__xss='name'</script>"
XSS_INPUT = {
    "html": "<script>window.__xss=1</script>",
    "img": '<img src=x onerror="window.__xss=2">',
}
XSS_DESCRIPTION = '<img src=x onerror="window.__xss=3">'

WORKER_SCRIPT = """
import pathlib
import time

from lilota import LilotaWorker, TaskProgress

worker = LilotaWorker({db_url!r})


@worker.register("resize_image", task_progress=TaskProgress)
def resize_image(data, progress):
    # Progress in steps of 10 up to hold_at, then waits for the test's gate file.
    for pct in range(10, data["hold_at"] + 1, 10):
        progress.set(pct)
    gate = pathlib.Path(data["gate"])
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    for pct in range(data["hold_at"] + 10, 101, 10):
        progress.set(pct)
    return {{"thumbnail": data["path"].replace(".png", "_thumb.png")}}


@worker.register("send_email")
def send_email(data):
    return {{"sent_to": data["to"]}}


@worker.register("import_csv", max_attempts=1)
def import_csv(data):
    raise ValueError(f"row 3 of {{data['file']}}: expected 4 columns, got 3")


worker.start()
"""


def _missing() -> str | None:
    """Why the e2e tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return "the dashboard extra is not installed (pip install 'lilota[dashboard]')"
    if not os.path.isfile(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LILOTA_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"e2e tests must run in CI: {missing}", pytrace=False)
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


class Page:
    """A browser tab plus what its console said (CSP violations would show up there)."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda message: self.console.append(message.text))
        self.page.on("pageerror", lambda error: self.console.append(f"page error: {error}"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any) -> Iterator[Page]:
    page = Page(browser)
    yield page
    page.close()


class Server:
    """The dashboard served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + WAIT_MS / 1000
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the dashboard server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=WAIT_MS / 1000)
        self.sock.close()


@pytest.fixture
def serve(browser: Any) -> Iterator[Callable[..., Server]]:
    """Starts dashboards: serve(db_url, token=None) -> Server."""
    from lilota.dashboard import create_app

    servers: list[Server] = []

    def start(db_url: str, token: str | None = None) -> Server:
        server = Server(create_app(db_url, token=token)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def start_workers(directory: Path) -> Lilota:
    db_url = f"sqlite:///{directory / 'lilota.db'}"
    script = directory / "worker.py"
    script.write_text(textwrap.dedent(WORKER_SCRIPT.format(db_url=db_url)))
    lilota = Lilota(db_url, script_path=script, number_of_workers=1)
    lilota.start()
    return lilota


@pytest.fixture(scope="module")
def workers(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lilota]:
    """One worker process running the tasks of WORKER_SCRIPT, for this module."""
    directory = tmp_path_factory.mktemp("workers")
    lilota = start_workers(directory)
    yield lilota
    for gate in directory.glob("gate-*"):
        gate.touch()
    lilota.stop(timeout=60)


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[Lilota]:
    """A Lilota with no workers (tasks stay pending) on a fresh database."""
    lilota = Lilota(f"sqlite:///{tmp_path / 'lilota.db'}", number_of_workers=0)
    lilota.store.ensure_schema()
    yield lilota
    lilota.store.dispose()


def fetch_status(page: Any, path: str, method: str = "GET") -> int:
    """The HTTP status of a fetch() made by the page itself (its cookies, its origin)."""
    return int(
        page.evaluate(
            "async ([path, method]) => (await fetch(path, {method})).status", [path, method]
        )
    )


# ---------------------------------------------------------------------- live updates


def test_a_task_scheduled_while_the_page_is_open_appears_and_its_progress_reaches_100(
    tab: Page, serve: Callable[..., Server], workers: Lilota, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = tab.page
    page.goto(serve(workers.db_url).url)
    expect(page.locator("#live")).to_have_text("live")
    gate = tmp_path / "gate-progress"
    task_id = workers.schedule(
        "resize_image", {"gate": str(gate), "hold_at": 40, "path": "/photos/cat.png"}
    )
    row = page.locator(f'tr[data-id="{task_id}"]')
    bar = row.locator("progress")
    expect(row).to_be_visible()
    # The task holds at 40 % until the gate opens: the bar shows it running part way...
    expect(row).to_have_attribute("data-status", "running")
    expect(bar).to_have_js_property("value", 40)
    expect(row.locator(".pct")).to_have_text("40%")
    gate.touch()
    # ...and then, without a reload, moves to 100 and the task completes.
    expect(bar).to_have_js_property("value", 100)
    expect(row).to_have_attribute("data-status", "completed")
    expect(page.locator("#count-completed .n")).not_to_have_text("0")
    assert workers.wait(task_id, timeout=30).status is TaskStatus.COMPLETED


def test_the_task_page_shows_input_attempts_and_a_readable_traceback(
    tab: Page, serve: Callable[..., Server], workers: Lilota
) -> None:
    from playwright.sync_api import expect

    task_id = workers.schedule("import_csv", {"file": "orders.csv"})
    assert workers.wait(task_id, timeout=30).status is TaskStatus.FAILED
    page = tab.page
    page.goto(serve(workers.db_url).url + f"tasks/{task_id}")
    expect(page.locator("#t-status")).to_have_text("failed")
    expect(page.locator("#t-exception")).to_have_text(
        "ValueError: row 3 of orders.csv: expected 4 columns, got 3"
    )
    traceback = page.locator("pre#t-traceback")
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text('raise ValueError(f"row 3 of')
    # Multi-line, as written: a <pre> keeps the line breaks.
    assert traceback.inner_text().count("\n") >= 3
    assert json.loads(page.locator("#t-input").inner_text()) == {"file": "orders.csv"}
    fields = page.locator("#t-fields").inner_text()
    assert "Attempts\n1 of 1" in fields.replace("\t", "\n")
    expect(page.locator("#t-retry")).to_be_visible()
    expect(page.locator("#t-cancel")).to_be_hidden()


# ---------------------------------------------------------------------- actions


def test_cancel_on_the_page_cancels_a_pending_task(
    tab: Page, serve: Callable[..., Server], scheduler: Lilota
) -> None:
    from playwright.sync_api import expect

    task_id = scheduler.schedule("send_email", {"to": "a@example.com"}, delay=timedelta(hours=1))
    page = tab.page
    server = serve(scheduler.db_url)
    page.goto(server.url)
    row = page.locator(f'tr[data-id="{task_id}"]')
    expect(row).to_have_attribute("data-status", "pending")
    row.locator("button.cancel").click()
    expect(row).to_have_attribute("data-status", "cancelled")
    expect(row.locator("button.cancel")).to_be_hidden()
    assert scheduler.get_task_by_id(task_id).status is TaskStatus.CANCELLED  # type: ignore[union-attr]

    # Retry from the task page puts it back.
    page.goto(server.url + f"tasks/{task_id}")
    page.locator("#t-retry").click()
    expect(page.locator("#t-status")).to_have_text("pending")
    assert scheduler.get_task_by_id(task_id).status is TaskStatus.PENDING  # type: ignore[union-attr]


def test_an_action_that_fails_says_why_and_the_message_outlives_the_next_polls(
    tab: Page, serve: Callable[..., Server], scheduler: Lilota
) -> None:
    from playwright.sync_api import expect

    task_id = scheduler.schedule("send_email", {"to": "d@example.com"}, delay=timedelta(hours=1))
    page = tab.page
    # The page keeps seeing the task as pending (the first list answer, replayed), while
    # someone else cancels it: the page's Cancel then meets a task that cannot be cancelled.
    first: dict[str, str] = {}
    polls: list[int] = []

    def replay(route: Any) -> None:
        if "body" not in first:
            first["body"] = route.fetch().text()
        polls.append(1)
        route.fulfill(status=200, content_type="application/json", body=first["body"])

    page.route(lambda url: url.endswith("/api/tasks"), replay)
    page.goto(serve(scheduler.db_url).url)
    row = page.locator(f'tr[data-id="{task_id}"]')
    expect(row).to_have_attribute("data-status", "pending")
    scheduler.cancel(task_id)
    row.locator("button.cancel").click()
    banner = page.locator("#banner")
    expect(banner).to_have_text(
        f"Could not cancel task {task_id}: task {task_id} is already cancelled; "
        "it cannot be cancelled"
    )
    seen = len(polls)
    for _ in range(WAIT_MS // 100):  # until two more polls succeeded
        if len(polls) >= seen + 2:
            break
        page.wait_for_timeout(100)
    assert len(polls) >= seen + 2
    expect(banner).to_be_visible()


# ---------------------------------------------------------------------- security


def test_task_fields_holding_html_are_shown_as_text_and_never_run(
    tab: Page, serve: Callable[..., Server], scheduler: Lilota
) -> None:
    from playwright.sync_api import expect

    from lilota.serialization import dumps
    from lilota.store import NewTask, Outcome

    # schedule() refuses a name no task can be registered under: written to the table
    # directly, as a row made by another client or an earlier release could be.
    store = scheduler.store
    row = NewTask(name=XSS_NAME, input=dumps(XSS_INPUT), description=XSS_DESCRIPTION)
    task_id = store.add(row)
    (claim,) = store.claim(worker_id="test", names=[XSS_NAME], limit=1, lease=timedelta(minutes=1))
    exception = {
        "type": "<svg onload=window.__xss=5>",
        "message": "<script>window.__xss=6</script>",
        "traceback": 'Traceback:\n  <img src=x onerror="window.__xss=7">',
    }
    store.finish(
        [Outcome(id=task_id, fence=claim.fence, status="failed", exception=json.dumps(exception))]
    )
    page = tab.page
    server = serve(scheduler.db_url)

    page.goto(server.url)
    row = page.locator(f'tr[data-id="{task_id}"]')
    expect(row).to_have_attribute("data-status", "failed")
    expect(row.locator("td.name")).to_have_text(XSS_NAME)
    expect(row.locator("td.input")).to_contain_text("<script>window.__xss=6</script>")
    assert row.locator("td.name").get_attribute("title") == XSS_DESCRIPTION

    page.goto(server.url + f"tasks/{task_id}")
    expect(page.locator("#t-title")).to_have_text(f"Task {task_id}: {XSS_NAME}")
    shown = json.loads(page.locator("#t-input").inner_text())
    assert shown == XSS_INPUT
    expect(page.locator("#t-traceback")).to_have_text(exception["traceback"])
    expect(page.locator("#t-exception")).to_contain_text("<svg onload=window.__xss=5>")

    # Nothing ran, no element was made from the text, and nothing even tried (a blocked
    # inline script would leave a Content-Security-Policy message in the console).
    assert page.evaluate("window.__xss") is None
    assert page.locator("img, svg, main script").count() == 0
    assert not [m for m in tab.console if "Content Security Policy" in m], tab.console


def test_posts_without_the_csrf_token_are_refused(
    tab: Page, serve: Callable[..., Server], scheduler: Lilota
) -> None:
    from playwright.sync_api import expect

    task_id = scheduler.schedule("send_email", {"to": "b@example.com"}, delay=timedelta(hours=1))
    server = serve(scheduler.db_url)
    page = tab.page
    page.goto(server.url)
    expect(page.locator(f'tr[data-id="{task_id}"]')).to_be_visible()

    # Same origin, with the browser's cookies, but without the X-CSRF-Token header.
    assert fetch_status(page, f"api/tasks/{task_id}/cancel", "POST") == 403

    # A page on another site posts a form to the dashboard (the classic CSRF attack).
    attacker = f"http://localhost:{server.port}/attack"
    form = (
        f'<form id="f" method="post" action="{server.url}api/tasks/{task_id}/cancel">'
        '<input name="csrf" value="guessed"></form>'
        '<script>document.getElementById("f").submit()</script>'
    )
    page.route(attacker, lambda route: route.fulfill(content_type="text/html", body=form))
    with page.expect_response(lambda r: r.url.endswith(f"/{task_id}/cancel")) as answer:
        page.goto(attacker)
    assert answer.value.status == 403
    assert scheduler.get_task_by_id(task_id).status is TaskStatus.PENDING  # type: ignore[union-attr]


def test_with_a_token_the_page_needs_a_login(
    tab: Page, serve: Callable[..., Server], scheduler: Lilota
) -> None:
    from playwright.sync_api import expect

    task_id = scheduler.schedule("send_email", {"to": "c@example.com"}, delay=timedelta(hours=1))
    server = serve(scheduler.db_url, token=TOKEN)
    page = tab.page
    page.goto(server.url)
    expect(page).to_have_url(server.url + "login")
    assert fetch_status(page, "api/tasks") == 401
    expect(page.locator(f'tr[data-id="{task_id}"]')).to_have_count(0)

    page.fill("#token", "not-the-token")
    page.click("#login")
    expect(page.locator("#login-error")).to_have_text("Wrong token.")

    page.fill("#token", TOKEN)
    page.click("#login")
    expect(page).to_have_url(server.url)
    expect(page.locator(f'tr[data-id="{task_id}"]')).to_be_visible()
    assert "lilota_auth" not in page.evaluate("document.cookie")  # HttpOnly
    assert TOKEN not in json.dumps(tab.context.cookies())

    page.click("#logout button")
    expect(page).to_have_url(server.url + "login")
    assert fetch_status(page, "api/tasks") == 401


# ---------------------------------------------------------------------- the README picture


def test_screenshot_of_a_busy_dashboard_for_the_readme(
    tab: Page, serve: Callable[..., Server], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    lilota = start_workers(tmp_path)
    gate = tmp_path / "gate-screenshot"
    try:
        done = [
            lilota.schedule("send_email", {"to": f"user{n}@example.com"}, description="welcome")
            for n in range(5)
        ]
        done += [
            lilota.schedule(
                "resize_image", {"path": f"/photos/{n}.png", "hold_at": 0, "gate": str(gate)}
            )
            for n in range(3)
        ]
        gate.touch()
        failed = lilota.schedule("import_csv", {"file": "orders-2024-05.csv"})
        for task_id in [*done, failed]:
            lilota.wait(task_id, timeout=60)
        gate.unlink()
        running = lilota.schedule(
            "resize_image", {"path": "/photos/beach.png", "hold_at": 60, "gate": str(gate)}
        )
        later = [
            lilota.schedule("send_email", {"to": f"news{n}@example.com"}, delay=timedelta(hours=1))
            for n in range(3)
        ]
        lilota.cancel(later[0])
        page = tab.page
        page.goto(serve(lilota.db_url).url)
        bar = page.locator(f'tr[data-id="{running}"] progress')
        expect(bar).to_have_js_property("value", 60)
        expect(page.locator("#count-failed .n")).to_have_text("1")
        expect(page.locator("#workers")).to_have_text("1 worker")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        assert SCREENSHOT.stat().st_size > 10_000
    finally:
        gate.touch()
        lilota.stop(timeout=60)
