"""Job-level Prometheus metrics (SPEC §9): a collector that reads the store on every scrape.

Served by `replq metrics` on /metrics, optionally behind HTTP basic auth. Each series carries
the labels job, guest, target and source, so an alert can say which guest's replica is stale.
Nothing is cached between scrapes: the numbers are as fresh as Redis, and one scrape costs
three pipelined reads (jobs+states, next_sync, guests) however many jobs there are.
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from replq import httpserve
from replq.jobstate import STATES, state_name

DEFAULT_PORT = 9737
LABELS = ("job", "guest", "target", "source")


class JobCollector(Collector):
    """Per-job gauges from the store; `store_factory` is called lazily so a dead Redis shows as replq_up 0."""

    def __init__(self, store_factory: Callable[[], Any], clock: Callable[[], float] = time.time) -> None:
        self._store_factory = store_factory
        self._store: Any = None
        self._clock = clock

    def _read(self) -> tuple[list[tuple[Any, Any, float | None]], dict[int, str]]:
        if self._store is None:
            self._store = self._store_factory()
        store = self._store
        rows = store.jobs_with_state()
        nodes = {g.vmid: g.node for g in store.list_guests()} if rows else {}
        return rows, nodes

    def collect(self) -> Iterator[Metric]:
        started = self._clock()
        up = GaugeMetricFamily("replq_up", "1 if the replq store (Redis) could be read for this scrape")
        try:
            rows, nodes = self._read()
        except Exception:  # noqa: BLE001 - any store failure is a scrape with replq_up 0, not an HTTP 500
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        now = self._clock()
        g = {
            "age": GaugeMetricFamily("replq_job_last_sync_age_seconds",
                                     "Seconds since the start of the last successful sync (absent if never synced)",
                                     labels=LABELS),
            "last_sync": GaugeMetricFamily("replq_job_last_sync_timestamp_seconds",
                                           "Start of the last successful sync, epoch seconds (0 if never)",
                                           labels=LABELS),
            "last_try": GaugeMetricFamily("replq_job_last_try_timestamp_seconds",
                                          "Start of the last attempt, epoch seconds (0 if never)", labels=LABELS),
            "next_sync": GaugeMetricFamily("replq_job_next_sync_timestamp_seconds",
                                           "When the job is next due, epoch seconds (absent if never)", labels=LABELS),
            "fail": GaugeMetricFamily("replq_job_fail_count", "Consecutive failures (0 when healthy)", labels=LABELS),
            "duration": GaugeMetricFamily("replq_job_duration_seconds", "Duration of the last run, seconds",
                                          labels=LABELS),
            "bytes": GaugeMetricFamily("replq_job_bytes", "Bytes sent by the last run", labels=LABELS),
            "enabled": GaugeMetricFamily("replq_job_enabled", "1 if the job is enabled", labels=LABELS),
            "state": GaugeMetricFamily("replq_job_state", "1 for the job's current state (ok, error, syncing)",
                                       labels=(*LABELS, "state")),
        }
        for job, state, next_sync in rows:
            source = nodes.get(job.guest) or job.source or ""
            lv = [job.id, str(job.guest), job.target, source]
            if state.last_sync:
                g["age"].add_metric(lv, max(0.0, now - state.last_sync))
            g["last_sync"].add_metric(lv, state.last_sync or 0)
            g["last_try"].add_metric(lv, state.last_try or 0)
            if next_sync is not None:
                g["next_sync"].add_metric(lv, next_sync)
            g["fail"].add_metric(lv, state.fail_count)
            g["duration"].add_metric(lv, state.duration or 0)
            g["bytes"].add_metric(lv, state.bytes or 0)
            g["enabled"].add_metric(lv, 0 if job.disable else 1)
            current = state_name(state)
            for s in STATES:
                g["state"].add_metric([*lv, s], 1 if s == current else 0)
        jobs = GaugeMetricFamily("replq_jobs", "Number of replication jobs")
        jobs.add_metric([], len(rows))
        yield jobs
        yield from g.values()
        took = GaugeMetricFamily("replq_scrape_duration_seconds", "Time spent reading the store for this scrape")
        took.add_metric([], max(0.0, self._clock() - started))
        yield took


def registry_for(store_factory: Callable[[], Any]) -> CollectorRegistry:
    """A registry holding only replq's job metrics (no process/platform collectors of this exporter)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobCollector(store_factory))
    return registry


def authorized(header: str | None, credentials: str) -> bool:
    """True if an Authorization header carries exactly USER:PASSWORD (HTTP basic auth)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(given, credentials.encode())


def serve(store_factory: Callable[[], Any], address: str, port: int,
          ready: Callable[[str, int], None] | None = None, credentials: str | None = None) -> None:
    """Serve /metrics (and a short index on /) until killed; blocks. With credentials
    (USER:PASSWORD), every request needs them (basic auth), else it gets 401."""
    metrics_app = make_wsgi_app(registry_for(store_factory))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if credentials is not None and not authorized(environ.get("HTTP_AUTHORIZATION"), credentials):
            body = b"401 Unauthorized\n"
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                                                ("WWW-Authenticate", 'Basic realm="replq metrics"')])
            return [body]
        if environ.get("PATH_INFO") in ("/metrics", "/metrics/"):
            return metrics_app(environ, start_response)
        body = b"replq metrics exporter: see /metrics\n"
        status = "200 OK" if environ.get("PATH_INFO") == "/" else "404 Not Found"
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    httpserve.serve(app, address, port, ready)
