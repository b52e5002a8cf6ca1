"""Running a program as root on a node: only one the node's root trusts, in a clean environment.

Whoever can write to Redis must not be able to make a worker run something as root, so a
program replq runs (the failure notification command; guest hookscripts) is named on the node
itself, never in the cluster store, and before it runs:

- `trusted_program` resolves it (a bare name through SAFE_PATH only) and refuses it unless the
  file and every directory above it are owned by root and not writable by group or others
  (a root-owned directory with the sticky bit, like /tmp, counts as safe: nobody else may
  rename or remove root's entries in it);
- `clean_environment` builds its environment from an allow-list: the Redis URL and the other
  secrets of the service's environment never reach it;
- `run_program` runs it without a shell, with a timeout that kills it and its children.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from replq.errors import UntrustedProgram
from replq.model import show

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Variables of the service's environment a program may see; nothing else passes.
PASSED_ENV = ("HOME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "LOGNAME", "USER")


def _resolve(program: str) -> Path:
    if "/" in program:
        if not program.startswith("/"):
            raise UntrustedProgram(f"program '{show(program)}': give an absolute path")
        return Path(program)
    for directory in SAFE_PATH.split(":"):
        candidate = Path(directory) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise UntrustedProgram(f"program '{show(program)}' not found in {SAFE_PATH}")


def _unsafe(path: Path, st: os.stat_result) -> str | None:
    """Why a file or directory could be changed by someone other than root, or None."""
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_mode & stat.S_IWOTH and not sticky_dir:
        return f"{path} is world-writable"
    if st.st_mode & stat.S_IWGRP and not sticky_dir:
        return f"{path} is group-writable"
    return None


def trusted_program(program: str) -> Path:
    """The program's real path, if root alone can change it; else UntrustedProgram saying why."""
    path = _resolve(program)
    try:
        real = path.resolve(strict=True)
        st = real.stat()
    except (OSError, RuntimeError) as exc:
        raise UntrustedProgram(f"program {show(str(path))}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        raise UntrustedProgram(f"program {real} is not an executable file")
    for p in (real, *real.parents):
        why = _unsafe(p, st if p == real else p.stat())
        if why:
            raise UntrustedProgram(f"refusing to run {real}: {why} (a program replq runs as root must be "
                                   "owned by root and not group/world-writable)")
    return real


def clean_environment(values: Mapping[str, object]) -> dict[str, str]:
    """The allow-listed variables of this process, SAFE_PATH, and `values` (NUL-free, at most 4096
    characters each): never the Redis URL, passwords or keys of the service's environment."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env["PATH"] = SAFE_PATH
    env.update({k: str(v).replace("\x00", " ")[:4096] for k, v in values.items()})
    return env


def run_program(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> tuple[bool, str]:
    """Run a trusted program (argv[0] checked by trusted_program; no shell): (exited 0, what went
    wrong or ''). A hung program is killed with its children after `timeout` seconds."""
    program = trusted_program(argv[0])
    try:
        # The checked file itself runs (a symlink swapped meanwhile changes nothing); argv[0] stays.
        proc = subprocess.Popen(list(argv), executable=program, env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd="/")
    except OSError as exc:
        return False, f"cannot run {program}: {exc.strerror or exc}"
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return False, f"{program} timed out after {timeout:.0f} s; killed"
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
        return False, f"{program} exited {proc.returncode}" + (f": {tail[0]}" if tail else "")
    return True, ""
