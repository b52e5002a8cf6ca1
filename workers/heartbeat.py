"""The worker's heartbeat: every few seconds the main process of `replq worker --node N` writes
`now` for node N into the store, so the rest of the cluster can tell a live node's worker from a
dead one without probing the node (`status`, the scheduler, `guest move`). A clean stop removes
it; a crash leaves it to age past the cluster's `liveness_window`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from replq import context
from replq.settings import tunable
from replq.store import Store

log = logging.getLogger("replq.worker")

_stop = threading.Event()


def _beat(store: Store, node: str, interval: float) -> None:
    while True:
        try:
            store.record_heartbeat(node, time.time())
        except Exception as exc:  # noqa: BLE001 - Redis away: the heartbeat ages; try again
            log.warning("heartbeat of node %s not written: %s", node, exc)
        if _stop.wait(interval):
            return


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    app = sender.app if sender is not None else None
    node = (app.conf.get("replq_node") if app is not None else None) or context.local_node()
    url = (app.conf.get("replq_redis_url") if app is not None else None) or context.redis_url()
    store = Store.from_url(url)
    _stop.clear()
    threading.Thread(target=_beat, args=(store, node, tunable("heartbeat_interval")), name="replq-heartbeat",
                     daemon=True).start()


@worker_shutdown.connect
def _end(sender: Any = None, **_: Any) -> None:
    _stop.set()
    app = getattr(sender, "app", None)
    node = (app.conf.get("replq_node") if app is not None else None) or context.local_node()
    url = (app.conf.get("replq_redis_url") if app is not None else None) or context.redis_url()
    try:
        Store.from_url(url).clear_heartbeat(node)
    except Exception as exc:  # noqa: BLE001 - the heartbeat then ages out by itself
        log.warning("heartbeat of node %s not cleared: %s", node, exc)
