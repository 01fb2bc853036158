"""The README's examples of scheduling, run as they are printed there.

Each example is the fenced ``python`` block whose first line names its file
(``# shop.py``); the test writes it into an empty directory and runs it there.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()


def needs(module: str) -> None:
    """Skip without ``module`` (a dev extra), except in CI, where it must be there."""
    if os.environ.get("CI"):
        importlib.import_module(module)
    else:
        pytest.importorskip(module)


def readme_example(name: str) -> str:
    """The README's example ``name`` (its first line is ``# name``)."""
    blocks = re.findall(r"```python\n(# " + re.escape(name) + r"\n.*?)```", README, re.DOTALL)
    assert len(blocks) == 1, f"the README has {len(blocks)} examples named {name}"
    return str(blocks[0])


def run_example(directory: Path, name: str, *args: str) -> str:
    """Write example ``name`` into ``directory``, run it there; its standard output."""
    (directory / name).write_text(readme_example(name))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, name, *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_scheduling_in_your_transaction_example(tmp_path: Path) -> None:
    assert run_example(tmp_path, "shop.py") == "pending\n"


def test_typed_quick_example(tmp_path: Path) -> None:
    printed = run_example(tmp_path, "typed_quick.py")
    assert printed == "AddOutput(sum=5)\nAddOutput(sum=2)\n8\n"


def test_async_quick_example(tmp_path: Path) -> None:
    assert run_example(tmp_path, "async_quick.py") == "AddOutput(sum=5)\n{'sum': 2}\n"


# Worker processes import the main module, as multiprocessing does: the guard keeps them
# from running the requests.
FASTAPI_DRIVER = """\
from fastapi.testclient import TestClient

from fastapi_app import app

if __name__ == "__main__":
    with TestClient(app) as client:
        task_id = client.post("/orders", json={"id": 1, "total": 30}).json()["task_id"]
        print(client.get(f"/invoices/{task_id}").json())
        print(client.get("/invoices/999999").status_code)
"""


def test_fastapi_example(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    needs("fastapi")
    url = request.getfixturevalue("lilota_postgres_url")
    (tmp_path / "fastapi_app.py").write_text(readme_example("fastapi_app.py"))
    (tmp_path / "driver.py").write_text(FASTAPI_DRIVER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "DB_URL": url}
    result = subprocess.run(
        [sys.executable, "driver.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "{'order_id': 1, 'total': 30}\n404\n"


def test_django_example(tmp_path: Path) -> None:
    needs("django")
    assert run_example(tmp_path, "django_orders.py") == "[{'order_id': 1}]\n"
