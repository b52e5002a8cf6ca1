"""replq commands: run (--local, --dry-run) and log (SPEC §8).

`run --local` runs the job in this process, like `pvesr run --id`; it must be started on
the node that holds the guest. `run --dry-run` prints the plan and changes nothing.
Without --local, `run` enqueues to the node workers and follows the job (replq.dispatch).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from replq.cli.base import Env, emit, fail, output_option, pass_env
from replq.model import parse_job_id
from replq.output import human_bytes, table


def _plan_text(plan: dict[str, Any]) -> str:
    head = (
        f"job {plan['job']}: {plan['source']} => {plan['target']}, new snapshot {plan['snapshot']}"
        + (f", rate {plan['rate']:g} MB/s" if plan.get("rate") else "")
    )
    rows = [
        [v["volume"], v["mode"], (v["base"] or "-") + (" (fallback)" if v["fallback"] else ""),
         human_bytes(v["estimated_size"])]
        for v in plan["volumes"]
    ]
    lines = [head, table(["Volume", "Mode", "Base", "EstimatedSize"], rows)]
    for v in plan["volumes"]:
        for name in v["prune_target"]:
            lines.append(f"would delete stale snapshot {v['dataset']}@{name} on {plan['target']}")
    for ds in plan["remove_target_volumes"]:
        lines.append(f"would delete volume {ds} on {plan['target']} (no longer replicated)")
    lines.append(f"estimated total: {human_bytes(plan['estimated_size'])}")
    return "\n".join(lines)


@click.command("run")
@click.option("--id", "job_id", metavar="ID", help="The replication job (VMID-N).")
@click.option("--local", is_flag=True, help="Run the job in this process (on the guest's node).")
@click.option("--no-wait", is_flag=True, help="Only enqueue the job.")
@click.option("--dry-run", is_flag=True, help="Print the plan (full/incremental, base, size); change nothing.")
@click.option("--verbose", is_flag=True, help="Print the replication log's messages while running (with --local).")
@click.option("--mail", is_flag=True, help="Call the failure notification hook for a job that fails (not with --id).")
@click.option("--discard-target-changes", "discard", is_flag=True,
              help="If the target diverged, keep its state aside (renamed, never deleted) and replicate anyway.")
@output_option
@pass_env
def run_cmd(env: Env, job_id: str | None, local: bool, no_wait: bool, dry_run: bool, verbose: bool, mail: bool,
            discard: bool, output_format: str) -> None:  # fmt: skip
    """Run a replication job now (pvesr run); without --id, every job that is due."""
    # The engine imports paramiko, the runtime Celery (~0.3 s each): only what this run needs.
    if mail and job_id:
        raise click.UsageError("Mail and id are mutually exclusive!")  # pvesr's words
    if (local or dry_run or discard) and not job_id:
        raise click.UsageError("--local, --dry-run and --discard-target-changes need --id")
    if local and dry_run:
        raise click.UsageError("--local and --dry-run exclude each other")
    if discard and dry_run:
        raise click.UsageError("--discard-target-changes and --dry-run exclude each other")
    if job_id is not None:
        parse_job_id(job_id)
    store = env.store()
    if dry_run:
        assert job_id is not None
        from replq.replicate import plan_job

        plan = plan_job(store, job_id, env.node)
        emit(plan, output_format, lambda: _plan_text(plan))
        return
    if not local:
        from replq.dispatch import queued_ttl, run_remote

        if discard:
            assert job_id is not None
            store.get_job(job_id)
            store.request_discard(job_id, queued_ttl())

        # Enqueue to the worker of the guest's node and follow it (the exit code is the job's result).
        code = run_remote(store, [job_id] if job_id else None, wait=not no_wait, redis_url=env.redis_url, mail=mail)
        if discard and not no_wait:
            store.take_discard(job_id)  # not taken by a run (no worker, refused): it must not linger
        sys.exit(code)
    assert job_id is not None
    from replq.replicate import run_job

    # pvesr run --verbose prints the log's messages without their time and job prefix.
    echo = (lambda line: click.echo(line.split(": ", 1)[-1], err=output_format != "text")) if verbose else None
    result = run_job(store, job_id, env.node, echo=echo, discard=discard)
    data = {
        "id": result.job_id,
        "ok": result.ok,
        "start": result.start,
        "duration": result.duration,
        "bytes": result.bytes,
        "error": result.error,
    }
    if output_format != "text":
        emit(data, output_format)
    if not result.ok:
        fail(result.error or "replication failed")


@click.command("log")
@click.argument("job_id", metavar="ID")
@output_option
@pass_env
def log_cmd(env: Env, job_id: str, output_format: str) -> None:
    """Show the replication log of the job's last run."""
    parse_job_id(job_id)
    store = env.store()
    store.get_job(job_id)  # an unknown job is an error, not an empty log
    lines = store.read_log(job_id)
    emit(lines, output_format, "\n".join(lines))
