"""The README's first commands run as written, twice in a row (a new user re-runs them)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]


def first_commands() -> list[str]:
    """The first line of the README's first bash block, split at `&&`, less the installs."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    line = next(ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#"))
    return [c.strip() for c in line.split("&&") if not c.strip().startswith("pip ")]


@pytest.mark.slow
def test_readme_quickstart_runs_twice(tmp_path: Path) -> None:
    cmds = first_commands()
    assert [c.split()[0] for c in cmds] == ["llama-convert", "llama-run"]
    cwd = tmp_path / "checkout"                 # ../shared/data resolves as beside a checkout
    cwd.mkdir()
    (tmp_path / "shared").symlink_to(DATA.parent)
    for attempt in range(2):
        for cmd in cmds:
            p = subprocess.run(shlex.split(cmd), cwd=cwd, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
            assert p.returncode == 0, (attempt, cmd, p.stderr[-2000:])
    assert "| hellaswag |   500 |" in p.stdout
