"""`replq sandbox …`: the local multi-node cluster (SPEC §8)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from replq.cli.base import emit, group, output_option
from replq.redact import redact_url
from replq.sandbox import Sandbox, SandboxError, default_dir


def _existing(directory: Path | None) -> Sandbox:
    sb = Sandbox(directory)
    if not sb.exists:
        raise SandboxError(f"no sandbox in {sb.dir} (replq sandbox up)")
    return sb


dir_option = click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
                          help=f"Sandbox directory (else REPLQ_SANDBOX_DIR, the running sandbox, {default_dir()}).")


@group("sandbox")
def sandbox() -> None:
    """A real multi-node ZFS cluster on this machine (zfs-fuse + sshd per node)."""


@sandbox.command("up")
@click.option("--nodes", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--no-services", is_flag=True, help="Do not start beat, workers, Flower, the web GUI and metrics.")
@click.option("--pool-size", default="1G", show_default=True, help="Size of each node's pool file (e.g. 512M, 4G).")
@dir_option
def up(nodes: int, no_services: bool, pool_size: str, directory: Path | None) -> None:
    """Bring up nodes node1..nodeN with their pools, sshd and a Redis for the cluster."""
    sb = Sandbox(directory)
    sb.up(nodes=nodes, services=not no_services, pool_size=pool_size)
    nodes_text = ", ".join(f"{n} ({sb.node_info(n)['address']})" for n in sb.node_names())
    click.echo(f"sandbox up in {sb.dir}: {nodes_text}")
    click.echo(f"redis: {redact_url(sb.redis_url)}")  # the full URL: sandbox env / status --output-format json
    for name in ("flower", "web"):
        if sb.state.get(name):
            f = sb.state[name]
            click.echo(f"{name}: {f['url']} (user {f['user']}, password {f['password']})")


@sandbox.command("status")
@dir_option
@output_option
def status(directory: Path | None, output_format: str) -> None:
    """Nodes, their processes, services, the Redis URL, Flower's and the web GUI's addresses."""
    st = _existing(directory).status()

    def text() -> str:
        lines = [f"sandbox {st['dir']}", f"redis   {redact_url(st['redis_url'])}"]
        for n in st["nodes"]:
            pids = " ".join(f"{k}={v}" for k, v in n["pids"].items()) or "-"
            lines.append(f"{n['name']:<8}{n['state']:<9}{n['address']:<22}{pids}")
        for name, svc in st["services"].items():
            lines.append(f"{name:<8}{svc['state']:<9}pid={svc['pid']}")
        for name in ("flower", "web"):
            if st.get(name):
                f = st[name]
                lines.append(f"{name:<8}{f['url']} user={f['user']} password={f['password']}")
        if st.get("metrics"):
            lines.append(f"metrics {st['metrics']['url']}")
        return "\n".join(lines)

    emit(st, output_format, text)


@sandbox.command("env")
@dir_option
def env(directory: Path | None) -> None:
    """Print `export` lines that point another shell at this sandbox."""
    for key, value in _existing(directory).env().items():
        click.echo(f"export {key}={shlex.quote(value)}")


@sandbox.command("exec", context_settings={"ignore_unknown_options": True})
@dir_option
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(directory: Path | None, node: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside NODE (its pool and mounts), with REPLQ_NODE set: exec NODE -- CMD..."""
    sb = _existing(directory)
    r = sb.exec(node, list(command), capture_output=False, text=False)
    sys.exit(r.returncode)


@sandbox.command("stop")
@dir_option
@click.argument("node")
def stop(directory: Path | None, node: str) -> None:
    """Take NODE fully down (worker, sshd, ZFS) as a failed node; its pool file stays."""
    sb = _existing(directory)
    sb.stop_node(node)
    click.echo(f"{node}: down")


@sandbox.command("start")
@dir_option
@click.argument("node")
def start(directory: Path | None, node: str) -> None:
    """Bring NODE back with its data."""
    sb = _existing(directory)
    sb.start_node(node)
    if sb.state.get("services"):
        sb.start_services()
    click.echo(f"{node}: up ({sb.node_info(node)['address']})")


@sandbox.command("down")
@dir_option
def down(directory: Path | None) -> None:
    """Stop every process of the sandbox by PID and remove its files (safe to repeat)."""
    sb = Sandbox(directory)
    sb.down()
    click.echo(f"sandbox in {sb.dir}: down")
