"""replq commands: the cluster inventory (node, storage, guest), kept in the store as pmxcfs keeps it in Proxmox."""

from __future__ import annotations

import sys
from typing import Any

import click

from replq.cli.base import Env, ListOption, emit, group, output_option, pass_env
from replq.errors import NotFound, ValidationError
from replq.model import (
    Disk,
    Guest,
    Node,
    Storage,
    check_node_name,
    check_vmid,
    host_key_fingerprint,
    replicatable_volumes,
    show,
)
from replq.output import table
from replq.rows import guest_row, node_row, storage_row


# ---- node ---------------------------------------------------------------------------------
@group("node")
def node_group() -> None:
    """Cluster nodes (SSH address, user, pinned host key)."""


@node_group.command("add")
@click.argument("name")
@click.option("--address", required=True, metavar="HOST[:PORT]", help="SSH address of the node.")
@click.option("--user", default="root", show_default=True, help="SSH user.")
@click.option("--host-key", metavar="KEY", help="Pin this host key ('ssh-ed25519 AAAA...') instead of fetching it.")
@click.option("--yes", "-y", is_flag=True, help="Pin the fetched host key without asking (compare its fingerprint!).")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1, 300), help="Fetch timeout (s).")
@output_option
@pass_env
def node_add(env: Env, name: str, address: str, user: str, host_key: str | None, yes: bool, timeout: float,
             output_format: str) -> None:
    """Add a node and pin its SSH host key: the one given, or the one fetched from the node once
    you confirm its fingerprint (interactively, or --yes)."""
    node = Node(name, address, user, host_key)  # validate everything before touching the network
    store = env.store()
    fetched = node.host_key is None
    if fetched:
        # paramiko costs ~0.3 s to import: only `node add` without --host-key needs it.
        from replq.ssh import fetch_host_key

        node.host_key = fetch_host_key(node.host, node.port, timeout)
        if not yes and _needs_trust(store, node):
            _confirm_host_key(node)
    added = store.add_node(node)
    fp = host_key_fingerprint(node.host_key or "")
    data = {**node_row(node), "added": added, "fetched": fetched}
    verb = "added" if added else "unchanged"
    emit(data, output_format, f"node '{node.name}' {verb}; host key {fp}")


def _needs_trust(store: Any, node: Node) -> bool:
    """A fetched key needs the operator's word unless the node has it pinned already (a different
    pinned key is refused by the store anyway)."""
    try:
        return store.get_node(node.name).host_key is None
    except NotFound:
        return True


def _confirm_host_key(node: Node) -> None:
    """Trust on first use never happens silently: the operator compares the fingerprint first."""
    fp = host_key_fingerprint(node.host_key or "")
    where = f"{node.host}:{node.port}"
    if not sys.stdin.isatty():
        raise ValidationError(f"node '{node.name}': {where} offers host key {fp}; not pinned without confirmation "
                              "(compare it on the node, then add --yes, or give --host-key)")
    click.echo(f"Node '{node.name}' ({where}) offers the host key {fp}.\n"
               "Compare it on the node: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub", err=True)
    if not click.confirm("Pin this host key?", default=False, err=True):
        raise ValidationError(f"node '{node.name}' not added: host key not confirmed")


@node_group.command("list")
@output_option
@pass_env
def node_list(env: Env, output_format: str) -> None:
    """List nodes."""
    nodes = env.store().list_nodes()
    rows = [node_row(n) for n in nodes]
    emit(rows, output_format, lambda: table(["Name", "Address", "User", "HostKey"],
                                            [(r["name"], r["address"], r["user"], r["fingerprint"] or "-")
                                             for r in rows]))


@node_group.command("remove")
@click.argument("name")
@pass_env
def node_remove(env: Env, name: str) -> None:
    """Remove a node (refused while guests live there or jobs target it)."""
    env.store().remove_node(check_node_name(name))


# ---- storage ------------------------------------------------------------------------------
@group("storage")
def storage_group() -> None:
    """Storages (zfspool: the same pool name on every node it is on)."""


@storage_group.command("add")
@click.argument("sid", metavar="ID")
@click.option("--pool", help="ZFS dataset holding the volumes, e.g. rpool/data.")
@click.option("--type", "stype", default="zfspool", show_default=True, help="Storage type (only zfspool replicates).")
@click.option("--nodes", cls=ListOption, metavar="N1,N2", help="Restrict the storage to these nodes (repeatable).")
@click.option("--disable", is_flag=True, help="Add it disabled.")
@pass_env
def storage_add(env: Env, sid: str, pool: str | None, stype: str, nodes: str | None, disable: bool) -> None:
    """Add a storage."""
    node_list_ = None
    if nodes is not None:
        node_list_ = [n.strip() for n in nodes.split(",")]
        if any(not n for n in node_list_):
            raise ValidationError(f"--nodes: invalid node list '{show(nodes)}'")
    env.store().add_storage(Storage(sid, pool, stype, node_list_, not disable))


@storage_group.command("list")
@output_option
@pass_env
def storage_list(env: Env, output_format: str) -> None:
    """List storages."""
    st = env.store().list_storages()
    emit([storage_row(s) for s in st], output_format, lambda: table(
        ["ID", "Type", "Pool", "Nodes", "Enabled"],
        [(s.id, s.type, s.pool or "-", ",".join(s.nodes) if s.nodes else "all", "yes" if s.enabled else "no")
         for s in st]))


@storage_group.command("remove")
@click.argument("sid", metavar="ID")
@pass_env
def storage_remove(env: Env, sid: str) -> None:
    """Remove a storage definition (the data stays; replication skips its disks)."""
    env.store().remove_storage(sid)


# ---- guest --------------------------------------------------------------------------------
@group("guest")
def guest_group() -> None:
    """Guests (VMs and containers) and their disks."""


@guest_group.command("add")
@click.argument("vmid", metavar="VMID")
@click.option("--node", "node_name", required=True, help="The node the guest lives on.")
@click.option("--type", "gtype", default="lxc", show_default=True, help="lxc or qemu.")
@click.option("--disk", "disks", multiple=True, metavar="STORAGE:VOLNAME[,replicate=0]", help="A disk (repeatable).")
@pass_env
def guest_add(env: Env, vmid: str, node_name: str, gtype: str, disks: tuple[str, ...]) -> None:
    """Register a guest and its disks."""
    env.store().add_guest(Guest(check_vmid(vmid), node_name, gtype, [Disk.parse(d) for d in disks]))


@guest_group.command("set-disks")
@click.argument("vmid", metavar="VMID")
@click.option("--disk", "disks", multiple=True, required=True, metavar="STORAGE:VOLNAME[,replicate=0]",
              help="The guest's disks from now on (repeatable; replaces the list).")
@pass_env
def guest_set_disks(env: Env, vmid: str, disks: tuple[str, ...]) -> None:
    """Replace a guest's disks (the jobs follow at their next run)."""
    env.store().set_guest_disks(check_vmid(vmid), [Disk.parse(d) for d in disks])


@guest_group.command("list")
@output_option
@pass_env
def guest_list(env: Env, output_format: str) -> None:
    """List guests."""
    guests = env.store().list_guests()
    emit([guest_row(g) for g in guests], output_format, lambda: table(
        ["VMID", "Type", "Node", "Disks", "Status"],
        [(g.vmid, g.type, g.node, ",".join(d.volid + ("" if d.replicate else "(replicate=0)") for d in g.disks) or "-",
          "removing" if g.purge else "ok") for g in guests]))


@guest_group.command("show")
@click.argument("vmid", metavar="VMID")
@output_option
@pass_env
def guest_show(env: Env, vmid: str, output_format: str) -> None:
    """Show a guest, its disks, what replication copies, and its jobs."""
    store = env.store()
    guest = store.get_guest(check_vmid(vmid))
    storages = {s.id: s for s in store.list_storages()}
    try:
        volumes: list[str] | str = [d.volid for d in replicatable_volumes(guest, storages)]
    except ValidationError as exc:
        volumes = str(exc)
    data = {**guest.to_dict(), "replicatable": volumes, "jobs": store.job_ids(guest.vmid)}
    emit(data, output_format)


@guest_group.command("remove")
@click.argument("vmid", metavar="VMID")
@click.option("--purge", is_flag=True, help="Also remove its replication jobs (and their replicas).")
@pass_env
def guest_remove(env: Env, vmid: str, purge: bool) -> None:
    """Remove a guest. Refused while it has jobs unless --purge, which marks every job for full
    removal; the guest record goes with its last job."""
    marked = env.store().remove_guest(check_vmid(vmid), purge)
    if marked:
        click.echo(f"guest {vmid}: marked for removal with its job(s) {', '.join(marked)}")
