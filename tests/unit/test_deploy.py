"""docker-compose.yml and the systemd units: parsed (no Docker engine runs here) and checked for what matters:
every command is a real replq command with valid options, Redis persists (AOF) and needs a password,
each worker serves one node's queue with the host's ZFS and SSH key, everything restarts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from replq.cli import cli

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
VAR_RE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")
SAMPLE = {"REPLQ_REDIS_PASSWORD": "pw", "REPLQ_FLOWER_PASSWORD": "fpw", "REPLQ_NODE": "pve1",
          "REPLQ_REDIS_HOST": "10.0.0.1", "REPLQ_BIND": "127.0.0.1", "REPLQ_SSH_DIR": "/root/.ssh",
          "REPLQ_FLOWER_USER": "admin", "REPLQ_NOTIFY_URL": "", "REPLQ_WEB_USER": "admin",
          "REPLQ_WEB_PASSWORD": "wpw", "REPLQ_METRICS_USER": "", "REPLQ_METRICS_PASSWORD": ""}


def interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} with sample values; an unknown variable fails."""
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in SAMPLE, f"unexpected variable {m.group(1)} in {value!r}"
        return SAMPLE[m.group(1)]

    out = VAR_RE.sub(sub, value)
    assert "${" not in out and "$" not in out.replace("$$", ""), f"malformed interpolation in {value!r}"
    return out


def parse_replq(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse argv exactly as `replq` would (click), returning the command and its parameters."""
    assert argv[0] == "replq" or argv[0].endswith("/replq"), argv
    ctx = cli.make_context("replq", list(argv[1:]))
    group: click.Command = cli
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    while isinstance(group, click.Group):
        name, cmd, rest = group.resolve_command(ctx, rest)
        assert cmd is not None, argv
        ctx = cmd.make_context(name, rest, parent=ctx)
        group = cmd
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    return group.name or "", ctx.params


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_parse_replq_rejects_what_replq_rejects() -> None:
    assert parse_replq(["replq", "metrics", "--port", "9737"])[1]["port"] == 9737
    for bad in (["replq", "nonesuch"], ["replq", "metrics", "--bogus"], ["replq", "flower", "--port", "x"]):
        with pytest.raises(click.UsageError):
            parse_replq(bad)


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"redis", "beat", "flower", "web", "metrics", "worker"}
    for name, svc in services.items():
        assert svc.get("restart") in ("always", "unless-stopped"), name
    commands = {}
    for name in ("beat", "flower", "web", "metrics", "worker"):
        argv = [interpolate(a) for a in services[name]["command"]]
        commands[name] = parse_replq(argv)
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert commands["beat"][0] == "beat"
    assert commands["flower"] == ("flower", {"port": 5555, "address": "0.0.0.0", "basic_auth": None})
    assert commands["metrics"] == ("metrics", {"port": 9737, "address": "0.0.0.0", "basic_auth": None})
    assert commands["web"] == ("web", {"port": 8737, "address": "0.0.0.0", "basic_auth": None,
                                       "hash_password": False})
    assert commands["worker"][0] == "worker" and commands["worker"][1]["node"] == "pve1"
    assert (ROOT / "deploy" / "Dockerfile").exists()


def test_compose_redis_persistent_with_password(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    cmd = redis["command"]
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    password = cmd[cmd.index("--requirepass") + 1]
    assert password.startswith("${REPLQ_REDIS_PASSWORD:?"), "the password must be required, never defaulted"
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "redis-data" in compose["volumes"]
    # Every replq service connects with that password.
    for name in ("beat", "flower", "web", "metrics", "worker"):
        url = interpolate(compose["services"][name]["environment"]["REPLQ_REDIS_URL"])
        assert url.startswith("redis://:pw@") and url.endswith(":6379/0"), (name, url)
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            assert interpolate(port).startswith("127.0.0.1:"), "published on loopback unless REPLQ_BIND says so"


@pytest.mark.parametrize("name", ["flower", "web"])
def test_compose_flower_and_web_need_credentials(compose: dict[str, Any], name: str) -> None:
    env = compose["services"][name]["environment"]
    prefix = f"REPLQ_{name.upper()}_"
    assert env[prefix + "PASSWORD"].startswith(f"${{{prefix}PASSWORD:?")
    assert interpolate(env[prefix + "USER"]) == "admin"


def test_compose_worker_per_node_with_host_zfs_and_ssh(compose: dict[str, Any]) -> None:
    from replq.app import queue_name

    w = compose["services"]["worker"]
    assert w["profiles"] == ["worker"]  # started per node, not with the control services
    assert w["privileged"] is True and w["network_mode"] == "host"
    assert "/dev/zfs:/dev/zfs" in w["devices"]
    assert interpolate(w["environment"]["REPLQ_NODE"]) == "pve1"
    node = parse_replq([interpolate(a) for a in w["command"]])[1]["node"]
    assert queue_name(node) == "replq.node.pve1"
    key = Path(w["environment"]["REPLQ_SSH_KEY"])
    mounts = [interpolate(v).split(":") for v in w["volumes"]]
    assert any(key.parent == Path(m[1]) and m[2:] == ["ro"] for m in mounts), "SSH key mounted read-only"
    assert "depends_on" not in w  # a node's worker must not start a Redis of its own


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's format: sections, `Key=value` lines (a key may repeat), '#'/';' comments."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), raw
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        assert section is not None and "=" in line, raw
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


UNIT_FILES = {"replq-worker@.service": "worker", "replq-beat.service": "beat",
              "replq-flower.service": "flower", "replq-metrics.service": "metrics", "replq-web.service": "web"}


@pytest.mark.parametrize("filename,command", sorted(UNIT_FILES.items()))
def test_systemd_unit(filename: str, command: str) -> None:
    unit = read_unit(UNITS / filename)
    svc = unit["Service"]
    assert svc["EnvironmentFile"] == ["/etc/replq/replq.env"]
    assert svc["Restart"] == ["always"] and int(svc["RestartSec"][0]) > 0
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "network-online.target" in unit["Unit"]["After"][0]
    (exec_start,) = svc["ExecStart"]
    argv = [a.replace("%i", "pve1") for a in shlex.split(exec_start)]
    name, params = parse_replq(argv)
    assert name == command
    if command == "worker":
        assert "--node %i" in exec_start and params["node"] == "pve1"
        assert svc["KillMode"] == ["mixed"] and svc.get("User", ["root"]) == ["root"]
    if command in ("flower", "web"):
        assert params["address"] == "127.0.0.1"


BACKUP_UNITS = ("replq-backup.service", "replq-backup.timer")


def test_backup_unit() -> None:
    """The backup runs `replq config backup --state` with the units' environment into a file only
    root can read, renamed only once complete."""
    svc = read_unit(UNITS / "replq-backup.service")["Service"]
    assert svc["EnvironmentFile"] == ["/etc/replq/replq.env"] and svc["UMask"] == ["0077"]
    (exec_start,) = svc["ExecStart"]
    script = shlex.split(exec_start)[2]
    assert "/opt/replq/venv/bin/replq config backup --state > \"$f.tmp\" && mv \"$f.tmp\" \"$f\"" in script
    assert parse_replq(["replq", "config", "backup", "--state"])[0] == "backup"
    timer = read_unit(UNITS / "replq-backup.timer")
    assert timer["Timer"]["OnCalendar"] == ["hourly"] and timer["Install"]["WantedBy"] == ["timers.target"]


def test_environment_file() -> None:
    env = {}
    for line in (UNITS / "replq.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k] = v
    assert set(env) >= {"REPLQ_REDIS_URL", "REPLQ_FLOWER_USER", "REPLQ_FLOWER_PASSWORD", "REPLQ_SSH_KEY",
                        "REPLQ_WEB_USER", "REPLQ_WEB_PASSWORD"}
    assert env["REPLQ_REDIS_URL"].startswith("redis://:")  # with a password


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser finds no unknown keys or bad values (paths pointed at this checkout)."""
    replq_bin = ROOT / ".venv" / "bin" / "replq"
    for filename in [*UNIT_FILES, *BACKUP_UNITS]:
        text = (UNITS / filename).read_text()
        text = text.replace("/opt/replq/venv/bin/replq", str(replq_bin))
        text = text.replace("/etc/replq/replq.env", str(UNITS / "replq.env"))
        (tmp_path / filename.replace("@.", "@pve1.")).write_text(text)
    units = sorted(str(p) for p in tmp_path.iterdir())
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_readme_replq_commands_parse() -> None:
    """Every `.venv/bin/replq …` line in README's shell blocks is a command replq accepts."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith(".venv/bin/replq "):
                lines.append(line)
    assert len(lines) >= 8
    for line in lines:
        parse_replq(shlex.split(line))
