"""replq commands: the pvesr job commands (SPEC §8).

create-local-job, update, delete, enable, disable, read, list, status, schedule-now, set-state.
Thin: parse, validate with the model, call the store, print.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any
from zoneinfo import ZoneInfo

import click

from replq import schedule
from replq.cli.base import Env, ListOption, emit, output_option, pass_env, split_list
from replq.cli.pvesr import list_text, pretty_json, read_data, status_text
from replq.errors import NotFound, ValidationError
from replq.jobstate import status_row
from replq.model import (
    PVESR_IGNORED_STATE,
    Job,
    check_node_name,
    check_state_fields,
    check_vmid,
    parse_job_id,
    show,
)
from replq.rows import job_row
from replq.store import job_digest
from replq.views import check_digest


@click.command("create-local-job")
@click.argument("job_id", metavar="ID")
@click.argument("target")
@click.option("--schedule", help="Calendar event (default */15).")
@click.option("--rate", help="Rate limit in MB/s (decimal, ≥ 1).")
@click.option("--comment", help="Free text.")
@click.option("--disable", is_flag=True, help="Create the job disabled.")
@click.option("--source", help="The node the guest lives on (normally recorded by the job's runs).")
@click.option("--remove_job", "remove_job", metavar="local|full", help="Create it marked for removal.")
@pass_env
def create_local_job(env: Env, job_id: str, target: str, schedule: str | None, rate: str | None,
                     comment: str | None, disable: bool, source: str | None, remove_job: str | None) -> None:
    """Create a replication job ID (VMID-N) of the guest to TARGET."""
    fields: dict[str, Any] = {"disable": disable}
    for key, value in (("schedule", schedule), ("rate", rate), ("comment", comment), ("source", source),
                       ("remove_job", remove_job)):
        if value is not None:
            fields[key] = value
    env.store().create_job(Job(id=job_id, target=target, **fields))


@click.command("update")
@click.argument("job_id", metavar="ID")
@click.option("--schedule", help="Calendar event.")
@click.option("--rate", help="Rate limit in MB/s (decimal, ≥ 1).")
@click.option("--comment", help="Free text.")
@click.option("--disable", type=click.BOOL, metavar="[0|1]", help="Disable (1, or no value) or enable (0) the job.")
@click.option("--source", help="The node the guest lives on.")
@click.option("--remove_job", "remove_job", metavar="local|full", help="Mark the job for removal (as `delete`).")
@click.option("--delete", "delete", cls=ListOption, metavar="PROP[,PROP]",
              help="Unset properties (schedule, rate, comment, ...); repeatable.")
@click.option("--digest", help="Refuse the change if the job changed since this digest was read.")
@pass_env
def update(env: Env, job_id: str, schedule: str | None, rate: str | None, comment: str | None,
           disable: bool | None, source: str | None, remove_job: str | None, delete: str | None,
           digest: str | None) -> None:
    """Change a replication job (target is fixed). Nothing to change is no error, as in pvesr."""
    parse_job_id(job_id)
    changes: dict[str, Any] = {}
    for key, value in (("schedule", schedule), ("rate", rate), ("comment", comment), ("source", source),
                       ("remove_job", remove_job)):
        if value is not None:
            changes[key] = value
    if disable is not None:
        changes["disable"] = disable
    if digest is not None:
        check_digest(digest, "--digest")
    env.store().update_job(job_id, changes, split_list(delete), digest)


@click.command("delete")
@click.argument("job_id", metavar="ID")
@click.option("--keep", is_flag=True, help="Keep the replicated volumes on the target (only snapshots are removed).")
@click.option("--force", is_flag=True, help="Remove the job config at once, without any cleanup.")
@pass_env
def delete(env: Env, job_id: str, keep: bool, force: bool) -> None:
    """Mark a replication job for removal (done by its next run), or remove it at once with --force
    (a job that does not exist is then no error, as in pvesr)."""
    if keep and force:
        raise click.UsageError("--keep and --force are mutually exclusive")
    parse_job_id(job_id)
    if force:
        with contextlib.suppress(NotFound):
            env.store().delete_job(job_id)
    else:
        env.store().mark_remove(job_id, "local" if keep else "full")


@click.command("enable")
@click.argument("job_id", metavar="ID")
@pass_env
def enable(env: Env, job_id: str) -> None:
    """Enable a replication job."""
    parse_job_id(job_id)
    env.store().update_job(job_id, {}, ["disable"])


@click.command("disable")
@click.argument("job_id", metavar="ID")
@pass_env
def disable(env: Env, job_id: str) -> None:
    """Disable a replication job."""
    parse_job_id(job_id)
    env.store().update_job(job_id, {"disable": True})


@click.command("read")
@click.argument("job_id", metavar="ID")
@output_option
@pass_env
def read(env: Env, job_id: str, output_format: str) -> None:
    """Show a replication job's configuration as pvesr does (pretty JSON, sorted keys, set
    properties only), with the digest for `update --digest`."""
    job = env.store().get_job(job_id)
    data = read_data(job, job_digest(job))
    if output_format == "text":
        click.echo(pretty_json(data))
    else:
        emit({**data, "disable": True} if job.disable else data, output_format)


@click.command("list")
@output_option
@pass_env
def list_jobs(env: Env, output_format: str) -> None:
    """List replication jobs."""
    jobs = env.store().list_jobs()
    emit([job_row(j) for j in jobs], output_format, lambda: list_text(jobs))


@click.command("status")
@click.option("--guest", metavar="VMID", help="Only this guest's jobs.")
@click.option("--node", "node", metavar="NAME",
              help="Only the jobs of the guests on this node, as pvesr shows them (also: replq --node, REPLQ_NODE).")
@click.option("--progress", is_flag=True, help="A running job's State: SYNCING and its bytes, rate and ETA "
                                               "(not pvesr's format; JSON always has `progress`).")
@output_option
@pass_env
def status(env: Env, guest: str | None, node: str | None, progress: bool, output_format: str) -> None:
    """Replication status of every job in the cluster, or of one node's guests (--node), or one guest's."""
    store = env.store()
    vmid = check_vmid(guest) if guest is not None else None
    scope = node if node is not None else env.explicit_node
    entries = store.jobs_with_state(vmid)
    if scope is not None:
        # pvesr's job_status: the jobs of the guests on this node (not one to this node itself,
        # unless it is being removed).
        here = {g.vmid for g in store.list_guests() if g.node == check_node_name(scope)}
        entries = [(j, s, ns) for j, s, ns in entries if j.guest in here and (j.remove_job or j.target != scope)]
    if output_format != "text":
        emit([status_row(j, s, ns) for j, s, ns in entries], output_format)
        return
    settings = store.get_settings()
    now = time.time()
    # A disabled job shows when it would be due, as pvesr computes next_sync for it too.
    rows = [(j, s, schedule.next_sync(j, s, settings["retry_interval"], settings["timezone"], now, as_if_enabled=True)
             if j.disable and not j.remove_job else ns) for j, s, ns in entries]
    emit(None, "text", status_text(rows, now, ZoneInfo(settings["timezone"]), progress))


@click.command("schedule-now")
@click.argument("job_id", metavar="ID")
@pass_env
def schedule_now(env: Env, job_id: str) -> None:
    """Make the job due at the next scheduler tick (last_try = 0; fail_count is kept)."""
    parse_job_id(job_id)
    env.store().update_state(job_id, last_try=0)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise ValidationError(f"state: duplicate key '{show(k)}'")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise ValidationError(f"state: {name} is not a valid number")


def parse_state_json(vmid: int, text: str) -> dict[str, dict[str, Any]]:
    """set-state's argument, strict: {KEY: {state fields}} for jobs of guest VMID, where KEY is a job
    id or, as pvesr writes it (PVE::ReplicationState), `local/<target>`. Values are checked here;
    `local/<target>` keys are mapped to jobs by `map_targets`."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValidationError(f"state: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValidationError("state: expected a JSON object mapping job IDs (or local/TARGET) to job states")
    out = {}
    for key, st in data.items():
        if key.startswith("local/"):
            check_node_name(key[len("local/"):], "target node name")
        else:
            guest, _ = parse_job_id(key)
            if guest != vmid:
                raise ValidationError(f"state: job '{key}' does not belong to guest {vmid}")
        if not isinstance(st, dict):
            raise ValidationError(f"state: the state of '{key}' must be an object")
        fields = {k: v for k, v in st.items() if k not in PVESR_IGNORED_STATE}
        try:
            out[key] = check_state_fields(fields, allow_runtime=False)
        except ValidationError as exc:
            raise ValidationError(f"state of '{key}': {exc}") from None
    return out


def map_targets(vmid: int, states: dict[str, dict[str, Any]], jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """pvesr's form → job ids: `local/<target>` is the guest's job to that target. pvesr replaces
    the guest's whole state with it, so the guest's jobs it does not name are reset."""
    if not any(k.startswith("local/") for k in states):
        return states
    by_target = {j.target: j.id for j in jobs}
    out: dict[str, dict[str, Any]] = {}
    for key, fields in states.items():
        job_id = key
        if key.startswith("local/"):
            target = key[len("local/"):]
            if target not in by_target:
                raise ValidationError(f"state: guest {vmid} has no replication job to target '{target}'")
            job_id = by_target[target]
        if job_id in out:
            raise ValidationError(f"state: job '{job_id}' is given twice")
        out[job_id] = fields
    return {**{j.id: {} for j in jobs}, **out}


@click.command("set-state")
@click.argument("vmid", metavar="VMID")
@click.argument("state", metavar="STATE")
@pass_env
def set_state(env: Env, vmid: str, state: str) -> None:
    """Set the replication state of a guest's jobs (pvesr: used on migration), as pvesr sends it,
    '{"local/pve2": {"last_sync": 1700000000, "fail_count": 0, ...}}' (the whole guest's state),
    or by job id, '{"100-0": {...}}'. Unlisted fields are reset; last_iteration, pid, ptime are ignored."""
    v = check_vmid(vmid)
    states = parse_state_json(v, state)
    store = env.store()
    store.get_guest(v)
    store.replace_states(map_targets(v, states, store.list_jobs(v)))
