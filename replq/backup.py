"""A backup of the whole cluster as one JSON document (SPEC §11), and reading one back.

    {"version": 1, "created": EPOCH,
     "nodes": [...], "storages": [...], "guests": [...], "jobs": [...],   # rows.py: as each list command prints them
     "settings": {KEY: VALUE, ...},                                       # the settings set (not the defaults)
     "state": {JOB: {...}, ...}}                                          # with --state: set-state's form

`parse` checks everything before the store is touched: the JSON itself (no duplicate keys, no
NaN), every key of every entry, every value by the model's rules, the cluster's references
(a guest's node, a job's guest and target) and uniqueness (names, ids, one job per guest and
target). The first problem is one ValidationError naming the entry, e.g.
`backup: jobs[3] '100-0': no such node 'pve9' (target)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from replq import settings as cluster_settings
from replq.errors import ReplqError, ValidationError
from replq.model import (
    STATE_FIELDS,
    Disk,
    Guest,
    Job,
    JobState,
    Node,
    Storage,
    check_state_fields,
    host_key_fingerprint,
    parse_job_id,
    show,
    trusted,
)
from replq.rows import guest_row, job_row, node_row, storage_row

VERSION = 1
LISTS = ("nodes", "storages", "guests", "jobs")
TOP_LEVEL = {"version", "created", *LISTS, "settings", "state"}


@dataclass
class Cluster:
    """Everything a backup holds; `states` is None when the backup was made without --state."""

    nodes: list[Node] = field(default_factory=list)
    storages: list[Storage] = field(default_factory=list)
    guests: list[Guest] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    states: dict[str, JobState] | None = None

    def summary(self) -> str:
        return (f"{len(self.nodes)} node(s), {len(self.storages)} storage(s), {len(self.guests)} guest(s), "
                f"{len(self.jobs)} job(s){' with state' if self.states is not None else ''}")


def document(cluster: Cluster, created: float) -> dict[str, Any]:
    """The backup document of a cluster."""
    doc: dict[str, Any] = {
        "version": VERSION,
        "created": int(created),
        "nodes": [node_row(n) for n in cluster.nodes],
        "storages": [storage_row(s) for s in cluster.storages],
        "guests": [guest_row(g) for g in cluster.guests],
        "jobs": [job_row(j) for j in cluster.jobs],
        "settings": dict(sorted(cluster.settings.items())),
    }
    if cluster.states is not None:
        doc["state"] = {j: _state_row(st) for j, st in cluster.states.items()}
    return doc


def dumps(doc: dict[str, Any]) -> str:
    """The document as JSON text with one line per entry (readable, diffable, and written by the C
    encoder: an indented dump of 100,000 jobs would take the pure-Python one seconds)."""
    def one(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False)

    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and value:
            body = ",\n  ".join(one(v) for v in value)
            parts.append(f"{one(key)}: [\n  {body}]")
        elif isinstance(value, dict) and value:
            body = ",\n  ".join(f"{one(k)}: {one(v)}" for k, v in value.items())
            parts.append(f"{one(key)}: {{\n  {body}}}")
        else:
            parts.append(f"{one(key)}: {one(value)}")
    return "{" + ",\n".join(parts) + "}"


STATE_ROW = tuple(f for f in STATE_FIELDS if f not in ("worker", "task_id", "progress"))


def _state_row(st: JobState) -> dict[str, Any]:
    """What a restore brings back: set-state's fields (not a run in progress: worker, task, progress)."""
    return {f: getattr(st, f) for f in STATE_ROW}


# ---------------------------------------------------------------------------------- reading


def _fail(where: str, message: str) -> ValidationError:
    return ValidationError(f"backup: {where}: {message}")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        raise ValueError(f"duplicate key '{show(next(k for k in keys if keys.count(k) > 1))}'")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def loads(text: str) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity."""
    if not text.strip():
        raise ValidationError("backup: empty input")
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ValidationError(f"backup: not valid JSON ({exc})") from None


def _keys(entry: Any, required: set[str], what: str = "") -> dict[str, Any]:
    """The entry, if it is an object with exactly these keys."""
    if not isinstance(entry, dict):
        raise ValidationError(f"{what}expected an object")
    unknown = sorted(set(entry) - required)
    if unknown:
        raise ValidationError(f"{what}unknown key '{show(unknown[0])}'")
    missing = sorted(required - set(entry))
    if missing:
        raise ValidationError(f"{what}missing key '{missing[0]}'")
    return entry


def _entries(doc: dict[str, Any], name: str, build: Callable[[dict[str, Any]], Any],
             ident: Callable[[Any], Any], label: str, check: Callable[[Any], None] = lambda _: None) -> list[Any]:
    """Build each entry of a top-level list, refuse a second one of the same identity, then check
    its references; any refusal names the entry."""
    items = doc[name]
    if not isinstance(items, list):
        raise _fail(name, "expected a list")
    out, seen = [], set()

    def where(i: int, entry: Any) -> str:
        name_it = isinstance(entry, dict) and label in entry
        return f"{name}[{i}]" + (f" '{show(entry[label])}'" if name_it else "")

    for i, entry in enumerate(items):
        try:
            obj = build(entry)
            if ident(obj) in seen:
                raise ValidationError("listed twice")
            seen.add(ident(obj))
            check(obj)
        except ReplqError as exc:
            raise _fail(where(i, entry), str(exc)) from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise _fail(where(i, entry), f"invalid value ({exc})") from None
        out.append(obj)
    return out


NODE_KEYS = {"name", "address", "user", "host_key", "fingerprint"}
STORAGE_KEYS = {"id", "type", "pool", "nodes", "enabled"}
GUEST_KEYS = {"vmid", "node", "type", "disks", "purge"}
JOB_KEYS = {"id", "type", "guest", "jobnum", "target", "schedule", "rate", "enabled", "comment", "source",
            "remove_job"}


def _node(e: dict[str, Any]) -> Node:
    _keys(e, NODE_KEYS)
    node = Node(e["name"], e["address"], e["user"], e["host_key"])
    expected = host_key_fingerprint(node.host_key) if node.host_key else None
    if e["fingerprint"] != expected:
        raise ValidationError(f"fingerprint {show(e['fingerprint'])} does not match host_key ({expected})")
    return node


def _storage(e: dict[str, Any]) -> Storage:
    _keys(e, STORAGE_KEYS)
    if not isinstance(e["enabled"], bool):
        raise ValidationError("enabled: expected true or false")
    if e["nodes"] is not None and not isinstance(e["nodes"], list):
        raise ValidationError("nodes: expected a list of node names or null")
    return Storage(e["id"], e["pool"], e["type"], e["nodes"], e["enabled"])


def _guest(e: dict[str, Any]) -> Guest:
    _keys(e, GUEST_KEYS)
    if not isinstance(e["disks"], list) or not isinstance(e["purge"], bool):
        raise ValidationError("disks: expected a list; purge: true or false")
    disks = []
    for d in e["disks"]:
        _keys(d, {"volid", "replicate"}, "disk: ")
        if not isinstance(d["replicate"], bool):
            raise ValidationError("disk replicate: expected true or false")
        disks.append(Disk(d["volid"], d["replicate"]))
    if isinstance(e["vmid"], bool) or not isinstance(e["vmid"], int):
        raise ValidationError(f"vmid: expected a number, got {show(e['vmid'])}")
    guest = Guest(e["vmid"], e["node"], e["type"], disks)
    guest.purge = e["purge"]
    return guest


def _job(e: dict[str, Any], tz: str) -> Job:
    _keys(e, JOB_KEYS)
    if e["type"] != "local":
        raise ValidationError(f"type: only 'local' jobs exist, got {show(e['type'])}")
    if not isinstance(e["enabled"], bool):
        raise ValidationError("enabled: expected true or false")
    # Built unchecked, then validated once with the cluster's time zone (Job() would check twice).
    job = trusted(Job, id=e["id"], target=e["target"], schedule=e["schedule"], rate=e["rate"], comment=e["comment"],
                  disable=not e["enabled"], remove_job=e["remove_job"], source=e["source"])
    job.validate(tz, schedule_limits=False)  # what the store held: a Proxmox import may be outside the limits
    if (e["guest"], e["jobnum"]) != parse_job_id(job.id):
        raise ValidationError(f"guest and jobnum ({show(e['guest'])}, {show(e['jobnum'])}) do not match the id")
    return job


def _settings(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail("settings", "expected an object")
    out = {}
    for key, value in raw.items():
        if key not in cluster_settings.SETTINGS:
            raise _fail(f"settings '{show(key)}'", cluster_settings.RETIRED.get(key, "unknown setting"))
        if value is None or isinstance(value, dict | list | bool):
            raise _fail(f"settings '{key}'", f"invalid value {show(value)}")
        try:
            checked = cluster_settings.check_setting(key, value)
        except ReplqError as exc:
            raise _fail(f"settings '{key}'", str(exc)) from None
        if checked is not None:
            out[key] = checked
    return out


def _states(raw: Any, jobs: set[str]) -> dict[str, JobState]:
    if not isinstance(raw, dict):
        raise _fail("state", "expected an object mapping job ids to states")
    out = {}
    for job_id, fields in raw.items():
        if job_id not in jobs:
            raise _fail(f"state '{show(job_id)}'", "no such job in the backup")
        if not isinstance(fields, dict):
            raise _fail(f"state '{job_id}'", "expected an object")
        try:
            out[job_id] = JobState(**check_state_fields(fields, allow_runtime=False))
        except ReplqError as exc:
            raise _fail(f"state '{job_id}'", str(exc)) from None
    return out


def parse(doc: Any) -> Cluster:
    """Validate a whole backup document (see the module docstring); nothing is written here."""
    if not isinstance(doc, dict):
        raise ValidationError("backup: expected a JSON object with nodes, storages, guests, jobs and settings")
    unknown = sorted(set(doc) - TOP_LEVEL)
    if unknown:
        raise ValidationError(f"backup: unknown top-level key '{show(unknown[0])}'")
    missing = [k for k in (*LISTS, "settings") if k not in doc]
    if missing:
        raise ValidationError(f"backup: missing top-level key '{missing[0]}'")
    if doc.get("version", VERSION) != VERSION:
        raise ValidationError(f"backup: version {show(doc['version'])} is not supported (this replq reads {VERSION})")
    settings = _settings(doc["settings"])
    tz = cluster_settings.with_defaults(settings)["timezone"]
    nodes = _entries(doc, "nodes", _node, lambda n: n.name, "name")
    storages = _entries(doc, "storages", _storage, lambda s: s.id, "id")
    names = {n.name for n in nodes}

    def guest(g: Guest) -> None:
        if g.node not in names:
            raise ValidationError(f"no such node '{g.node}' (node)")

    guests = _entries(doc, "guests", _guest, lambda g: g.vmid, "vmid", guest)
    homes = {g.vmid: g.node for g in guests}
    pairs: set[tuple[int, str]] = set()

    def job(j: Job) -> None:
        if j.guest not in homes:
            raise ValidationError(f"no such guest {j.guest}")
        if j.target not in names:
            raise ValidationError(f"no such node '{j.target}' (target)")
        if (j.guest, j.target) in pairs:
            raise ValidationError(f"a second job for guest '{j.guest}' to target '{j.target}'")
        pairs.add((j.guest, j.target))

    jobs = _entries(doc, "jobs", lambda e: _job(e, tz), lambda j: j.id, "id", job)
    states = _states(doc["state"], {j.id for j in jobs}) if "state" in doc else None
    return Cluster(nodes, storages, guests, jobs, settings, states)
