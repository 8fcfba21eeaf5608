"""Running the `bigmodel` command line in a subprocess, as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import bigmodel

# The package under test first on the path, whether installed or run from a worktree.
_PYTHON_DIR = str(Path(bigmodel.__file__).resolve().parent.parent)


def cli_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [_PYTHON_DIR, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def cli_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "bigmodel", *map(str, args)]


def run_cli(*args: object, **extra_env: str) -> subprocess.CompletedProcess:
    """``bigmodel ARGS`` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        check=False,
        env=cli_env(**extra_env),
        timeout=300,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, code: int, *named: object) -> None:
    """Exit ``code``, one line on stderr naming every one of ``named``, no traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for thing in named:
        assert str(thing) in lines[0], (thing, lines[0])
