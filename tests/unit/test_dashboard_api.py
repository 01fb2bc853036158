"""The dashboard's JSON endpoints, pages and security checks, through Starlette's TestClient."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from lilota import serialization
from lilota.errors import ConfigurationError
from lilota.store import NewTask, Outcome, TaskStore

try:
    from starlette.testclient import TestClient

    import lilota.dashboard as dashboard
except ImportError as missing:  # CI must run these tests: there, a missing package fails
    if os.environ.get("CI"):
        raise
    pytest.skip(
        f"the dashboard's packages are not installed (pip install 'lilota[dashboard]' httpx2): "
        f"{missing}",
        allow_module_level=True,
    )

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    task_store = TaskStore(f"sqlite:///{tmp_path / 'dash.db'}")
    task_store.ensure_schema()
    yield task_store
    task_store.dispose()


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dashboard.ENV_TOKEN, raising=False)


def add(store: TaskStore, name: str = "job", value: Any = None, **kwargs: Any) -> int:
    return store.add(NewTask(name=name, input=serialization.dumps(value), **kwargs))


def client(store: TaskStore, **kwargs: Any) -> TestClient:
    return TestClient(dashboard.create_app(store=store, **kwargs))


def csrf_of(c: TestClient) -> str:
    """Load the page like a browser does; return the CSRF token it embeds."""
    page = c.get("/")
    assert page.status_code == 200
    token = page.text.split('name="lilota-csrf" content="', 1)[1].split('"', 1)[0]
    assert token == c.cookies["lilota_csrf"]
    return token


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON a browser can parse: {constant}")

    return json.loads(text, parse_constant=refuse)


def finish(store: TaskStore, task_id: int, status: str, **fields: Any) -> None:
    (claim,) = [
        c
        for c in store.claim(worker_id="w", names=["job"], limit=10, lease=timedelta(minutes=5))
        if c.id == task_id
    ]
    store.finish([Outcome(id=task_id, fence=claim.fence, status=status, **fields)])


# ---------------------------------------------------------------------- reading


def test_task_list_is_newest_first_with_counts_by_status(store: TaskStore) -> None:
    first = add(store, value={"n": 1})
    second = add(store, value={"n": 2})
    store.cancel(first)
    body = client(store).get("/api/tasks").json()
    assert [t["id"] for t in body["tasks"]] == [second, first]
    assert body["tasks"][1]["status"] == "cancelled"
    assert body["tasks"][0]["input_preview"] == '{"n": 2}'
    assert body["counts"] == {
        "pending": 1,
        "running": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 1,
    }
    assert body["next_before_id"] is None


def test_keyset_paging_visits_every_task_once(store: TaskStore) -> None:
    ids = store.add_many([NewTask(name="job") for _ in range(120)])
    c = client(store)
    seen: list[int] = []
    pages = 0
    before: int | None = None
    while True:
        query = {"limit": 50} | ({"before_id": before} if before else {})
        body = c.get("/api/tasks", params=query).json()
        seen += [t["id"] for t in body["tasks"]]
        pages += 1
        before = body["next_before_id"]
        if before is None:
            break
    assert pages == 3
    assert seen == sorted(ids, reverse=True)


def test_a_full_last_page_says_there_is_nothing_older(store: TaskStore) -> None:
    store.add_many([NewTask(name="job") for _ in range(4)])
    body = client(store).get("/api/tasks", params={"limit": 4}).json()
    assert len(body["tasks"]) == 4
    assert body["next_before_id"] is None


def test_filters_by_status_and_name_and_counts_follow_the_name(store: TaskStore) -> None:
    a = add(store, "alpha")
    b = add(store, "beta")
    add(store, "beta")
    store.cancel(b)
    c = client(store)
    assert [t["id"] for t in c.get("/api/tasks?status=cancelled").json()["tasks"]] == [b]
    by_name = c.get("/api/tasks?name=alpha").json()
    assert [t["id"] for t in by_name["tasks"]] == [a]
    assert by_name["counts"]["pending"] == 1
    assert by_name["counts"]["cancelled"] == 0
    assert c.get("/api/counts?name=beta").json()["cancelled"] == 1


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "limit=0",
        "limit=201",
        "limit=x",
        "before_id=-3",
        "before_id=1.5",
        f"before_id={2**64}",
    ],
)
def test_bad_list_queries_are_refused_with_400(store: TaskStore, query: str) -> None:
    response = client(store).get("/api/tasks?" + query)
    assert response.status_code == 400
    assert "error" in response.json()


def test_task_detail_has_input_output_exception_and_attempts(store: TaskStore) -> None:
    task_id = add(store, value={"path": "/x.png"}, max_attempts=3)
    exception = {"type": "ValueError", "message": "bad <b>", "traceback": "Traceback...\n  line"}
    finish(store, task_id, "failed", exception=json.dumps(exception))
    body = client(store).get(f"/api/tasks/{task_id}").json()
    assert body["input"] == {"path": "/x.png"}
    assert body["output"] is None
    assert body["exception"] == exception
    assert body["error"] == "ValueError: bad <b>"
    assert (body["status"], body["attempts"], body["max_attempts"]) == ("failed", 1, 3)
    assert body["started_at"] is not None and body["ended_at"] is not None
    assert body["duration"] >= 0


@pytest.mark.parametrize("task_id", [999, 2**63 - 1, 2**63, 10**40])
def test_unknown_task_is_404(store: TaskStore, task_id: int) -> None:
    c = client(store)
    assert c.get(f"/api/tasks/{task_id}").status_code == 404
    response = c.post(f"/api/tasks/{task_id}/cancel", headers={"X-CSRF-Token": csrf_of(c)})
    assert response.status_code == 404


def test_values_json_cannot_hold_reach_the_browser_as_strict_json(store: TaskStore) -> None:
    value = {
        "when": datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc),
        "tags": {"b", "a"},
        "big": 2**70,
        "nan": math.nan,
        "money": Decimal("1.10"),
        "raw": b"\x00\xff",
        "pair": (1, 2),
    }
    task_id = add(store, value=value)
    c = client(store)
    detail = strict_json(c.get(f"/api/tasks/{task_id}").text)
    assert detail["input"] == {
        "when": "2024-05-01T12:00:00+00:00",
        "tags": ["a", "b"],
        "big": str(2**70),
        "nan": "nan",
        "money": "1.10",
        "raw": "b'\\x00\\xff'",
        "pair": [1, 2],
    }
    listed = strict_json(c.get("/api/tasks").text)
    assert listed["tasks"][0]["input_preview"].startswith('{"when": "2024-05-01')


def test_long_inputs_are_cut_in_the_list_but_whole_in_the_detail(store: TaskStore) -> None:
    task_id = add(store, value="x" * 10_000)
    c = client(store)
    preview = c.get("/api/tasks").json()["tasks"][0]["input_preview"]
    assert len(preview) == dashboard.PREVIEW_CHARS and preview.endswith("…")
    assert c.get(f"/api/tasks/{task_id}").json()["input"] == "x" * 10_000


def test_workers_and_their_task_names_are_listed(store: TaskStore) -> None:
    store.register_worker("host-1-w", ["resize", "email"])
    add(store)  # a pending "job": no worker runs it
    body = client(store).get("/api/workers").json()
    assert [w["id"] for w in body["workers"]] == ["host-1-w"]
    assert body["task_names"] == ["email", "resize"]
    assert body["unserved"] == {"job": 1}


# ---------------------------------------------------------------------- actions, CSRF


def test_cancel_with_the_csrf_token_cancels_a_pending_task(store: TaskStore) -> None:
    task_id = add(store)
    c = client(store)
    csrf = csrf_of(c)
    assert c.get("/api/tasks").json()["counts"]["cancelled"] == 0
    response = c.post(f"/api/tasks/{task_id}/cancel", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200
    assert response.json()["task"]["status"] == "cancelled"
    assert store.get(task_id).status == "cancelled"  # type: ignore[union-attr]
    # The counts are not served from before the action.
    assert c.get("/api/tasks").json()["counts"]["cancelled"] == 1


def test_retry_puts_a_cancelled_task_back_to_pending(store: TaskStore) -> None:
    task_id = add(store)
    store.cancel(task_id)
    c = client(store)
    response = c.post(f"/api/tasks/{task_id}/retry", headers={"X-CSRF-Token": csrf_of(c)})
    assert response.status_code == 200
    assert store.get(task_id).status == "pending"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-CSRF-Token": "wrong-" + "x" * 40},
        {"X-CSRF-Token": ""},
    ],
    ids=["no-token", "wrong-token", "empty-token"],
)
def test_a_post_without_the_right_csrf_token_is_refused(
    store: TaskStore, headers: dict[str, str]
) -> None:
    task_id = add(store)
    c = client(store)
    csrf_of(c)  # the browser has its cookie; the forged request lacks the header
    response = c.post(f"/api/tasks/{task_id}/cancel", headers=headers)
    assert response.status_code == 403
    assert store.get(task_id).status == "pending"  # type: ignore[union-attr]


def test_a_csrf_token_without_its_cookie_is_refused(store: TaskStore) -> None:
    task_id = add(store)
    c = client(store)
    csrf = csrf_of(c)
    c.cookies.clear()
    response = c.post(f"/api/tasks/{task_id}/cancel", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 403
    assert store.get(task_id).status == "pending"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://testserver.evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_cross_site_posts_are_refused_even_with_the_token(
    store: TaskStore, headers: dict[str, str]
) -> None:
    task_id = add(store)
    c = client(store)
    csrf = csrf_of(c)
    response = c.post(f"/api/tasks/{task_id}/cancel", headers={"X-CSRF-Token": csrf, **headers})
    assert response.status_code == 403
    assert "cross-site" in response.json()["error"]
    assert store.get(task_id).status == "pending"  # type: ignore[union-attr]


def test_same_origin_browser_headers_are_accepted(store: TaskStore) -> None:
    task_id = add(store)
    c = client(store)
    headers = {
        "X-CSRF-Token": csrf_of(c),
        "Origin": "http://testserver",
        "Sec-Fetch-Site": "same-origin",
    }
    assert c.post(f"/api/tasks/{task_id}/cancel", headers=headers).status_code == 200


def test_actions_are_post_only(store: TaskStore) -> None:
    task_id = add(store)
    c = client(store)
    csrf_of(c)
    assert c.get(f"/api/tasks/{task_id}/cancel").status_code == 405
    assert store.get(task_id).status == "pending"  # type: ignore[union-attr]


def test_actions_that_do_not_apply_answer_409_and_unknown_tasks_404(store: TaskStore) -> None:
    task_id = add(store)
    c = client(store)
    headers = {"X-CSRF-Token": csrf_of(c)}
    assert c.post(f"/api/tasks/{task_id}/retry", headers=headers).status_code == 409
    store.cancel(task_id)
    assert c.post(f"/api/tasks/{task_id}/cancel", headers=headers).status_code == 409
    assert c.post("/api/tasks/424242/cancel", headers=headers).status_code == 404
    assert c.post(f"/api/tasks/{task_id}/explode", headers=headers).status_code == 404


# ---------------------------------------------------------------------- token


def test_with_a_token_the_api_needs_it(store: TaskStore) -> None:
    add(store)
    c = client(store, token=TOKEN)
    refused = c.get("/api/tasks")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert c.get("/api/tasks", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = c.get("/api/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and len(ok.json()["tasks"]) == 1


def test_with_a_token_pages_redirect_to_the_login_form(store: TaskStore) -> None:
    c = client(store, token=TOKEN)
    for path in ("/", "/tasks/1"):
        response = c.get(path, follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"] == "/login"
    assert 'name="token"' in c.get("/login").text


def test_the_login_form_sets_a_cookie_that_is_not_the_token(store: TaskStore) -> None:
    add(store)
    c = client(store, token=TOKEN)
    csrf = c.get("/login").cookies["lilota_csrf"]
    wrong = c.post("/login", data={"token": "guess", "csrf": csrf}, follow_redirects=False)
    assert wrong.status_code == 401 and "Wrong token." in wrong.text
    assert "lilota_auth" not in c.cookies
    right = c.post("/login", data={"token": TOKEN, "csrf": csrf}, follow_redirects=False)
    assert right.status_code == 303
    set_cookie = right.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    assert TOKEN.lower() not in set_cookie
    assert c.get("/api/tasks").status_code == 200
    assert c.get("/").status_code == 200


def test_login_needs_the_csrf_token(store: TaskStore) -> None:
    c = client(store, token=TOKEN)
    c.get("/login")
    response = c.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert response.status_code == 403
    assert "lilota_auth" not in c.cookies


def test_logout_ends_the_cookie_session(store: TaskStore) -> None:
    c = client(store, token=TOKEN)
    csrf = c.get("/login").cookies["lilota_csrf"]
    c.post("/login", data={"token": TOKEN, "csrf": csrf})
    assert c.get("/api/tasks").status_code == 200
    c.post("/logout", headers={"X-CSRF-Token": csrf}, follow_redirects=False)
    assert c.get("/api/tasks").status_code == 401


def test_a_bearer_request_needs_no_csrf_token(store: TaskStore) -> None:
    task_id = add(store)
    c = client(store, token=TOKEN)
    response = c.post(f"/api/tasks/{task_id}/cancel", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert store.get(task_id).status == "cancelled"  # type: ignore[union-attr]


def test_a_logged_in_cookie_still_needs_the_csrf_token_to_post(store: TaskStore) -> None:
    task_id = add(store)
    c = client(store, token=TOKEN)
    csrf = c.get("/login").cookies["lilota_csrf"]
    c.post("/login", data={"token": TOKEN, "csrf": csrf})
    assert c.post(f"/api/tasks/{task_id}/cancel").status_code == 403
    assert store.get(task_id).status == "pending"  # type: ignore[union-attr]


def test_the_token_comes_from_the_environment_when_not_given(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(dashboard.ENV_TOKEN, TOKEN)
    c = client(store)
    assert c.get("/api/tasks").status_code == 401
    assert c.get("/api/tasks", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_without_a_token_there_is_no_login(store: TaskStore) -> None:
    response = client(store).get("/login", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"


@pytest.mark.parametrize("kwargs", [{"token": ""}, {"token": "   "}, {"db_url": "sqlite://"}])
def test_bad_configuration_is_refused(store: TaskStore, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        dashboard.create_app(store=store, **kwargs)


# ---------------------------------------------------------------------- pages, headers, hosts


def test_every_response_carries_a_strict_content_security_policy(store: TaskStore) -> None:
    c = client(store)
    for path in ("/", "/api/tasks", "/static/dashboard.js", "/nope"):
        response = c.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in csp


def test_the_page_shell_has_no_inline_script_and_escapes_what_it_inserts(
    store: TaskStore,
) -> None:
    c = client(store)
    c.cookies.set("lilota_csrf", '"><script>alert(1)</script>' + "x" * 40)
    page = c.get("/").text
    assert "<script>alert" not in page
    assert page.count("<script") == 1 and 'src="static/dashboard.js' in page


def test_the_static_files_are_served(store: TaskStore) -> None:
    c = client(store)
    js = c.get("/static/dashboard.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "innerHTML" not in js.text.replace("No innerHTML anywhere", "")
    assert c.get("/static/dashboard.css").status_code == 200


def test_mounted_under_a_prefix_every_link_and_cookie_stays_under_it(store: TaskStore) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    outer = Starlette(routes=[Mount("/lilota", app=dashboard.create_app(store=store))])
    c = TestClient(outer)
    page = c.get("/lilota/")
    assert page.status_code == 200
    assert '<base href="/lilota/">' in page.text
    assert "path=/lilota/" in page.headers["set-cookie"].lower()
    assert c.get("/lilota/static/dashboard.js").status_code == 200
    assert c.get("/lilota/api/tasks").status_code == 200


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:8000", 200),
        ("localhost:8000", 200),
        ("[::1]:8000", 200),
        ("localhost", 200),
        ("evil.example:8000", 400),
        ("127.0.0.1.evil.example", 400),
    ],
)
def test_allowed_hosts_refuse_other_host_headers(store: TaskStore, host: str, status: int) -> None:
    c = client(store, allowed_hosts=list(dashboard.LOOPBACK_HOSTS))
    assert c.get("/api/tasks", headers={"Host": host}).status_code == status


def test_serve_binds_to_loopback_and_accepts_only_loopback_hosts_by_default(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen.update(kwargs, app=app)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    dashboard.serve(f"sqlite:///{tmp_path / 'dash.db'}")  # the store fixture's database
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    c = TestClient(seen["app"])
    assert c.get("/api/tasks", headers={"Host": "localhost:8000"}).status_code == 200
    assert c.get("/api/tasks", headers={"Host": "rebound.example:8000"}).status_code == 400


def test_serve_refuses_a_sqlite_file_that_does_not_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("served"))
    with pytest.raises(ConfigurationError, match="no SQLite database"):
        dashboard.serve(f"sqlite:///{tmp_path / 'typo.db'}")
    assert not (tmp_path / "typo.db").exists()


def test_lilota_dashboard_command_serves_the_database_on_loopback(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    from lilota.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs, app=app))
    task_id = add(store)
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    assert main(["--db-url", url, "dashboard", "--port", "8123", "--token", TOKEN]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    c = TestClient(seen["app"], base_url="http://localhost:8123")
    assert c.get("/api/tasks").status_code == 401
    listed = c.get("/api/tasks", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [t["id"] for t in listed["tasks"]] == [task_id]


def test_lilota_dashboard_command_refuses_a_database_without_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    from lilota.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("served"))
    assert main(["dashboard", "--db-url", f"sqlite:///{tmp_path / 'none.db'}"]) == 1
    assert "no SQLite database" in capsys.readouterr().err


def test_the_command_line_defaults_to_loopback_port_8000() -> None:
    from lilota.dashboard.__main__ import build_parser

    args = build_parser().parse_args([])
    assert (args.host, args.port, args.token) == ("127.0.0.1", 8000, None)


def test_database_outage_is_reported_as_503(store: TaskStore, tmp_path: Path) -> None:
    add(store)
    c = client(store)
    c.get("/api/tasks")
    store.engine.dispose()
    for path in tmp_path.glob("dash.db*"):
        path.unlink()
    (tmp_path / "dash.db").mkdir()  # the file is now a directory: every query fails
    response = c.get("/api/tasks")
    assert response.status_code == 503
    assert "error" in response.json()


def test_task_times_are_iso_with_utc_offsets(store: TaskStore) -> None:
    add(store, run_at=datetime(2030, 1, 2, 3, 4, 5), description="<i>d</i>")
    task = client(store).get("/api/tasks").json()["tasks"][0]
    assert task["run_at"] == "2030-01-02T03:04:05+00:00"
    assert task["description"] == "<i>d</i>"
    assert datetime.fromisoformat(task["created_at"]).utcoffset() == timedelta(0)


# ---------------------------------------------------------------------- sessions


def login(c: TestClient) -> tuple[str, str]:
    """Log in through the form; returns (csrf token, the auth cookie's value)."""
    csrf = c.get("/login").cookies["lilota_csrf"]
    response = c.post("/login", data={"token": TOKEN, "csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303
    return csrf, c.cookies["lilota_auth"]


def test_logout_revokes_a_copy_of_the_cookie(store: TaskStore) -> None:
    app = dashboard.create_app(store=store, token=TOKEN)
    browser = TestClient(app)
    csrf, cookie = login(browser)
    thief = TestClient(app, cookies={"lilota_auth": cookie})
    assert thief.get("/api/tasks").status_code == 200

    browser.post("/logout", headers={"X-CSRF-Token": csrf}, follow_redirects=False)

    assert thief.get("/api/tasks").status_code == 401
    page = thief.get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"


def test_each_login_is_its_own_session_and_logout_ends_only_that_one(store: TaskStore) -> None:
    app = dashboard.create_app(store=store, token=TOKEN)
    first, second = TestClient(app), TestClient(app)
    csrf, first_cookie = login(first)
    _, second_cookie = login(second)
    assert first_cookie != second_cookie

    first.post("/logout", headers={"X-CSRF-Token": csrf}, follow_redirects=False)

    assert (
        TestClient(app, cookies={"lilota_auth": first_cookie}).get("/api/tasks").status_code == 401
    )
    assert second.get("/api/tasks").status_code == 200


def test_the_session_cookie_holds_neither_the_token_nor_a_fixed_value(store: TaskStore) -> None:
    app = dashboard.create_app(store=store, token=TOKEN)
    _, cookie = login(TestClient(app))
    _, again = login(TestClient(app))
    assert TOKEN not in cookie and cookie != again
    # The old fixed login cookie (an HMAC of the token alone) no longer opens anything.
    import hashlib
    import hmac

    fixed = hmac.new(TOKEN.encode(), b"lilota dashboard login v1", hashlib.sha256).hexdigest()
    assert TestClient(app, cookies={"lilota_auth": fixed}).get("/api/tasks").status_code == 401


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"),  # another signature
        lambda c: c.split(".")[0] + ".99999999999." + c.split(".")[2],  # a later expiry
        lambda c: "",
        lambda c: "a.b.c",
    ],
    ids=["signature", "expiry", "empty", "garbage"],
)
def test_a_tampered_session_cookie_is_refused(store: TaskStore, tamper: Any) -> None:
    app = dashboard.create_app(store=store, token=TOKEN)
    _, cookie = login(TestClient(app))
    assert (
        TestClient(app, cookies={"lilota_auth": tamper(cookie)}).get("/api/tasks").status_code
        == 401
    )


def test_a_session_ends_after_its_lifetime_and_with_a_new_token() -> None:
    from lilota.dashboard.security import SESSION_LIFETIME, Sessions

    now = [1_000_000.0]
    sessions = Sessions(TOKEN, clock=lambda: now[0])
    cookie = sessions.new()
    now[0] += SESSION_LIFETIME - 1
    assert sessions.valid(cookie)
    assert not Sessions("another-token", clock=lambda: now[0]).valid(cookie)
    now[0] += 2
    assert not sessions.valid(cookie)


def test_revocations_of_expired_sessions_are_forgotten() -> None:
    from lilota.dashboard.security import SESSION_LIFETIME, Sessions

    now = [1_000_000.0]
    sessions = Sessions(TOKEN, clock=lambda: now[0])
    old = sessions.new()
    sessions.revoke(old)
    assert len(sessions._revoked) == 1
    now[0] += SESSION_LIFETIME + 1
    sessions.revoke(sessions.new())
    assert len(sessions._revoked) == 1  # only the new one: the old one expired anyway


# ---------------------------------------------------------------------- throttling


def test_wrong_tokens_at_login_are_refused_with_429_and_retry_after(store: TaskStore) -> None:
    from lilota.dashboard.security import FREE_FAILURES

    app = dashboard.create_app(store=store, token=TOKEN)
    c = TestClient(app)
    csrf = c.get("/login").cookies["lilota_csrf"]
    codes = [
        c.post("/login", data={"token": f"guess{i}", "csrf": csrf}).status_code
        for i in range(FREE_FAILURES)
    ]
    assert codes == [401] * FREE_FAILURES

    # Blocked: even the right token is not looked at.
    blocked = c.post("/login", data={"token": TOKEN, "csrf": csrf}, follow_redirects=False)
    assert blocked.status_code == 429
    assert blocked.headers["retry-after"] == "1"
    assert "Too many wrong tokens: try again in 1 s." in blocked.text
    assert "lilota_auth" not in c.cookies
    # Another address is not held up by this one.
    other = TestClient(app, client=("192.0.2.7", 50000))
    other_csrf = other.get("/login").cookies["lilota_csrf"]
    ok = other.post("/login", data={"token": TOKEN, "csrf": other_csrf}, follow_redirects=False)
    assert ok.status_code == 303


def test_wrong_bearer_tokens_are_throttled_but_a_session_from_that_address_is_not(
    store: TaskStore,
) -> None:
    from lilota.dashboard.security import FREE_FAILURES

    app = dashboard.create_app(store=store, token=TOKEN)
    browser, script = TestClient(app), TestClient(app)  # one address
    login(browser)
    for i in range(FREE_FAILURES):
        wrong = script.get("/api/tasks", headers={"Authorization": f"Bearer guess{i}"})
        assert wrong.status_code == 401

    right = script.get("/api/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 429
    assert right.headers["retry-after"] == "1"
    assert "too many wrong tokens" in right.json()["error"]
    assert browser.get("/api/tasks").status_code == 200  # a logged-in session goes on


def test_the_wait_doubles_with_each_further_wrong_token_up_to_a_limit() -> None:
    from lilota.dashboard import security

    now = [0.0]
    throttle = security.LoginThrottle(clock=lambda: now[0])
    for _ in range(security.FREE_FAILURES - 1):
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") is None
    waits = []
    for _ in range(12):
        throttle.failed("10.0.0.1")
        wait = throttle.retry_after("10.0.0.1")
        assert wait is not None
        waits.append(wait)
        now[0] += wait  # the client waits as told, then guesses again
        assert throttle.retry_after("10.0.0.1") is None
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]


def test_a_right_token_or_an_hour_of_quiet_clears_the_count() -> None:
    from lilota.dashboard import security

    now = [0.0]
    throttle = security.LoginThrottle(clock=lambda: now[0])
    for _ in range(security.FREE_FAILURES - 1):
        throttle.failed("10.0.0.1")
    throttle.succeeded("10.0.0.1")
    assert throttle.failed("10.0.0.1") == 1
    now[0] += security.THROTTLE_FORGET + 1
    assert throttle.failed("10.0.0.1") == 1


def test_the_throttle_keeps_a_bounded_number_of_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    from lilota.dashboard import security

    monkeypatch.setattr(security, "THROTTLE_MAX_CLIENTS", 3)
    monkeypatch.setattr(security, "FREE_FAILURES", 1)
    throttle = security.LoginThrottle(clock=lambda: 0.0)
    for n in range(5):
        throttle.failed(f"10.0.0.{n}")
    assert [throttle.retry_after(f"10.0.0.{n}") for n in range(5)] == [None, None, 1, 1, 1]


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::2", "2001:db8:1:2::/64"),
        ("testclient", "testclient"),
        (None, "unknown"),
    ],
)
def test_wrong_tokens_count_per_address_and_per_ipv6_64(host: str | None, key: str) -> None:
    from lilota.dashboard.security import client_key

    assert client_key(host) == key


# ---------------------------------------------------------------------- exposure


def test_serve_refuses_a_non_loopback_address_without_a_token(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: pytest.fail("served"))
    with pytest.raises(ConfigurationError) as refused:
        dashboard.serve(f"sqlite:///{tmp_path / 'dash.db'}", host="0.0.0.0")
    assert "refusing to serve the dashboard on 0.0.0.0 without a token" in str(refused.value)
    assert "--token" in str(refused.value) and "--insecure" in str(refused.value)


def test_serve_with_insecure_serves_any_host_and_warns(
    store: TaskStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs, app=app))
    dashboard.serve(f"sqlite:///{tmp_path / 'dash.db'}", host="0.0.0.0", insecure=True)

    assert seen["host"] == "0.0.0.0"
    assert "listens on 0.0.0.0 without a token (--insecure)" in caplog.text
    c = TestClient(seen["app"])
    assert c.get("/api/tasks", headers={"Host": "tasks.example:8000"}).status_code == 200


def test_serve_with_a_token_on_a_non_loopback_address_needs_no_insecure(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs, app=app))
    dashboard.serve(f"sqlite:///{tmp_path / 'dash.db'}", host="0.0.0.0", token=TOKEN)
    assert seen["host"] == "0.0.0.0"
    assert TestClient(seen["app"]).get("/api/tasks").status_code == 401


@pytest.mark.parametrize("command", ["lilota dashboard", "python -m lilota.dashboard"])
def test_the_commands_refuse_host_0_0_0_0_without_a_token_unless_insecure(
    store: TaskStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    import uvicorn

    from lilota.cli import main as lilota_main
    from lilota.dashboard.__main__ import main as dashboard_main

    served: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(kwargs["host"]))
    url = f"sqlite:///{tmp_path / 'dash.db'}"

    def run(*extra: str) -> int:
        if command == "lilota dashboard":
            return lilota_main(["dashboard", "--db-url", url, "--host", "0.0.0.0", *extra])
        return dashboard_main(["--db-url", url, "--host", "0.0.0.0", *extra])

    assert run() != 0
    assert served == []
    assert "without a token" in capsys.readouterr().err
    assert run("--insecure") == 0
    assert served == ["0.0.0.0"]
    assert run("--token", TOKEN) == 0
    assert served == ["0.0.0.0", "0.0.0.0"]
