"""`replq worker` and `replq beat`: the Celery runtime's long-running processes (SPEC §8).

Both run in the foreground until SIGTERM (or Ctrl+C) and then stop cleanly:
- the worker stops taking jobs, cancels the runs it holds (each `zfs send` killed as a
  process group, the target rolled back, the attempt recorded as failed — it is retried
  `retry_interval` later), and exits;
- beat releases its active lock, so a standby beat takes over at once.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

import click

from replq import procs
from replq.cli.base import Env, pass_env
from replq.model import check_node_name


@click.command("worker")
@click.option("--node", "node", metavar="NAME", help="The node this worker runs on (else replq --node, REPLQ_NODE, "
                                                        "the host name).")
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Jobs run at the same time on this node (never two of one guest).")
@click.option("--loglevel", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True)
@pass_env
def worker_cmd(env: Env, node: str | None, concurrency: int, loglevel: str) -> None:
    """Run the node worker: consumes the queue replq.node.NODE and runs its jobs (prefork pool)."""
    # Celery and the tasks (~0.5 s to import) only for the worker itself.
    from celery.platforms import SecurityWarning
    from celery.signals import worker_shutting_down

    from replq.app import make_app, queue_name, worker_hostname
    from workers.tasks import CANCEL_SIGNAL

    # ZFS needs root; Celery's advice against it is for pickle-accepting workers (replq: JSON only).
    warnings.filterwarnings("ignore", category=SecurityWarning)
    name = check_node_name(node or env.node)
    env.store().get_node(name)  # a worker for an unknown node would wait forever for nothing
    os.environ["REPLQ_NODE"] = name  # the engine's subprocesses and pool processes know their node
    app = make_app(env.redis_url, node=name)
    app.loader.import_default_modules()

    @worker_shutting_down.connect(weak=False)
    def _cancel_runs(**_: object) -> None:
        # Warm shutdown would wait for hour-long runs: ask each pool process to cancel its run.
        for pid in procs.children(os.getpid()):
            try:
                os.kill(pid, CANCEL_SIGNAL)
            except ProcessLookupError:
                pass

    worker = app.Worker(
        hostname=worker_hostname(name),
        queues=[queue_name(name)],
        concurrency=concurrency,
        pool="prefork",
        loglevel=loglevel.upper(),
        without_gossip=True,  # gossip is chatty with many nodes and replq does not use it
        optimization="fair",
    )
    worker.start()
    sys.exit(worker.exitcode or 0)


@click.command("beat")
@click.option("--loglevel", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", show_default=True)
@pass_env
def beat_cmd(env: Env, loglevel: str) -> None:
    """Run the scheduler: enqueue due jobs to their nodes (several may run; one is active)."""
    from replq.app import make_app  # Celery (~0.3 s): only for beat itself

    env.store().get_settings()  # fail now, with one line, if Redis is not there
    app = make_app(env.redis_url)
    signal.signal(signal.SIGTERM, _raise_exit)
    beat = app.Beat(scheduler="beat.scheduler:ReplqScheduler", loglevel=loglevel.upper(), no_color=True)
    beat.run()


def _raise_exit(*_: object) -> None:
    raise SystemExit(0)
