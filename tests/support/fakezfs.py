"""A fake ZFS node and a fake transfer, to test the order of a run's steps and its undo paths
without ZFS or SSH (the sandbox tests remain the proof on real ZFS).

`FakeZfs` answers the zfs command lines replq builds (zfs.py) from an in-memory pool of
datasets and snapshots, records every call, and fails a command on request. `FakeTransfer`
stands in for transfer.send_stream: it applies `zfs send -Rp [-I base] ds@snap` of one FakeZfs
to another, or fails as a broken stream, a full pool or a lost connection would.
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from replq.errors import ConnectionLost, DatasetExists, NoSpace, StreamBroken

_guids = itertools.count(1000)


@dataclass
class Snap:
    name: str
    guid: int
    creation: int
    written: int = 0  # bytes written to the dataset between the previous snapshot and this one


@dataclass
class FakeZfs:
    """One node's pool: {dataset: [Snap, ...]} (oldest first); also usable as an SSH connection."""

    node: str
    datasets: dict[str, list[Snap]] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)
    fail: dict[str, str] = field(default_factory=dict)  # argv prefix -> stderr of a failure
    clock: Callable[[], int] = lambda: 0
    log: list[tuple[str, list[str]]] | None = None  # shared with the other side: the global order
    props: dict[str, dict[str, str]] = field(default_factory=dict)  # locally set properties per dataset
    dirty: dict[str, int] = field(default_factory=dict)  # bytes written since the newest snapshot

    def run(self, argv: Sequence[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        argv = list(argv)
        if argv[:2] == ["sh", "-c"]:  # the few pipelines zfs.py builds: zfs commands joined by && or | wc -c
            out = ""
            for step in argv[2].split(" && "):
                words = shlex.split(step.split(" | ")[0])
                res = self.run(words, timeout)
                if res.returncode != 0:
                    return res
                out = str(res.stdout) if " | wc -c" not in step else f"{len(res.stdout)}\n"
            return subprocess.CompletedProcess(argv, 0, out, "")
        self.calls.append(argv)
        if self.log is not None:
            self.log.append((self.node, argv))
        line = " ".join(argv)
        for prefix, err in self.fail.items():
            if line.startswith(prefix):
                return subprocess.CompletedProcess(argv, 1, "", err)
        try:
            out = self._do(argv)
        except KeyError as exc:
            return subprocess.CompletedProcess(argv, 1, "", f"cannot open '{exc.args[0]}': dataset does not exist")
        return subprocess.CompletedProcess(argv, 0, out, "")

    def write(self, ds: str, n: int) -> None:
        """A guest (or an operator) writes n bytes into the dataset's present state."""
        self.dirty[ds] = self.dirty.get(ds, 0) + n

    def close(self) -> None:
        pass

    # ---- zfs -----------------------------------------------------------------------------
    def _do(self, argv: list[str]) -> str:
        words = [a for a in argv[1:] if a != "--"]
        verb = words[0]
        if verb == "get":
            return self._get(words)
        if verb == "snapshot":
            ds, name = words[1].split("@")
            if any(s.name == name for s in self.datasets[ds]):
                raise KeyError(words[1])
            self.datasets[ds].append(Snap(name, next(_guids), self.clock(), self.dirty.pop(ds, 0)))
            return ""
        if verb == "set":
            key, value = words[1].split("=", 1)
            self.props.setdefault(self._ds(words[2]), {})[key] = value
            return ""
        if verb == "inherit":
            self.props.setdefault(self._ds(words[2]), {}).pop(words[1], None)
            return ""
        if verb in ("umount", "mount"):
            self._ds(words[1])
            return ""
        if verb == "rename":
            old, new = self._ds(words[1]), words[2]
            self.datasets[new] = self.datasets.pop(old)
            self.props[new] = self.props.pop(old, {})
            self.dirty[new] = self.dirty.pop(old, 0)
            return ""
        if verb == "destroy":
            if words[1] == "-r":
                del self.datasets[words[2]]
                return ""
            ds, name = words[1].split("@")
            snaps = self.datasets[ds]
            i = next((i for i, s in enumerate(snaps) if s.name == name), None)
            if i is None:
                raise KeyError(words[1])
            gone = snaps.pop(i)  # its changes now belong to the next snapshot, or to the present state
            if i < len(snaps):
                snaps[i].written += gone.written
            else:
                self.dirty[ds] = self.dirty.get(ds, 0) + gone.written
            return ""
        if verb == "rollback":
            ds, name = words[2].split("@")
            names = [s.name for s in self.datasets[ds]]
            self.datasets[ds] = self.datasets[ds][: names.index(name) + 1]
            self.dirty.pop(ds, None)
            return ""
        if verb == "send" and words[1] == "-i":  # the change measure: a stream of 624 bytes + what changed
            ds, frm = words[2].split("@")
            to = words[3].split("@")[1]
            names = [s.name for s in self.datasets[ds]]
            changed = sum(s.written for s in self.datasets[ds][names.index(frm) + 1: names.index(to) + 1])
            return "x" * (624 + changed)
        if verb == "send":  # only the feature probe `send -nvP` without a snapshot reaches here
            raise KeyError("invalid option 'n'")
        raise AssertionError(f"fake zfs does not know {argv}")

    def _ds(self, ds: str) -> str:
        if ds not in self.datasets:
            raise KeyError(ds)
        return ds

    def _get(self, words: list[str]) -> str:
        for unknown in ("receive_resume_token", "written"):
            if unknown in words:
                raise KeyError(f"bad property list: invalid property '{unknown}'")
        recursive = "-r" in words
        columns = words[words.index("-o") + 1].split(",")
        props = words[words.index("-o") + 2].split(",")
        targets = words[words.index("-o") + 3:]
        if "source" in columns:  # replq's markers: the locally set properties, "-" for the others
            out = []
            for t in targets:
                have = self.props.get(self._ds(t), {})
                out += [f"{t}\t{p}\t{have.get(p, '-')}\t{'local' if p in have else '-'}" for p in props]
            return "\n".join(out) + "\n"
        lines = []
        for t in targets:
            for ds in sorted(self.datasets):
                if not (ds == t.split("@")[0] or (recursive and ds.startswith(t + "/"))):
                    continue
                if "@" in t:
                    snap = next(s for s in self.datasets[ds] if s.name == t.split("@")[1])
                    lines += [f"{t}\t{p}\t{self._prop(p, snap)}" for p in props]
                    continue
                lines += [f"{ds}\t{p}\t{self._prop(p, None)}" for p in props]
                if recursive:
                    for s in self.datasets[ds]:
                        lines += [f"{ds}@{s.name}\t{p}\t{self._prop(p, s)}" for p in props]
            if not any(ds == t.split("@")[0] or ds.startswith(t + "/") for ds in self.datasets):
                raise KeyError(t)
        return "\n".join(lines) + ("\n" if lines else "")

    @staticmethod
    def _prop(prop: str, snap: Snap | None) -> str:
        if prop == "type":
            return "snapshot" if snap else "filesystem"
        if prop == "guid":
            return str(snap.guid if snap else 1)
        if prop == "creation":
            return str(snap.creation if snap else 0)
        return "4096"  # used, referenced: sizes for the estimate

    def names(self, ds: str) -> list[str]:
        return [s.name for s in self.datasets.get(ds, [])]


class FakeTransfer:
    """transfer.send_stream between two FakeZfs; `fail` makes the next send fail as `kind`."""

    def __init__(self, source: FakeZfs, target: FakeZfs) -> None:
        self.source, self.target = source, target
        self.sends: list[tuple[list[str], list[str]]] = []
        self.fail: str | None = None  # "broken", "nospace", "lost", "after-commit", "exists"

    def __call__(self, conn: Any, send_argv: list[str], recv_argv: list[str], **kw: Any) -> tuple[int, float]:
        self.sends.append((send_argv, recv_argv))
        if self.source.log is not None:
            self.source.log.append(("transfer", send_argv))
        words = [a for a in send_argv[1:] if a != "--"]
        ds, snap = words[-1].split("@")
        base = words[words.index("-I") + 1].split("@")[1] if "-I" in words else None
        src = self.source.datasets[ds]
        names = [s.name for s in src]
        upto = src[: names.index(snap) + 1]
        kind, self.fail = self.fail, None
        if kind == "exists":  # a full receive into a dataset that appeared meanwhile
            raise DatasetExists(f"receiving {ds} on node '{self.target.node}' failed: destination '{ds}' exists")
        if kind == "broken":
            raise StreamBroken(f"receiving {ds} on node '{self.target.node}' failed: invalid backup stream")
        if kind == "nospace":
            raise NoSpace(f"no free space left on the replication target storage on node '{self.target.node}'")
        if kind == "lost":
            raise ConnectionLost(f"connection to node '{self.target.node}' lost mid-stream")
        self.target.dirty.pop(ds, None)  # recv -F: the target's own changes since its newest snapshot are gone
        if base is None:
            self.target.datasets[ds] = [Snap(s.name, s.guid, s.creation) for s in upto]
        else:
            have = self.target.datasets[ds]
            keep = have[: [s.name for s in have].index(base) + 1]  # recv -F: back to the base
            start = names.index(base) + 1
            self.target.datasets[ds] = keep + [Snap(s.name, s.guid, s.creation) for s in upto[start:]]
        if kind == "after-commit":  # zfs recv committed, then its exit status never arrived
            raise ConnectionLost(f"connection to node '{self.target.node}' lost: no exit status")
        kw.get("on_bytes", lambda n: None)(4096)
        return 4096, 0.01
