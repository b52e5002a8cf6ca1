"""replq commands: cluster settings, replication.cfg export/import (Proxmox's format), and
backup/restore of the whole cluster."""

from __future__ import annotations

import time
from pathlib import Path

import click

from replq import backup, settings
from replq.calendar import job_limit_problem
from replq.calendar import parse as parse_calendar
from replq.cfgfile import export_jobs, parse
from replq.cli.base import Env, emit, group, output_option, pass_env
from replq.errors import Conflict, ValidationError
from replq.model import show
from replq.output import table


# ---- settings -----------------------------------------------------------------------------
@group("settings")
def settings_group() -> None:
    """Cluster settings (retry_interval, timezone)."""


@settings_group.command("show")
@output_option
@pass_env
def settings_show(env: Env, output_format: str) -> None:
    """Show the cluster settings."""
    store = env.store()
    s = settings.masked(store.get_settings())
    for key in store.retired_settings():
        click.echo(f"replq: warning: ignored stored setting {key}: {settings.RETIRED.get(key, 'unknown key')}; "
                   f"unset it with: replq settings set {key} ''", err=True)
    emit(s, output_format, lambda: table(["key", "value"], sorted(s.items())))


@settings_group.command("set", context_settings={"ignore_unknown_options": True})  # VALUE may be "-5"
@click.argument("key")
@click.argument("value")
@pass_env
def settings_set(env: Env, key: str, value: str) -> None:
    """Set a cluster setting: retry_interval (s, default 1800), timezone (e.g. Europe/Vienna)."""
    env.store().set_setting(key, value)


# ---- config -------------------------------------------------------------------------------
@group("config")
def config_group() -> None:
    """replication.cfg (Proxmox format) export and import; backup and restore of the whole cluster."""


@config_group.command("export")
@pass_env
def config_export(env: Env) -> None:
    """Print every job in the replication.cfg format, in file order (creation/import order)."""
    store = env.store()
    jobs = {j.id: j for j in store.list_jobs()}
    click.echo(export_jobs([jobs[j] for j in store.job_ids_in_file_order() if j in jobs]), nl=False)


def read_input(path: str) -> str:
    """The text of FILE, or of stdin for '-' (UTF-8)."""
    try:
        raw = click.get_binary_stream("stdin").read() if path == "-" else Path(path).read_bytes()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ValidationError(f"cannot read '{show(path)}': {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(f"'{show(path)}' is not UTF-8 text") from None


@config_group.command("import")
@click.argument("path", metavar="FILE")
@pass_env
def config_import(env: Env, path: str) -> None:
    """Create the jobs of a replication.cfg ('-' = stdin), in file order. All are validated before any
    is written; jobs already present with the same configuration are skipped, different ones refused.
    A schedule outside replq's job limits is imported with a warning (pvesr has no such limits)."""
    jobs = parse(read_input(path))
    store = env.store()
    existing = {j.id: j for j in store.list_jobs()}
    new = []
    for job in jobs:
        old = existing.get(job.id)
        if old is None:
            new.append(job)
        elif old.config() != job.config():
            raise Conflict(f"replication job '{job.id}' already exists with a different configuration")
    store.create_jobs(new, schedule_limits=False)
    tz = store.get_settings()["timezone"]
    for job in new:
        problem = job.schedule and job_limit_problem(parse_calendar(job.schedule), tz)
        if problem:
            click.echo(f"replq: warning: job {job.id}: schedule '{job.schedule}' {problem}; imported as it is "
                       "(pvesr has no such limit), but create-local-job and update would refuse it", err=True)
    click.echo(f"imported {len(new)} job(s), {len(jobs) - len(new)} unchanged")


@config_group.command("backup")
@click.option("--state", "with_state", is_flag=True, help="Also the state of every job (last sync, failures).")
@pass_env
def config_backup(env: Env, with_state: bool) -> None:
    """Print the whole cluster as one JSON document: nodes (with pinned host keys), storages,
    guests, jobs, the settings set, and with --state the jobs' state. It holds secrets (the
    Flower password, the webhook URL): keep it like /etc/replq."""
    cluster = env.store().read_cluster(with_state)
    click.echo(backup.dumps(backup.document(cluster, time.time())))


@config_group.command("restore")
@click.argument("path", metavar="FILE")
@click.option("--force", is_flag=True, help="Replace the cluster the store holds (else refused).")
@pass_env
def config_restore(env: Env, path: str, force: bool) -> None:
    """Restore a cluster from `config backup` output ('-' = stdin). Everything is validated before
    anything is written, in one transaction; a store that holds a cluster is refused unless --force."""
    cluster = backup.parse(backup.loads(read_input(path)))
    env.store().restore_cluster(cluster, force=force)
    click.echo(f"restored {cluster.summary()}")
