"""replq commands: migrate (offline migration) and guest move (recovery from a failed node), SPEC §6.

`migrate` runs in this process and must be started on the node that holds the guest, like
pvesr's `qm migrate` (e.g. `replq sandbox exec node1 -- replq migrate 100 node2`): the delta or
full copy is sent from the local pool, and the command's exit code is the migration's result.
"""

from __future__ import annotations

import time

import click

from replq.cli.base import Env, emit, output_option, pass_env


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d_%H:%M:%S", time.localtime(epoch)) if epoch else "never"


@click.command("migrate")
@click.argument("vmid", metavar="VMID")
@click.argument("target", metavar="TARGET")
@click.option("--verbose", is_flag=True, help="Print the replication log of the delta sync too.")
@output_option
@pass_env
def migrate_cmd(env: Env, vmid: str, target: str, verbose: bool, output_format: str) -> None:
    """Migrate a (stopped) guest to TARGET; run it on the guest's node.

    With a replication job to TARGET only the delta is sent and the guest's jobs switch direction;
    otherwise every volume is copied in full, checked, and the source volumes are deleted."""
    from replq.migrate import migrate  # the engine imports paramiko (~0.3 s): only when migrating

    text = output_format == "text"

    def echo(line: str) -> None:
        if verbose or not line[:4].isdigit():  # engine log lines start with their date
            click.echo(line, err=not text)

    res = migrate(env.store(), vmid, target, env.node, echo=echo)
    data = res.as_dict()
    how = f"delta sync by job {res.job}" if res.mode == "delta" else "full copy"
    lines = [f"guest {res.vmid} migrated from {res.source} to {res.target} ({how}, {res.bytes} bytes, "
             f"{res.duration:.1f} s)"]  # fmt: skip
    lines += [f"warning: {w}" for w in res.warnings]
    emit(data, output_format, "\n".join(lines))


@click.command("move")
@click.argument("vmid", metavar="VMID")
@click.option("--to", "to", metavar="NODE", help="The node that takes over the guest (without: name the freshest).")
@click.option("--force", is_flag=True, help="Move even though the old node is alive (it must be fenced) or another "
              "node holds a newer replica.")
@output_option
@pass_env
def guest_move_cmd(env: Env, vmid: str, to: str | None, force: bool, output_format: str) -> None:
    """Move a guest stuck on a failed node to NODE (recovery; refused while the old node is alive or
    another node holds a newer replica). Without --to, name the node with the freshest replicas.

    Its replication jobs switch direction at their next run and go on incrementally from the newest
    common replication snapshot; data written on the old node after the last sync is not on NODE."""
    from replq import recovery  # paramiko (~0.3 s): only when moving

    if to is None:
        if force:
            raise click.UsageError("--force needs --to")
        found = recovery.propose(env.store(), vmid)
        lines = [f"guest {found['vmid']} lives on node '{found['node']}'; its replicas:"]
        lines += [f"  {r['node']}: {r['dataset']} {r['snapshot'] or '-'} ({r['age']})" for r in found["replicas"]]
        lines += [f"  {n}: cannot be asked: {why}" for n, why in sorted(found["unreachable"].items())]
        if found["freshest"]:
            lines.append(f"the freshest replicas are on node '{found['freshest']}': "
                         f"replq guest move {found['vmid']} --to {found['freshest']}")
        else:
            lines.append("no node holds the freshest replica of every disk")
        emit(found, output_format, "\n".join(lines))
        return
    res = recovery.guest_move(env.store(), vmid, to, force)
    lines = [f"guest {res.vmid} moved from {res.source} to {res.target}"
             + (f" (forced: node '{res.source}' is alive: {res.reason})" if res.reason else "")]
    for j in res.jobs:
        lines.append(f"job {j['id']}: next run replicates {j['source']} => {j['target']} "
                     f"(last sync {_when(j['last_sync'])})")  # fmt: skip
    lines += [f"warning: {w}" for w in res.warnings]
    emit(res.as_dict(), output_format, "\n".join(lines))
