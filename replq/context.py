"""Where this process finds Redis and which node it is (SPEC §8)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def state_dir() -> Path:
    """Per-user directory holding the pointer to the running sandbox."""
    base = os.environ.get("REPLQ_STATE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "replq"


def sandbox_pointer() -> Path:
    return state_dir() / "sandbox.json"


def sandbox_info() -> dict | None:
    """The sandbox this user brought up, if it is still there. A pointer left behind by a
    sandbox whose directory is gone (removed, or a reboot cleared it) is ignored."""
    try:
        info = json.loads(sandbox_pointer().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not (Path(str(info.get("dir", ""))) / "sandbox.json").is_file():
        return None
    return info


def redis_url(explicit: str | None = None) -> str:
    """--redis, then REPLQ_REDIS_URL, then a sandbox started by this user, then the default."""
    if explicit:
        return explicit
    env = os.environ.get("REPLQ_REDIS_URL")
    if env:
        return env
    info = sandbox_info()
    if info and info.get("redis_url"):
        return str(info["redis_url"])
    return DEFAULT_REDIS_URL


def local_node(explicit: str | None = None) -> str:
    """--node, then REPLQ_NODE, then the host name."""
    return explicit or os.environ.get("REPLQ_NODE") or socket.gethostname().split(".")[0]


def ssh_key_path() -> Path:
    """The private key used to reach other nodes: REPLQ_SSH_KEY, the sandbox's key, ~/.ssh."""
    env = os.environ.get("REPLQ_SSH_KEY")
    if env:
        return Path(env)
    info = sandbox_info()
    if info and info.get("ssh_key") and not os.environ.get("REPLQ_REDIS_URL"):
        return Path(info["ssh_key"])
    ssh_dir = Path.home() / ".ssh"
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        if (ssh_dir / name).exists():
            return ssh_dir / name
    return ssh_dir / "id_ed25519"
