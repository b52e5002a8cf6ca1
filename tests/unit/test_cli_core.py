"""The CLI's contract for bad usage: one line on stderr, exit 2, no traceback."""

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replq", *args], capture_output=True, text=True, timeout=60)


def test_unknown_command_is_one_line_exit_2() -> None:
    r = run("no-such-command")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "No such command" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_lists_usage() -> None:
    r = run("--help")
    assert r.returncode == 0
    assert "Usage:" in r.stdout
