"""The one door to `zfs`: command lines, output parsing, error mapping, feature detection.

Every zfs command replq runs is built here as an argv list from validated names (never a
shell string); a command for another node is the same argv, each word quoted by the SSH
exec (ssh.py). Output is parsed from `zfs get -Hp`, which works on zfs-fuse
(pool version 23: its `zfs list` has no -p and prints guids as "2.04E") as well as on
OpenZFS. Error text is mapped to typed errors with operator-facing messages.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from replq.errors import (
    DatasetBusy,
    DatasetExists,
    DatasetNotFound,
    NoSpace,
    ServiceError,
    StreamBroken,
    TargetModified,
    Unsupported,
    ValidationError,
    ZfsError,
    ZfsUnavailable,
)
from replq.model import Snapshot

ZFS = "zfs"
# ZFS component names: alphanumerics and _ - . : ; never starting with '-' (it would read as
# an option) and no spaces, so a name is always exactly one argv word.
_COMPONENT = r"[A-Za-z0-9_][A-Za-z0-9_.:-]*"
DATASET_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
SNAPNAME_RE = re.compile(rf"^{_COMPONENT}$")
MAX_NAME = 255
BUSY_WAIT = 6.0  # seconds to retry a destroy/rollback refused with "dataset is busy"
# An incremental stream of a dataset without changes: its BEGIN and END records (312 bytes each
# in zfs-fuse's stream format, measured on the sandbox); anything more is a change.
EMPTY_INCREMENTAL = 624


# ---------------------------------------------------------------------------------- names


def validate_dataset(name: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not DATASET_RE.match(name):
        raise ValidationError(f"invalid ZFS dataset name {name!r}")
    return name


def validate_snapname(name: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME or not SNAPNAME_RE.match(name):
        raise ValidationError(f"invalid ZFS snapshot name {name!r}")
    return name


def snapshot_ref(dataset: str, snap: str) -> str:
    """`dataset@snap`, both parts validated."""
    return f"{validate_dataset(dataset)}@{validate_snapname(snap)}"


# ---------------------------------------------------------------------------------- argv


def list_argv(roots: Iterable[str]) -> list[str]:
    """Datasets and snapshots under each root, with guid and creation as raw numbers."""
    return [ZFS, "get", "-Hp", "-r", "-o", "name,property,value", "type,guid,creation", "--",
            *(validate_dataset(r) for r in roots)]  # fmt: skip


PROPERTY_RE = re.compile(rf"[a-z][a-z0-9_]*(?::[a-z][a-z0-9_-]*|@{_COMPONENT})?")  # native, `replq:x`, `written@snap`
VALUE_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")  # the values replq sets: numbers, names, ids


def get_argv(props: Sequence[str], targets: Iterable[str], columns: str = "name,property,value") -> list[str]:
    for p in props:
        if not PROPERTY_RE.fullmatch(p):
            raise ValidationError(f"invalid ZFS property {p!r}")
    names = []
    for t in targets:
        if "@" in t:
            ds, snap = t.split("@", 1)
            names.append(snapshot_ref(ds, snap))
        else:
            names.append(validate_dataset(t))
    return [ZFS, "get", "-Hp", "-o", columns, ",".join(props), "--", *names]


def snapshot_argv(dataset: str, snap: str) -> list[str]:
    return [ZFS, "snapshot", "--", snapshot_ref(dataset, snap)]


def destroy_snapshot_argv(dataset: str, snap: str) -> list[str]:
    return [ZFS, "destroy", "--", snapshot_ref(dataset, snap)]


def destroy_dataset_argv(dataset: str) -> list[str]:
    """Destroy a volume with its snapshots (-r); never a pool root (no '/' in the name)."""
    if "/" not in validate_dataset(dataset):
        raise ValidationError(f"refusing to destroy pool root {dataset!r}")
    return [ZFS, "destroy", "-r", "--", dataset]


def rollback_argv(dataset: str, snap: str) -> list[str]:
    """Roll back to `snap`, destroying later snapshots (a failed receive's leftovers)."""
    return [ZFS, "rollback", "-r", "--", snapshot_ref(dataset, snap)]


def send_argv(dataset: str, snap: str, base: str | None = None) -> list[str]:
    """`zfs send -Rp [-I base] dataset@snap` (SPEC §5 step 7)."""
    argv = [ZFS, "send", "-Rp"]
    if base is not None:
        argv += ["-I", snapshot_ref(dataset, base)]
    return argv + [snapshot_ref(dataset, snap)]


def recv_argv(dataset: str, incremental: bool = True) -> list[str]:
    """`-F` only for incremental streams (roll back to the base). A full stream is received
    without it, so that it fails atomically if a dataset of that name appeared meanwhile
    instead of overwriting it."""
    force = ["-F"] if incremental else []
    return [ZFS, "recv", *force, "--", validate_dataset(dataset)]


def set_props_argv(dataset: str, props: Mapping[str, str], clear: Sequence[str] = ()) -> list[str]:
    """Set properties and clear (inherit) others in one command on the node: zfs-fuse's `zfs set`
    takes one property at a time, so it is a `sh -c` of one zfs command per property, every word
    validated and quoted."""
    ds = validate_dataset(dataset)
    steps = []
    for key, value in props.items():
        if not PROPERTY_RE.fullmatch(key) or not VALUE_RE.fullmatch(value):
            raise ValidationError(f"invalid ZFS property setting {key}={value!r}")
        steps.append(shlex.join([ZFS, "set", f"{key}={value}", ds]))
    for key in clear:
        if not PROPERTY_RE.fullmatch(key):
            raise ValidationError(f"invalid ZFS property {key!r}")
        steps.append(shlex.join([ZFS, "inherit", key, ds]))
    return ["sh", "-c", " && ".join(steps)]


def measure_argv(dataset: str, base: str, snap: str) -> list[str]:
    """Bytes of the incremental stream base → snap, counted on the node (`zfs send -i … | wc -c`)."""
    send = [ZFS, "send", "-i", snapshot_ref(dataset, base), snapshot_ref(dataset, snap)]
    return ["sh", "-c", f"{shlex.join(send)} | wc -c"]


def rename_argv(dataset: str, new: str) -> list[str]:
    """Rename an unmounted dataset (zfs-fuse refuses a mounted one as busy), then mount it again."""
    old, new = validate_dataset(dataset), validate_dataset(new)
    return ["sh", "-c", " && ".join([shlex.join([ZFS, "umount", old]), shlex.join([ZFS, "rename", old, new]),
                                     shlex.join([ZFS, "mount", new])])]


def send_estimate_argv(dataset: str, snap: str, base: str | None = None) -> list[str]:
    """Dry-run size estimate (OpenZFS only: `send -nvP`)."""
    argv = [ZFS, "send", "-nvP", "-Rp"]
    if base is not None:
        argv += ["-I", snapshot_ref(dataset, base)]
    return argv + [snapshot_ref(dataset, snap)]


# ---------------------------------------------------------------------------------- parsing


def parse_get(text: str) -> dict[str, dict[str, str]]:
    """`zfs get -Hp -o name,property,value` output → {name: {property: value}}."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ServiceError(f"unexpected zfs output line: {line!r}")
        name, prop, value = parts
        out.setdefault(name, {})[prop] = value
    return out


def parse_listing(text: str) -> dict[str, list[Snapshot]]:
    """Output of `list_argv` → {dataset: [Snapshot, ...]} (datasets without snapshots map to [])."""
    props = parse_get(text)
    listing: dict[str, list[Snapshot]] = {}
    snaps: list[tuple[str, Snapshot]] = []
    for name, p in props.items():
        kind = p.get("type")
        if kind == "snapshot" or (kind is None and "@" in name):
            ds, short = name.split("@", 1)
            snaps.append((ds, Snapshot(short, _int(p.get("guid"), name), _int(p.get("creation"), name))))
        elif kind in ("filesystem", "volume"):
            listing.setdefault(name, [])
    for ds, s in snaps:
        listing.setdefault(ds, []).append(s)
    for v in listing.values():
        v.sort(key=lambda s: (s.creation, s.name))
    return listing


def parse_snapshot_list(text: str) -> dict[str, list[Snapshot]]:
    """`zfs list -Hp -o name,guid,creation -t snapshot` (OpenZFS) → {dataset: [Snapshot, ...]}."""
    listing: dict[str, list[Snapshot]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3 or "@" not in parts[0]:
            raise ServiceError(f"unexpected zfs output line: {line!r}")
        ds, short = parts[0].split("@", 1)
        listing.setdefault(ds, []).append(Snapshot(short, _int(parts[1], parts[0]), _int(parts[2], parts[0])))
    for v in listing.values():
        v.sort(key=lambda s: (s.creation, s.name))
    return listing


def parse_estimate(text: str) -> int | None:
    """The total of `zfs send -nvP` ("size\t12345"), if present."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "size" and parts[1].isdigit():
            return int(parts[1])
    return None


def _int(value: str | None, name: str) -> int:
    try:
        return int(value or "")
    except ValueError:
        raise ServiceError(f"unexpected zfs value {value!r} for {name} (not a raw number)") from None


# ---------------------------------------------------------------------------------- errors


_ERROR_PATTERNS: list[tuple[re.Pattern[str], type[ZfsError]]] = [
    (re.compile(r"out of space|no space left|insufficient space|ENOSPC|quota exceeded", re.I), NoSpace),
    (re.compile(r"dataset is busy|pool is busy|device busy|resource busy|EBUSY", re.I), DatasetBusy),
    (re.compile(r"has been modified|destination .* modified", re.I), TargetModified),
    (re.compile(r"invalid backup stream|checksum mismatch|premature|incomplete stream|unexpected end|"
                r"stream .* (?:ended|truncated)|input/output error|broken pipe", re.I), StreamBroken),  # fmt: skip
    (re.compile(r"zfs-fuse daemon|connect: connection refused|failed to initialize zfs library|"
                r"/dev/zfs", re.I), ZfsUnavailable),  # fmt: skip
    (re.compile(r"does not exist|no such pool|no such dataset", re.I), DatasetNotFound),
    (re.compile(r"already exists|destination .* exists", re.I), DatasetExists),
    (re.compile(r"invalid option|unrecognized option|invalid property|unknown option", re.I), Unsupported),
]


def first_error_line(stderr: str) -> str:
    """The zfs message itself: the first non-empty line that is not usage help."""
    for line in stderr.splitlines():
        line = line.strip()
        if line and not line.startswith("usage:"):
            return line
    return ""


def map_error(stderr: str, what: str, node: str | None = None, side: str = "source") -> ZfsError:
    """A typed error for a failed zfs command. `what` says what replq was doing."""
    detail = first_error_line(stderr) or "no error output"
    where = f" on node '{node}'" if node else ""
    for pattern, cls in _ERROR_PATTERNS:
        if pattern.search(stderr):
            if cls is NoSpace:
                storage = "replication target storage" if side == "target" else "source storage"
                return NoSpace(f"no free space left on the {storage}{where}: {what}: {detail}", stderr)
            if cls is ZfsUnavailable:
                return ZfsUnavailable(f"ZFS is not available{where}: {what}: {detail}", stderr)
            return cls(f"{what}{where} failed: {detail}", stderr)
    return ZfsError(f"{what}{where} failed: {detail}", stderr)


# ---------------------------------------------------------------------------------- running


class Result(Protocol):
    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs an argv on some node (locally or over SSH) and returns its outcome."""

    node: str

    def run(self, argv: Sequence[str], timeout: float | None = None) -> Result: ...


@dataclass
class LocalRunner:
    """zfs on this node."""

    node: str = "localhost"
    timeout: float = 900.0

    def run(self, argv: Sequence[str], timeout: float | None = None) -> Result:
        try:
            return subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout or self.timeout, check=False
            )
        except FileNotFoundError:
            raise ZfsUnavailable(f"ZFS is not available on node '{self.node}': '{argv[0]}' not found") from None
        except subprocess.TimeoutExpired:
            raise ZfsError(f"'{' '.join(argv[:2])}' on node '{self.node}' timed out") from None


@dataclass
class Features:
    send_estimate: bool  # zfs send -nvP
    resume_tokens: bool  # receive_resume_token / send -t
    written: bool = False  # the written@snapshot property (OpenZFS; not zfs-fuse)


class Zfs:
    """zfs operations on one node, through a Runner (local subprocess or SSH)."""

    def __init__(self, runner: Runner, side: str = "source", timeout: float | None = None) -> None:
        self.runner = runner
        self.side = side
        # Every command's time limit unless a step gives its own (a run sets the cluster's
        # stall_timeout: a hung zfs must not hang the run); None: the runner's default.
        self.timeout = timeout
        self._features: Features | None = None

    @property
    def node(self) -> str:
        return self.runner.node

    def _run(self, argv: list[str], what: str, timeout: float | None = None, busy_wait: float = 0.0) -> Result:
        """Run; on "dataset is busy" retry for up to `busy_wait` s (zfs-fuse holds a dataset
        busy for a moment after its files were last used)."""
        timeout = timeout or self.timeout
        deadline = time.monotonic() + (min(busy_wait, timeout / 2) if timeout else busy_wait)
        delay = 0.25
        while True:
            res = self.runner.run(argv, timeout=timeout)
            if res.returncode == 0:
                return res
            err = map_error(res.stderr, what, self.node, self.side)
            if not isinstance(err, DatasetBusy) or time.monotonic() + delay > deadline:
                raise err
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def features(self) -> Features:
        """Detect optional zfs features once, without side effects (no snapshot argument given)."""
        if self._features is None:
            res = self.runner.run([ZFS, "send", "-nvP"])
            estimate = "invalid option" not in res.stderr and res.returncode in (0, 1, 2)
            res = self.runner.run([ZFS, "get", "-H", "-o", "value", "receive_resume_token", "--", "-nonexistent"])
            resume = "invalid property" not in res.stderr and "bad property list" not in res.stderr
            res = self.runner.run([ZFS, "get", "-H", "-o", "value", "written", "--", "-nonexistent"])
            written = "invalid property" not in res.stderr and "bad property list" not in res.stderr
            self._features = Features(send_estimate=estimate, resume_tokens=resume, written=written)
        return self._features

    def list(self, roots: Iterable[str], timeout: float | None = None) -> dict[str, list[Snapshot]]:
        """Datasets and snapshots under the roots; a missing root is reported as absent."""
        roots = list(roots)
        if not roots:
            return {}
        res = self.runner.run(list_argv(roots), timeout=timeout or self.timeout or 600)
        if res.returncode != 0:
            bad = [line for line in res.stderr.splitlines() if line.strip() and "does not exist" not in line]
            if bad:
                raise map_error(res.stderr, "listing datasets", self.node, self.side)
        return parse_listing(res.stdout)

    def exists(self, dataset: str, timeout: float | None = None) -> bool:
        res = self.runner.run(get_argv(["type"], [dataset]), timeout=timeout or self.timeout)
        if res.returncode == 0:
            return True
        if "does not exist" in res.stderr:
            return False
        raise map_error(res.stderr, f"checking dataset '{dataset}'", self.node, self.side)

    def get(self, props: Sequence[str], targets: Iterable[str]) -> dict[str, dict[str, str]]:
        res = self._run(get_argv(props, targets), "reading ZFS properties")
        return parse_get(res.stdout)

    def local_props(self, props: Sequence[str], datasets: Sequence[str]) -> dict[str, dict[str, str]]:
        """{dataset: {property: value}} of the properties set on this node itself (not inherited,
        not received with a stream); a dataset with none maps to {}."""
        if not datasets:
            return {}
        res = self._run(get_argv(props, datasets, "name,property,value,source"), "reading ZFS properties")
        out: dict[str, dict[str, str]] = {ds: {} for ds in datasets}
        for line in res.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[3] == "local":
                out.setdefault(parts[0], {})[parts[1]] = parts[2]
        return out

    def set_props(self, dataset: str, props: Mapping[str, str], clear: Sequence[str] = (),
                  timeout: float | None = None) -> None:
        self._run(set_props_argv(dataset, props, clear), f"setting properties of '{dataset}'", timeout=timeout,
                  busy_wait=BUSY_WAIT)

    def rename(self, dataset: str, new: str) -> None:
        self._run(rename_argv(dataset, new), f"renaming '{dataset}' to '{new}'", busy_wait=BUSY_WAIT)

    def changed_since(self, dataset: str, chain: Sequence[str], check: str) -> int:
        """Bytes written to `dataset` since its snapshot chain[0], in the later snapshots chain[1:]
        (consecutive, oldest first) and in its present state; 0: unchanged. With `written` (OpenZFS)
        zfs says. zfs-fuse lacks it, so a snapshot `check` of the present state is taken, the
        incremental stream of each step of the chain is counted, and the snapshot is destroyed."""
        if self.features().written:
            last = chain[-1]
            props = self.get(["written"], [f"{dataset}@{s}" for s in chain[1:]]) if chain[1:] else {}
            head = self.get([f"written@{last}"], [dataset])[dataset].get(f"written@{last}")
            return sum(_int(p.get("written"), n) for n, p in props.items()) + _int(head, dataset)
        self.snapshot(dataset, check)
        try:
            total = 0
            for a, b in zip(chain, [*chain[1:], check], strict=True):
                res = self._run(measure_argv(dataset, a, b), f"measuring the changes of '{dataset}'")
                total += max(0, _int(res.stdout.strip(), dataset) - EMPTY_INCREMENTAL)
        finally:
            self.destroy_snapshot(dataset, check)
        return total

    def guids(self, dataset_snaps: Sequence[str]) -> dict[str, int]:
        """The guid of each `dataset@snap`."""
        props = self.get(["guid"], dataset_snaps)
        return {name: _int(p.get("guid"), name) for name, p in props.items()}

    def snapshot(self, dataset: str, snap: str) -> None:
        self._run(snapshot_argv(dataset, snap), f"creating snapshot '{dataset}@{snap}'")

    def destroy_snapshot(self, dataset: str, snap: str, missing_ok: bool = True, timeout: float | None = None) -> None:
        try:
            what = f"deleting snapshot '{dataset}@{snap}'"
            self._run(destroy_snapshot_argv(dataset, snap), what, timeout=timeout, busy_wait=BUSY_WAIT)
        except DatasetNotFound:
            if not missing_ok:
                raise

    def destroy_dataset(self, dataset: str, missing_ok: bool = True, timeout: float | None = None) -> None:
        try:
            self._run(destroy_dataset_argv(dataset), f"deleting volume '{dataset}'", timeout=timeout,
                      busy_wait=BUSY_WAIT)
        except DatasetNotFound:
            if not missing_ok:
                raise

    def rollback(self, dataset: str, snap: str, timeout: float | None = None) -> None:
        self._run(rollback_argv(dataset, snap), f"rolling back '{dataset}' to '{snap}'", timeout=timeout,
                  busy_wait=BUSY_WAIT)

    def estimate_send_size(self, dataset: str, snap: str | None, base: str | None) -> int | None:
        """Bytes `send -Rp [-I base] dataset@snap` will produce, or None when unknown.

        With `send -nvP` (OpenZFS) ask zfs. zfs-fuse has neither that nor `written@`, so
        estimate from space accounting: a full stream carries what the volume uses; an
        incremental one carries the blocks born after the base, which is
        referenced(new) - referenced(base) + used(base) (blocks freed since the base are
        the ones only the base still holds). `snap=None` (dry run) measures the live volume.
        """
        if snap is not None and self.features().send_estimate:
            res = self.runner.run(send_estimate_argv(dataset, snap, base), timeout=120)
            if res.returncode == 0:
                return parse_estimate(res.stdout + "\n" + res.stderr)
        try:
            if base is None:
                # -R carries the older snapshots too: the dataset's `used` covers them all.
                return int(self.get(["used"], [dataset])[dataset]["used"])
            new = f"{dataset}@{snap}" if snap else dataset
            props = self.get(["used", "referenced"], [new, f"{dataset}@{base}"])
            b = props[f"{dataset}@{base}"]
            return max(0, int(props[new]["referenced"]) - int(b["referenced"]) + int(b["used"]))
        except (KeyError, ValueError, ZfsError):
            return None
