"""The README's examples of scheduling, run as they are printed there.

Each example is the fenced ``python`` block whose first line names its file
(``# shop.py``); the test writes it into an empty directory and runs it there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()


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
