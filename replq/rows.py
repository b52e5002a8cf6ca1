"""The JSON form of each cluster object: what its list command prints with --output-format json,
and what a cluster backup holds (backup.py reads these rows back)."""

from __future__ import annotations

from typing import Any

from replq.model import Guest, Job, Node, Storage, host_key_fingerprint


def node_row(n: Node) -> dict[str, Any]:
    return {**n.to_dict(), "fingerprint": host_key_fingerprint(n.host_key) if n.host_key else None}


def storage_row(s: Storage) -> dict[str, Any]:
    return s.to_dict()


def guest_row(g: Guest) -> dict[str, Any]:
    return g.to_dict()


def job_row(job: Job) -> dict[str, Any]:
    return {"id": job.id, "type": "local", "guest": job.guest, "jobnum": job.jobnum, "target": job.target,
            "schedule": job.effective_schedule, "rate": job.rate, "enabled": not job.disable, "comment": job.comment,
            "source": job.source, "remove_job": job.remove_job}
