"""mypy --strict on tests/typing_probe/handles_probe.py sees what its comments say.

``# R: <type>`` on a line: the type mypy reveals there (module paths left out);
``# E: <code>``: the error code(s) mypy reports there. A line without ``# E:`` must check
cleanly, so a handle that lost its types (``Any`` accepts everything) fails this test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PROBE = ROOT / "tests" / "typing_probe" / "handles_probe.py"


def _short(type_text: str) -> str:
    """A revealed type without module paths: ``lilota.handles.TaskRef[x.Out]`` -> ``TaskRef[Out]``."""
    return re.sub(r"\b(?:[a-z_][a-z0-9_]*\.)+", "", type_text)


def _expected() -> tuple[dict[int, str], dict[int, set[str]]]:
    reveals: dict[int, str] = {}
    errors: dict[int, set[str]] = {}
    for number, line in enumerate(PROBE.read_text().splitlines(), start=1):
        if found := re.search(r"# R: (.+)$", line):
            reveals[number] = found.group(1).strip()
        if found := re.search(r"# E: (.+)$", line):
            errors[number] = set(found.group(1).split())
    return reveals, errors


@pytest.fixture(scope="module")
def mypy_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = tmp_path_factory.mktemp("mypy-cache")
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache)]
    command += ["--python-version", "3.10", "--show-error-codes", "--no-pretty", str(PROBE)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy itself failed
    return result.stdout


def test_mypy_reveals_the_model_types(mypy_output: str) -> None:
    reveals, _ = _expected()
    found = {
        int(m.group(1)): _short(m.group(2))
        for m in re.finditer(
            r"handles_probe\.py:(\d+): note: Revealed type is \"(.+)\"", mypy_output
        )
    }
    assert found == reveals


def test_mypy_rejects_exactly_the_wrong_calls(mypy_output: str) -> None:
    _, errors = _expected()
    found: dict[int, set[str]] = {}
    for m in re.finditer(r"handles_probe\.py:(\d+): error: .*\[([a-z-]+)\]$", mypy_output, re.M):
        found.setdefault(int(m.group(1)), set()).add(m.group(2))
    assert found == errors, mypy_output
    assert len(errors) >= 8  # the probe's rejected calls are all there
