"""replq commands: prepare-local-job and finalize-local-job, a job's steps on its target node
(pvesr's internal commands, for tooling that drives a migration's replication; replq.localjob)."""

from __future__ import annotations

import json

import click

from replq.cli.base import Env, ListOption, pass_env, split_list
from replq.zfs import LocalRunner, Zfs, validate_snapname


def _stderr(line: str) -> None:
    click.echo(line, err=True)


def _here(env: Env) -> Zfs:
    return Zfs(LocalRunner(node=env.node), side="target")


LAST_SYNC = click.option("--last_sync", "last_sync", type=click.IntRange(min=0), default=0, metavar="EPOCH",
                         help="Time (UNIX epoch) of the last successful sync; 0 (default): remove nothing, "
                              "1: remove all of the job's replication snapshots.")


@click.command("prepare-local-job")
@click.argument("job_id", metavar="ID")
@click.argument("volids", metavar="EXTRA-ARGS", nargs=-1)
@click.option("--scan", cls=ListOption, metavar="STORAGE[,STORAGE]",
              help="Storages to scan for stale volumes of the guest (repeatable).")
@click.option("--force", is_flag=True, help="Allow an empty volume list (remove every volume of the job).")
@LAST_SYNC
@click.option("--parent_snapname", "parent_snapname", metavar="NAME", help="A snapshot to keep (the guest's parent).")
@pass_env
def prepare_local_job(env: Env, job_id: str, volids: tuple[str, ...], scan: str | None, force: bool, last_sync: int,
                      parent_snapname: str | None) -> None:
    """On the target node: remove this job's stale replication snapshots and volumes of the guest,
    and print the snapshots of the given volumes as JSON (pvesr's internal step)."""
    from replq.localjob import prepare_local_job as prepare

    if parent_snapname is not None:
        validate_snapname(parent_snapname)
    left = prepare(env.store(), _here(env), env.node, job_id, list(volids), split_list(scan), last_sync,
                   parent_snapname, force, log=_stderr)
    click.echo(json.dumps(left, separators=(",", ":"), sort_keys=True))


@click.command("finalize-local-job")
@click.argument("job_id", metavar="ID")
@click.argument("volids", metavar="EXTRA-ARGS", nargs=-1)
@LAST_SYNC
@pass_env
def finalize_local_job(env: Env, job_id: str, volids: tuple[str, ...], last_sync: int) -> None:
    """On the target node: remove this job's replication snapshots other than last_sync's from the
    given volumes (pvesr's internal step)."""
    from replq.localjob import finalize_local_job as finalize

    finalize(env.store(), _here(env), env.node, job_id, list(volids), last_sync, log=_stderr)
