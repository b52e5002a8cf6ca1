"""The `replq` command line: the root group, `main()`, and every command attached to it.

The commands live in one module per family and import only replq.cli.base (never this
module), which keeps the layers one-way:

    jobs.py       pvesr's job commands: create-local-job, update, delete, enable, disable, read,
                  list, status, schedule-now, set-state
    run.py        run (to the guest's worker, --local, --dry-run, --mail) and log
    localjob.py   prepare-local-job, finalize-local-job (a job's steps on its target)
    inventory.py  node, storage, guest
    migrate.py    migrate, guest move
    config.py     settings, config export/import
    calendar.py   calendar (preview a schedule)
    runtime.py    worker, beat          services.py  flower, metrics
    sandbox.py    sandbox (the local multi-node cluster)
    web.py        web (the web GUI and its JSON API)
    help.py       help [CMD] [--verbose] (pvesr's)      grammar.py  pvesr's option grammar (every group)
"""

from __future__ import annotations

import click

from replq.cli import (
    calendar,
    config,
    help,
    inventory,
    jobs,
    localjob,
    migrate,
    run,
    runtime,
    sandbox,
    services,
    web,
)
from replq.cli.base import Env, group, run_group


@group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--redis", "redis_url", metavar="URL", help="Redis URL (else REPLQ_REDIS_URL, the sandbox, the default).")
@click.option("--node", "node", metavar="NAME", help="This process's node (else REPLQ_NODE, the host name).")
@click.version_option(package_name="replq")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, node: str | None) -> None:
    """replq: scheduled ZFS storage replication for guests (pvesr-compatible)."""
    ctx.obj = Env(redis_url, node)


for command in (
    jobs.create_local_job, jobs.update, jobs.delete, jobs.enable, jobs.disable, jobs.read, jobs.list_jobs,
    jobs.status, jobs.schedule_now, jobs.set_state, localjob.prepare_local_job, localjob.finalize_local_job,
    run.run_cmd, run.log_cmd,
    inventory.node_group, inventory.storage_group, inventory.guest_group,
    migrate.migrate_cmd,
    config.settings_group, config.config_group,
    calendar.calendar_cmd,
    runtime.worker_cmd, runtime.beat_cmd, services.flower, services.metrics,
    sandbox.sandbox, web.web_cmd, help.help_cmd,
):
    cli.add_command(command)
inventory.guest_group.add_command(migrate.guest_move_cmd)


def main(argv: list[str] | None = None) -> None:
    """Entry point (`replq`): every error ends as one line on stderr, never a traceback."""
    run_group(cli, argv)


__all__ = ["cli", "main"]
