"""The JSON API under /api/ (SPEC §12): what each endpoint does, through the store and the model
exactly as the CLI does, so that a refusal has the CLI's words.

Every function takes the store and the request's data and returns what is sent as JSON;
a refusal is a ReplqError (the HTTP layer, app.py, maps it to a status code).

    GET    /api/jobs[?guest=V][&node=N]  rows of `status --output-format json` (+ comment, remove_job, status)
    POST   /api/jobs                     create; without id, the guest's lowest free VMID-N
    GET    /api/jobs/ID                  `read` (with the digest)
    PUT    /api/jobs/ID                  `update` (digest, delete)
    DELETE /api/jobs/ID[?keep=1|force=1] `delete`
    POST   /api/jobs/ID/schedule-now|enable|disable
    GET    /api/jobs/ID/log              `log`
    GET    /api/guests   GET /api/nodes  `guest list`, `node list`
    GET    /api/calendar?expr=E[&iterations=N]  `calendar`, in the cluster's time zone
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from replq.errors import Conflict, ValidationError
from replq.jobstate import state_cell, status_row
from replq.model import Job, check_node_name, check_vmid, parse_bool, parse_job_id, show
from replq.rows import node_row
from replq.store import Store
from replq.views import calendar_preview, check_digest, read_record, split_list

CREATE_FIELDS = ("id", "guest", "target", "schedule", "rate", "comment", "enabled")
UPDATE_FIELDS = ("schedule", "rate", "comment", "enabled", "source", "delete", "digest")
DEFAULT_ITERATIONS, MAX_ITERATIONS = 5, 1000
ID_ATTEMPTS = 20  # concurrent creators take numbers from under each other: try the next free one


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in body:
        if key not in allowed:
            raise ValidationError(f"unknown job property '{show(key)}' (known: {', '.join(allowed)})")


def _given(value: Any) -> bool:
    return value is not None and value != ""


def free_job_id(vmid: int, existing: list[str]) -> str:
    """The guest's lowest free job number: VMID-0 for its first job (as the GUI of pvesr does)."""
    taken = {parse_job_id(j)[1] for j in existing}
    num = 0
    while num in taken:
        num += 1
    return f"{vmid}-{num}"


# ---- jobs --------------------------------------------------------------------------------------
def list_jobs(store: Store, guest: str | None = None, node: str | None = None) -> list[dict[str, Any]]:
    vmid = check_vmid(guest) if guest is not None else None
    rows = store.jobs_with_state(vmid)
    if node is not None:
        store.get_node(check_node_name(node))
        on_node = {g.vmid for g in store.list_guests() if g.node == node}
        rows = [r for r in rows if r[0].guest in on_node]
    # The table also shows the comment, a pending removal, and the State cell of `replq status`
    # (SYNCING with bytes, rate and ETA while a job runs).
    return [{**status_row(job, state, ns), "comment": job.comment, "remove_job": job.remove_job,
             "status": state_cell(state)} for job, state, ns in rows]


def create_job(store: Store, body: dict[str, Any]) -> dict[str, Any]:
    _only(body, CREATE_FIELDS)
    explicit = body.get("id") if _given(body.get("id")) else None
    if explicit is not None:
        vmid = parse_job_id(explicit)[0]
        if _given(body.get("guest")) and check_vmid(body["guest"]) != vmid:
            raise ValidationError(f"job '{explicit}' does not belong to guest {check_vmid(body['guest'])}")
    elif _given(body.get("guest")):
        vmid = check_vmid(body["guest"])
    else:
        raise ValidationError("missing property 'guest' (or 'id')")
    if not _given(body.get("target")):
        raise ValidationError("missing property 'target'")
    fields: dict[str, Any] = {"disable": not parse_bool(body.get("enabled", True), "enabled")}
    for key in ("schedule", "rate", "comment"):
        if body.get(key) is not None:
            fields[key] = body[key]
    for _ in range(ID_ATTEMPTS):
        job_id = explicit or free_job_id(vmid, store.job_ids(vmid))
        job = Job(id=job_id, target=body["target"], **fields)
        try:
            store.create_job(job)
        except Conflict as exc:
            if explicit or str(exc) != f"replication job '{job_id}' already exists":
                raise
            continue
        return read_record(store.get_job(job_id))
    raise Conflict(f"no free job number for guest {vmid} (too many concurrent creations); try again")


def read_job(store: Store, job_id: str) -> dict[str, Any]:
    return read_record(store.get_job(job_id))


def update_job(store: Store, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
    parse_job_id(job_id)
    _only(body, UPDATE_FIELDS)
    changes = {k: body[k] for k in ("schedule", "rate", "comment", "source") if body.get(k) is not None}
    if body.get("enabled") is not None:
        changes["disable"] = not parse_bool(body["enabled"], "enabled")
    delete = body.get("delete")
    if isinstance(delete, list) and all(isinstance(p, str) for p in delete):
        delete = ",".join(delete)
    props = split_list(delete) if isinstance(delete, str) else []  # as the CLI reads --delete
    digest = body.get("digest")
    if digest is not None:
        check_digest(str(digest), "digest")
    return read_record(store.update_job(job_id, changes, props, digest))


def delete_job(store: Store, job_id: str, keep: str | None = None, force: str | None = None) -> dict[str, Any]:
    """As `delete [--keep | --force]`: marked for removal by its next run, or gone at once."""
    keep_ = parse_bool(keep, "keep") if keep is not None else False
    force_ = parse_bool(force, "force") if force is not None else False
    if keep_ and force_:
        raise ValidationError("keep and force are mutually exclusive")
    parse_job_id(job_id)
    if force_:
        store.delete_job(job_id)
        return {"id": job_id, "removed": True}
    job = store.mark_remove(job_id, "local" if keep_ else "full")
    return {"id": job_id, "removed": False, "remove_job": job.remove_job}


def schedule_now(store: Store, job_id: str) -> dict[str, Any]:
    parse_job_id(job_id)
    store.update_state(job_id, last_try=0)
    return {"id": job_id}


def set_enabled(store: Store, job_id: str, enabled: bool) -> dict[str, Any]:
    parse_job_id(job_id)
    job = store.update_job(job_id, {}, ["disable"]) if enabled else store.update_job(job_id, {"disable": True})
    return read_record(job)


def job_log(store: Store, job_id: str) -> list[str]:
    parse_job_id(job_id)
    store.get_job(job_id)  # an unknown job is an error, not an empty log
    return store.read_log(job_id)


# ---- inventory and calendar --------------------------------------------------------------------
def guests(store: Store) -> list[dict[str, Any]]:
    return [g.to_dict() for g in store.list_guests()]


def nodes(store: Store) -> list[dict[str, Any]]:
    return [node_row(n) for n in store.list_nodes()]


def calendar(store: Store, expr: str | None, iterations: str | None = None) -> dict[str, Any]:
    if expr is None:
        raise ValidationError("missing parameter 'expr' (a calendar event, e.g. */15)")
    count = DEFAULT_ITERATIONS
    if iterations is not None:
        try:
            count = int(iterations)
        except ValueError:
            count = 0
        if not 1 <= count <= MAX_ITERATIONS:
            raise ValidationError(f"invalid iterations '{show(iterations)}': must be 1..{MAX_ITERATIONS}")
    now = datetime.now(UTC)
    return calendar_preview(expr, store.get_settings()["timezone"], lambda zone: now, count)[0]
