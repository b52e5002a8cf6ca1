"""The Celery app: the one door to Celery (ARCHITECTURE.md, "Celery settings that matter").

Replication runs take minutes to hours and are not idempotent while running, so:
- early ack (task_acks_late=False) and no prefetch: a message Redis would redeliver after
  `visibility_timeout` is already acknowledged, and a worker holds only what it runs;
- per-job Redis locks in the tasks (workers/tasks.py) make a duplicate run impossible anyway;
- every message carries `expires`, so a pile-up in a dead node's queue does not run stale jobs;
- each node consumes only its own queue `replq.node.<name>`; nothing consumes a default queue.

The broker and result backend are the cluster's Redis (context.redis_url()), read when a
worker, beat or CLI process builds its app, never at import of this module by a library user.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery

from replq import context
from replq.settings import tunable

QUEUE_PREFIX = "replq.node."
DEFAULT_QUEUE = "replq.default"  # consumed by nobody: a message without a node queue is a bug, not work
TASK_REPLICATE = "replq.replicate"
TASK_REMOVE = "replq.remove_job"
# Early ack makes redelivery rare (only reserved-but-unstarted messages of a dead worker);
# it must never happen to a running job, so the timeout is far longer than any run.
VISIBILITY_TIMEOUT = 24 * 3600
WORKER_PREFIX = "replq@"


def queue_name(node: str) -> str:
    return f"{QUEUE_PREFIX}{node}"


def worker_hostname(node: str) -> str:
    return f"{WORKER_PREFIX}{node}"


def make_app(redis_url: str | None = None, node: str | None = None) -> Celery:
    """A Celery app on `redis_url` (default: context.redis_url()); `node` is set in workers."""
    url = redis_url or context.redis_url()
    app = Celery("replq", broker=url, backend=url, include=["workers.tasks", "workers.heartbeat"], set_as_current=False)
    transport = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "socket_keepalive": True,
        "socket_connect_timeout": 10,
        "health_check_interval": 10,
        # No retry_on_timeout: kombu then publishes a whole tick's messages in one pipeline, which
        # it does only where a timed-out pipeline is never replayed (no duplicate messages).
    }
    app.conf.update(
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,  # celery 5.7, Redis only: reserve no more than the pool can run
        broker_transport_options=transport,
        result_backend_transport_options={"retry_policy": {"timeout": 30.0}},
        redis_socket_keepalive=True,
        redis_retry_on_timeout=True,
        redis_backend_health_check_interval=10,
        # Reconnect forever after a Redis restart rather than exit: a worker mid-run keeps its job.
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_heartbeat=0,
        # Cancels only late-ack tasks on a broker connection loss; replq's are acked early, so a
        # running job goes on through a Redis restart (setting it also silences Celery's warning).
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 86400,
        timezone="UTC",
        enable_utc=True,
        task_default_queue=DEFAULT_QUEUE,
        task_create_missing_queues=True,
        worker_pool="prefork",
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        beat_schedule={},  # replq's scheduler reads the store, not a static schedule
        # replq's own settings, read by the tasks in the pool processes
        replq_redis_url=url,
        replq_node=node,
    )
    return app


def enqueue_expires() -> int:
    return int(tunable("enqueue_expires"))


def ping_worker(node: str, timeout: float = 2.0, redis_url: str | None = None, app: Celery | None = None) -> bool:
    """True if the replq worker of `node` answers a Celery ping within `timeout`."""
    own = app is None
    app = app or make_app(redis_url)
    try:
        return bool(app.control.ping(destination=[worker_hostname(node)], timeout=timeout, limit=1))
    finally:
        if own:
            app.close()


def new_task_id(job_id: str) -> str:
    """Task ids name their job, so Flower, logs and `replq status` can be matched by eye."""
    return f"{job_id}.{uuid.uuid4().hex[:16]}"


def enqueue(app: Celery, task: str, job_id: str, node: str, task_id: str, force: bool = False,
            producer: Any = None, notify: bool = True) -> None:
    """Put one job on its node's queue. `force` runs it even if it is not due (manual `run`);
    `notify=False`: a failure calls no notification hook (a manual `run` without --mail)."""
    kwargs: dict[str, bool] = {"force": True} if force else {}
    if not notify:
        kwargs["notify"] = False
    app.send_task(
        task,
        args=[job_id],
        kwargs=kwargs,
        queue=queue_name(node),
        # The default (anonymous) exchange puts the message straight on the queue's Redis list;
        # through the queue's direct exchange kombu would first read its bindings (a round trip
        # per message).
        exchange="",
        routing_key=queue_name(node),
        task_id=task_id,
        # A queued job that no worker took within this time is dropped by the worker that finally
        # sees it; the scheduler has enqueued it again by then (its queued marker expires just after).
        expires=enqueue_expires(),
        shadow=f"{task} {job_id}",  # Flower's task list shows the job id in the name column
        producer=producer,
    )


# The default app for `celery -A replq.app` (Flower, inspect): built at import from the
# environment, which for those processes is their start.
app = make_app()
