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


def test_help_command_as_pvesr() -> None:
    # pvesr help: a usage line per command; help CMD: its full help; --verbose 0: its usage line.
    r = run("help")
    assert r.returncode == 0 and r.stdout.startswith("USAGE: replq <COMMAND> [ARGS] [OPTIONS]\n\n")
    assert "       replq create-local-job <id> <target> [OPTIONS]\n" in r.stdout
    assert "       replq set-state <vmid> <state>\n" in r.stdout
    assert "       replq node add <name> [OPTIONS]\n" in r.stdout
    full = run("help", "stat")
    assert full.returncode == 0 and "--guest" in full.stdout and "-h, --help" in full.stdout
    assert run("help", "update", "--verbose", "0").stdout == "USAGE: replq update <id> [OPTIONS]\n"
    everything = run("help", "--verbose").stdout
    assert "Usage: replq create-local-job" in everything and "Usage: replq sandbox up" in everything
    bad = run("help", "no-such")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_run_mail_excludes_id() -> None:
    r = run("run", "--mail", "--id", "100-0")
    assert r.returncode == 2 and "Mail and id are mutually exclusive!" in r.stderr and r.stderr.count("\n") == 1


def test_no_command_prints_the_usage() -> None:
    for args in ([], ["node"]):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.startswith(f"Usage: replq {' '.join(args)}".rstrip() + " [OPTIONS]")
        assert "Commands:" in r.stderr and "Traceback" not in r.stderr
