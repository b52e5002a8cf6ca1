"""The cluster model: nodes, storages, guests, jobs and job state, with validation (SPEC §1–2).

Pure: no I/O. Every constructor validates its input and raises ValidationError with the
operator message; the store builds objects it already validated with `trusted()` so that
reading 10,000 jobs does not re-parse 10,000 schedules.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any, TypeVar

from replq.calendar import parse as parse_calendar
from replq.calendar import validate_job_schedule
from replq.errors import ValidationError
from replq.zfsnames import (  # noqa: F401 - re-exported: the names of the ZFS side are the model's vocabulary too
    JOB_ID_RE,
    SNAPSHOT_PREFIX,
    Snapshot,
    Volume,
    is_job_snapshot,
    parse_snapshot_name,
    snapshot_name,
    volname_vmid,
)

NODE_NAME_RE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
# Proxmox's configid: storage ids such as local-zfs, tank_1, nfs.backup.
STORAGE_ID_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]{0,62}[a-zA-Z0-9]")
# A ZFS dataset name: components of safe characters separated by '/'.
POOL_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.:-]*(/[a-zA-Z0-9][a-zA-Z0-9_.:-]*)*")
# Proxmox volume names (vm-100-disk-0, subvol-100-disk-0, base-100-disk-0/vm-101-disk-0).
VOLNAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.+-]*(/[a-zA-Z0-9][a-zA-Z0-9_.+-]*)?")
# A local file or device referenced by path (refused for replication, not for the guest).
LOCAL_PATH_RE = re.compile(r"/[a-zA-Z0-9_.+/-]*")
USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
HOSTNAME_RE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*")
IPV6_RE = re.compile(r"[0-9a-fA-F:.]+")
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
STORAGE_TYPES = ("zfspool", "dir", "nfs", "cifs", "rbd", "cephfs", "lvm", "lvmthin", "iscsi", "glusterfs", "zfs", "pbs")
GUEST_TYPES = ("lxc", "qemu")
REMOVE_MODES = ("local", "full")
DEFAULT_SCHEDULE = "*/15"
MAX_SCHEDULE = 128
MAX_COMMENT = 4096
VMID_MIN, VMID_MAX = 100, 999_999_999


def show(value: object, limit: int = 60) -> str:
    """A value for an error message: one line, printable, bounded (input may be garbage)."""
    text = str(value)
    out = "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else f"\\x{ord(c):02x}" for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _clean(value: object, what: str) -> str:
    """A text argument: a str without NUL or undecodable bytes (argv may carry surrogates)."""
    if not isinstance(value, str):
        raise ValidationError(f"{what}: expected a string, got {show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{what}: not valid UTF-8 text: '{show(value)}'") from None
    if "\x00" in value:
        raise ValidationError(f"{what}: contains a NUL character")
    return value


def check_node_name(name: object, what: str = "node name") -> str:
    name = _clean(name, what)
    if not NODE_NAME_RE.fullmatch(name):
        raise ValidationError(f"invalid {what} '{show(name)}' (letters, digits and '-', at most 63 characters)")
    return name


def check_storage_id(sid: object) -> str:
    sid = _clean(sid, "storage id")
    if not STORAGE_ID_RE.fullmatch(sid):
        raise ValidationError(f"invalid storage id '{show(sid)}' (a letter, then letters, digits, '-', '_', '.')")
    return sid


def check_vmid(vmid: object) -> int:
    if isinstance(vmid, bool):
        raise ValidationError(f"invalid guest id '{show(vmid)}'")
    if isinstance(vmid, str):
        s = _clean(vmid, "guest id")
        if not re.fullmatch(r"[1-9][0-9]{0,8}", s):
            raise ValidationError(f"invalid guest id '{show(s)}' (a number from {VMID_MIN} to {VMID_MAX})")
        vmid = int(s)
    if not isinstance(vmid, int):
        raise ValidationError(f"invalid guest id '{show(vmid)}'")
    if vmid < VMID_MIN:
        raise ValidationError(f"invalid guest id '{vmid}' (guest IDs < 100 are reserved)")
    if vmid > VMID_MAX:
        raise ValidationError(f"invalid guest id '{vmid}' (at most {VMID_MAX})")
    return vmid


def parse_job_id(s: object) -> tuple[int, int]:
    """`VMID-N` → (vmid, jobnum). One spelling per job: leading zeros are refused."""
    s = _clean(s, "replication job id")
    msg = f"invalid replication job id '{show(s)}'"
    m = re.fullmatch(r"([0-9]{1,9})-([0-9]{1,9})", s)
    if not m:
        raise ValidationError(f"{msg} (expected VMID-JOBNUM, e.g. 100-0)")
    if int(m.group(1)) < VMID_MIN and not m.group(1).startswith("0"):
        raise ValidationError(f"{msg} (guest IDs < 100 are reserved)")
    if not JOB_ID_RE.fullmatch(s):
        raise ValidationError(f"{msg} (leading zeros are not allowed)")
    return int(m.group(1)), int(m.group(2))


def job_id_sort_key(job_id: str) -> tuple[int, int]:
    vmid, _, num = job_id.partition("-")
    return int(vmid), int(num)


def check_host_key(key: object) -> str:
    """An OpenSSH public key line `TYPE BASE64` (a trailing comment is dropped)."""
    key = _clean(key, "host key")
    parts = key.strip().split()
    if len(parts) < 2 or parts[0] not in HOST_KEY_TYPES:
        raise ValidationError(f"invalid host key '{show(key)}' (expected e.g. 'ssh-ed25519 AAAA...')")
    ktype, b64 = parts[0], parts[1]
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(f"invalid host key: '{show(b64)}' is not base64") from None
    # The blob starts with its own type as an SSH string; a mismatch means a garbled key.
    if len(blob) < 4 or blob[4 : 4 + int.from_bytes(blob[:4], "big")] != ktype.encode():
        raise ValidationError(f"invalid host key: the key data is not of type {ktype}")
    return f"{ktype} {b64}"


def host_key_fingerprint(key: str) -> str:
    """`TYPE SHA256:...` as ssh-keygen -l shows it."""
    ktype, b64 = key.split()[:2]
    digest = base64.b64encode(hashlib.sha256(base64.b64decode(b64)).digest()).decode().rstrip("=")
    return f"{ktype} SHA256:{digest}"


@lru_cache(maxsize=1024)
def _check_schedule_cached(expr: str, tz: str, limits: bool) -> None:
    if limits:
        validate_job_schedule(expr, tz)
    else:
        parse_calendar(expr)


def check_schedule(expr: object, tz: str = "UTC", limits: bool = True) -> str:
    """A calendar event a job accepts (parse + job limits of the calendar module), ≤ 128 chars.
    limits=False: only parsed (a job imported from a Proxmox file, where pvesr has no such limits)."""
    expr = _clean(expr, "schedule")
    if len(expr) > MAX_SCHEDULE:
        raise ValidationError(f"schedule: value may only be {MAX_SCHEDULE} characters long")
    if not expr.strip():
        raise ValidationError("schedule: value must not be empty")
    if not expr.isprintable():  # a control character would also break the one-line error
        raise ValidationError(f"schedule: invalid character in '{show(expr)}'")
    try:
        _check_schedule_cached(expr, tz, limits)
    except ValidationError:
        raise
    except ValueError as exc:  # CalendarError or similar: keep the calendar's message
        raise ValidationError(f"schedule: {exc}") from None
    return expr


def check_rate(rate: object) -> float:
    """A rate limit in MB/s (decimal), float ≥ 1."""
    if isinstance(rate, bool):
        raise ValidationError(f"rate: invalid number '{show(rate)}'")
    if isinstance(rate, str):
        s = _clean(rate, "rate").strip()
        if not re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+|[0-9]+(\.[0-9]*)?[eE][+-]?[0-9]+", s):
            raise ValidationError(f"rate: invalid number '{show(rate)}' (megabytes per second, e.g. 10 or 2.5)")
        rate = float(s)
    if not isinstance(rate, int | float) or not math.isfinite(rate):
        raise ValidationError(f"rate: invalid number '{show(rate)}'")
    if rate < 1:
        raise ValidationError("rate: value must have a minimum value of 1 (MB/s)")
    return float(rate)


def perl_number(value: float) -> str:
    """A number as Perl prints it (%.15g): 10.0 → '10', 2.5 → '2.5', 1.843127 → '1.843127'. pvesr's
    output and files show numbers this way (JSON::XS and Perl's stringification alike)."""
    return f"{value:.15g}"


def format_rate(rate: float | None) -> str:
    """10.0 → '10', 2.5 → '2.5' (as pvesr prints a rate), '-' when unlimited."""
    return "-" if rate is None else perl_number(rate)


def check_comment(comment: object) -> str:
    comment = _clean(comment, "comment")
    if len(comment) > MAX_COMMENT:
        raise ValidationError(f"comment: value may only be {MAX_COMMENT} characters long")
    return comment


def parse_bool(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "yes", "no", "true", "false", "on", "off"):
        return value.strip().lower() in ("1", "yes", "true", "on")
    raise ValidationError(f"{what}: invalid boolean '{show(value)}' (expected 0 or 1)")


T = TypeVar("T")


_TRUSTED_SPEC: dict[type, tuple[dict[str, Any], list[tuple[str, Any]]]] = {}


def trusted(cls: type[T], **values: Any) -> T:
    """Build a dataclass from data the store validated on write, skipping validation
    (fast: status builds 20,000 of these)."""
    spec = _TRUSTED_SPEC.get(cls)
    if spec is None:
        plain: dict[str, Any] = {}
        factories: list[tuple[str, Any]] = []
        for f in fields(cls):  # type: ignore[arg-type]
            if f.default is not MISSING:
                plain[f.name] = f.default
            elif f.default_factory is not MISSING:
                factories.append((f.name, f.default_factory))
            else:
                plain[f.name] = None
        spec = _TRUSTED_SPEC[cls] = (plain, factories)
    obj = cls.__new__(cls)
    d = obj.__dict__
    d.update(spec[0])
    for name, factory in spec[1]:
        if name not in values:
            d[name] = factory()
    d.update(values)
    return obj


@dataclass
class Node:
    name: str
    address: str
    user: str = "root"
    host_key: str | None = None

    def __post_init__(self) -> None:
        self.name = check_node_name(self.name)
        self.address = _clean(self.address, "address").strip()
        parse_address(self.address)
        self.user = _clean(self.user, "user")
        if not USER_RE.fullmatch(self.user):
            raise ValidationError(f"invalid ssh user '{show(self.user)}'")
        if self.host_key is not None:
            self.host_key = check_host_key(self.host_key)

    @property
    def host(self) -> str:
        return parse_address(self.address)[0]

    @property
    def port(self) -> int:
        return parse_address(self.address)[1]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "user": self.user, "host_key": self.host_key}


def parse_address(address: str) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` → (host, port); port defaults to 22."""
    bad = ValidationError(f"invalid address '{show(address)}' (expected HOST[:PORT])")
    host, port = address, "22"
    if address.startswith("["):
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::([0-9]{1,5}))?", address)
        if not m:
            raise bad
        host, port = m.group(1), m.group(2) or "22"
        if ":" not in host:
            raise bad
    elif address.count(":") == 1:
        host, port = address.split(":")
    elif address.count(":") > 1:  # bare IPv6 without a port
        if not IPV6_RE.fullmatch(address):
            raise bad
    if not host or not (HOSTNAME_RE.fullmatch(host) or (":" in host and IPV6_RE.fullmatch(host))) or len(host) > 253:
        raise bad
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise bad
    return host, int(port)


@dataclass
class Storage:
    id: str
    pool: str | None = None
    type: str = "zfspool"
    nodes: list[str] | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        self.id = check_storage_id(self.id)
        self.type = _clean(self.type, "storage type")
        if self.type not in STORAGE_TYPES:
            raise ValidationError(f"invalid storage type '{show(self.type)}' (one of {', '.join(STORAGE_TYPES)})")
        if self.pool is not None:
            self.pool = _clean(self.pool, "pool")
            if not POOL_RE.fullmatch(self.pool) or len(self.pool) > 200:
                raise ValidationError(f"invalid pool '{show(self.pool)}' (a ZFS dataset name, e.g. rpool/data)")
        elif self.type == "zfspool":
            raise ValidationError("a zfspool storage needs a pool (e.g. rpool/data)")
        if self.nodes is not None:
            self.nodes = sorted({check_node_name(n) for n in self.nodes})
            if not self.nodes:
                self.nodes = None
        self.enabled = parse_bool(self.enabled, "enabled")

    def available_on(self, node: str) -> bool:
        return self.enabled and (self.nodes is None or node in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "pool": self.pool, "nodes": self.nodes, "enabled": self.enabled}


@dataclass
class Disk:
    volid: str
    replicate: bool = True

    def __post_init__(self) -> None:
        self.volid = _clean(self.volid, "disk")
        self.replicate = parse_bool(self.replicate, "replicate")
        if self.is_path:
            if not LOCAL_PATH_RE.fullmatch(self.volid) or ".." in self.volid.split("/"):
                raise ValidationError(f"invalid disk path '{show(self.volid)}'")
            return
        sid, sep, vol = self.volid.partition(":")
        if not sep:
            raise ValidationError(f"invalid volume id '{show(self.volid)}' (expected STORAGE:VOLNAME)")
        check_storage_id(sid)
        if not VOLNAME_RE.fullmatch(vol) or len(vol) > 200:
            raise ValidationError(f"invalid volume name '{show(vol)}' (e.g. subvol-100-disk-0)")

    @property
    def is_path(self) -> bool:
        return self.volid.startswith("/")

    @property
    def storage(self) -> str | None:
        return None if self.is_path else self.volid.partition(":")[0]

    @property
    def volname(self) -> str:
        return self.volid if self.is_path else self.volid.partition(":")[2]

    def to_dict(self) -> dict[str, Any]:
        return {"volid": self.volid, "replicate": self.replicate}

    @classmethod
    def parse(cls, spec: str) -> Disk:
        """`STORAGE:VOLNAME[,replicate=0]` as on the command line."""
        spec = _clean(spec, "disk")
        volid, *opts = spec.split(",")
        replicate: object = True
        for opt in opts:
            key, sep, value = opt.partition("=")
            if key != "replicate" or not sep:
                raise ValidationError(f"invalid disk option '{show(opt)}' (only replicate=0|1)")
            replicate = value
        return cls(volid, parse_bool(replicate, "replicate"))


@dataclass
class Guest:
    vmid: int
    node: str
    type: str = "lxc"
    disks: list[Disk] = field(default_factory=list)
    purge: bool = False  # removal requested (guest remove --purge) while its jobs are cleaned up

    def __post_init__(self) -> None:
        self.vmid = check_vmid(self.vmid)
        self.node = check_node_name(self.node)
        self.type = _clean(self.type, "guest type")
        if self.type not in GUEST_TYPES:
            raise ValidationError(f"invalid guest type '{show(self.type)}' (lxc or qemu)")
        self.disks = [d if isinstance(d, Disk) else Disk(**d) for d in self.disks]
        seen: set[str] = set()
        for d in self.disks:
            if d.volid in seen:
                raise ValidationError(f"disk '{show(d.volid)}' is listed twice")
            seen.add(d.volid)
            check_volume_owner(self.vmid, d)

    def to_dict(self) -> dict[str, Any]:
        return {"vmid": self.vmid, "node": self.node, "type": self.type,
                "disks": [d.to_dict() for d in self.disks], "purge": self.purge}


def check_volume_owner(vmid: int, disk: Disk) -> None:
    """A volume belongs to the guest its name says (`subvol-200-disk-0` is guest 200's, SPEC §10):
    another guest claiming it would replicate over it, or take its snapshots as a base."""
    owner = None if disk.is_path else volname_vmid(disk.volname)
    if owner is not None and owner != vmid:
        raise ValidationError(f"volume '{show(disk.volid)}' belongs to guest {owner}, not {vmid}")


def replicatable_volumes(guest: Guest, storages: dict[str, Storage]) -> list[Disk]:
    """The disks replication copies: zfspool disks not marked replicate=0 (SPEC §1).

    Other storage types (shared) are skipped, a storage that no longer exists is dropped,
    and a replicated local path or device is an error.
    """
    out = []
    for disk in guest.disks:
        if not disk.replicate:
            continue
        if disk.is_path:
            raise ValidationError(f"unable to replicate local file/device '{show(disk.volid)}'")
        st = storages.get(disk.storage or "")
        if st is None or st.type != "zfspool":
            continue
        out.append(disk)
    return out


@dataclass
class Job:
    id: str
    target: str
    schedule: str | None = None  # unset: DEFAULT_SCHEDULE applies (pvesr: `$jobcfg->{schedule} || '*/15'`)
    rate: float | None = None
    comment: str | None = None
    disable: bool = False
    remove_job: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, tz: str = "UTC", schedule_limits: bool = True) -> None:
        """Check and normalise every field. schedule_limits=False accepts a schedule outside the
        job limits (SPEC §4) that still parses: an imported job's, or one that is not being changed."""
        parse_job_id(self.id)
        self.target = check_node_name(self.target, "target node name")
        if self.schedule is not None:
            self.schedule = check_schedule(self.schedule, tz, schedule_limits)
        if self.rate is not None:
            self.rate = check_rate(self.rate)
        if self.comment is not None:
            self.comment = check_comment(self.comment) or None  # empty = unset, as in pvesr
        self.disable = parse_bool(self.disable, "disable")
        if self.remove_job is not None and self.remove_job not in REMOVE_MODES:
            raise ValidationError(f"remove_job: invalid value '{show(self.remove_job)}' (local or full)")
        if self.source is not None:
            self.source = check_node_name(self.source, "source node name")

    @property
    def guest(self) -> int:
        return job_id_sort_key(self.id)[0]

    @property
    def jobnum(self) -> int:
        return job_id_sort_key(self.id)[1]

    @property
    def type(self) -> str:
        return "local"

    @property
    def effective_schedule(self) -> str:
        """The calendar the job runs on: its schedule, else the default `*/15`."""
        return self.schedule or DEFAULT_SCHEDULE

    def config(self) -> dict[str, Any]:
        """The stored configuration: set fields only."""
        out: dict[str, Any] = {"id": self.id, "target": self.target}
        for k in ("schedule", "rate", "comment", "remove_job", "source"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if self.disable:
            out["disable"] = True
        return out


# Fields of Job that `update` may change or `--delete` may unset (target is fixed).
UPDATABLE = ("schedule", "rate", "comment", "disable", "source", "remove_job")
DELETABLE = ("schedule", "rate", "comment", "disable", "source", "remove_job")


@dataclass
class JobState:
    last_sync: float = 0
    last_try: float = 0
    fail_count: int = 0
    error: str | None = None
    duration: float = 0.0
    last_node: str | None = None
    storeid_list: list[str] = field(default_factory=list)
    worker: str | None = None
    task_id: str | None = None
    bytes: int = 0
    progress: dict | None = None
    # `node:dataset` of the diverged states the last --discard-target-changes run kept aside
    kept: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STATE_FIELDS = tuple(f.name for f in fields(JobState))
# Keys of a pvesr state object that replq accepts in set-state but does not keep.
PVESR_IGNORED_STATE = ("pid", "ptime", "last_iteration")


def _num(value: object, what: str, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValidationError(f"{what}: expected a non-negative number, got {show(value)}")
    if integer and value != int(value):
        raise ValidationError(f"{what}: expected an integer, got {show(value)}")
    return int(value) if integer else value


def check_state_fields(values: dict[str, Any], *, allow_runtime: bool = True) -> dict[str, Any]:
    """Validate (a subset of) JobState fields with their types; returns normalised values."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("last_sync", "last_try", "duration"):
            out[key] = _num(value, key)
        elif key in ("fail_count", "bytes"):
            out[key] = _num(value, key, integer=True)
        elif key == "error":
            out[key] = None if value is None else _clean(value, "error")[:MAX_COMMENT]
        elif key == "last_node":
            out[key] = None if value is None else check_node_name(value, "last_node")
        elif key == "storeid_list":
            if not isinstance(value, list):
                raise ValidationError(f"storeid_list: expected a list, got {show(value)}")
            out[key] = [check_storage_id(v) for v in value]
        elif key == "kept":
            if not isinstance(value, list) or not all(isinstance(v, str) and 0 < len(v) <= 300 for v in value):
                raise ValidationError(f"kept: expected a list of node:dataset names, got {show(value)}")
            out[key] = [_clean(v, "kept") for v in value]
        elif allow_runtime and key in ("worker", "task_id"):
            out[key] = None if value is None else _clean(value, key)[:200]
        elif allow_runtime and key == "progress":
            if value is not None and not isinstance(value, dict):
                raise ValidationError("progress: expected an object")
            out[key] = value
        else:
            raise ValidationError(f"unknown job state field '{show(key)}'")
    return out
