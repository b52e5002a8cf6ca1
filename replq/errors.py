"""Every error replq can meet, in one tree. Each message is the one line an operator reads.

    ReplqError                      str() is printed on stderr as is; exit_code 1
    ├── ValidationError             input breaks a rule (id, name, rate, schedule, JSON); exit 1
    │   └── CalendarError           a calendar event that does not parse (calendar.py)
    ├── NotFound                    a referenced node, storage, guest or job does not exist
    ├── Conflict                    uniqueness/consistency rule, stale digest, concurrent change
    ├── JobRefused                  a run cannot start: wrong node, disabled, start <= last_sync
    ├── StorageUnavailable          a volume's storage is missing or disabled on the target
    ├── PlanError                   the plan refuses before anything is touched (plan.py)
    ├── Diverged                    a target changed since the common base, or is not this job's replica
    │   ├── NoCommonBase, NoReplicatableVolumes, LocalFileVolume,
    │   └── SourceVolumeMissing, SnapshotExists
    ├── HostKeyMismatch             the node's SSH host key is not the pinned one
    ├── MigrationRefused            migrate / guest move refused; nothing was changed
    ├── SandboxError                the sandbox cannot do what was asked
    ├── UntrustedProgram            a program replq would run as root is not root's alone (hooks.py)
    └── ServiceError                an outside system failed (Redis, SSH, zfs, a transfer)
        ├── NodeUnreachable         cannot connect or log in over SSH
        ├── ConnectionLost          an established SSH connection broke or stalled
        ├── RemoteExited            the remote command stopped reading mid-stream
        ├── GuestLocked             another job of the guest holds the guest lock
        ├── SendFailed              the local `zfs send` failed or was killed
        ├── Stalled                 a transfer made no progress for `stall_timeout` seconds
        ├── Cancelled               the run was cancelled (revoked, worker stopping)
        ├── LockLost                its lock was lost or not renewed in time: no further step is taken
        ├── MigrationFailed         a migration step failed; the guest stays where it was
        └── ZfsError                a zfs command failed (zfs.py maps its stderr)
            ├── NoSpace, DatasetBusy, DatasetNotFound, DatasetExists, TargetModified,
            └── StreamBroken, ZfsUnavailable, Unsupported

Whatever the error, a failed run is retried `retry_interval` later (SPEC §3): the class says
what happened, not whether to retry.
"""

from __future__ import annotations

from collections.abc import Sequence


class ReplqError(Exception):
    """Base class: the message is shown to the operator as is."""

    exit_code = 1


class ValidationError(ReplqError):
    """Input that does not satisfy the model's rules (bad id, name, rate, schedule...)."""


class CalendarError(ValidationError):
    """A calendar event that does not parse; the message names the position."""


class NotFound(ReplqError):
    """A referenced object (node, storage, guest, job) does not exist."""


class Conflict(ReplqError):
    """The change would break a uniqueness or consistency rule, or a digest is stale."""


class JobRefused(ReplqError):
    """The run cannot start (wrong node, disabled, start before last sync, ...)."""


class StorageUnavailable(ReplqError):
    """A volume's storage does not exist or is disabled on the target node."""


class HostKeyMismatch(ReplqError):
    """The target's host key differs from the pinned one: refuse (possible impersonation)."""


class MigrationRefused(ReplqError):
    """The migration or move cannot start; nothing was changed."""


class SandboxError(ReplqError):
    """The sandbox cannot do what was asked; the message says why."""


# ---- plan refusals (pure decisions, nothing touched) ----------------------------------------


class UntrustedProgram(ReplqError):
    """A program replq would run is not owned by root, or it or a directory above it is writable by others."""


class PlanError(ReplqError):
    """The run must stop before changing anything."""


class NoCommonBase(PlanError):
    def __init__(self, volumes: Sequence[str]) -> None:
        self.volumes = list(volumes)
        super().__init__(f"No common base snapshot on volume(s) {', '.join(self.volumes)}")


class LocalFileVolume(PlanError):
    def __init__(self, volid: str) -> None:
        self.volid = volid
        super().__init__(f"unable to replicate local file/device '{volid}'")


class NoReplicatableVolumes(PlanError):
    def __init__(self) -> None:
        super().__init__("No replicatable volumes found")


class SourceVolumeMissing(PlanError):
    def __init__(self, volumes: Sequence[str]) -> None:
        self.volumes = list(volumes)
        super().__init__(f"volume(s) {', '.join(self.volumes)} do not exist on the source node")


class SnapshotExists(PlanError):
    def __init__(self, dataset: str, name: str) -> None:
        super().__init__(f"snapshot '{dataset}@{name}' already exists")


class Diverged(ReplqError):
    """A receive would destroy data on the target (SPEC §10): it was written after the common base,
    holds newer snapshots, is the guest's live disk or another guest's or job's. Nothing was changed;
    the message names node, dataset and how much would be lost."""


# ---- outside systems -------------------------------------------------------------------------


class ServiceError(ReplqError):
    """An outside system (Redis, SSH, zfs) failed."""


class NodeUnreachable(ServiceError):
    """Cannot reach or log in to the node (network down, sshd stopped, bad credentials)."""


class ConnectionLost(ServiceError):
    """An established SSH connection broke or stalled."""


class RemoteExited(ServiceError):
    """The remote command ended (and stopped reading) while we were still sending."""


class GuestLocked(ServiceError):
    """Another job of this guest is running (guest lock held)."""


class SendFailed(ServiceError):
    """The local `zfs send` failed or was killed."""


class Stalled(ServiceError):
    """A transfer made no progress for the cluster's `stall_timeout` (a hung zfs send or recv)."""


class Cancelled(ServiceError):
    """The run was cancelled before it finished."""


class LockLost(ServiceError):
    """The lock guarding the work is gone or could not be renewed for 0.8 x TTL (Redis away): the
    work stops before anyone else can take the lock, and takes no further destructive step."""


class MigrationFailed(ServiceError):
    """A step failed; the guest stays where it was (what was started is undone)."""


class ZfsError(ServiceError):
    """A zfs command failed; the message is the operator's view, `detail` the zfs text."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class NoSpace(ZfsError):
    """The pool is full: an operator must free space."""


class DatasetBusy(ZfsError):
    """zfs refused with "dataset is busy" (zfs-fuse holds a dataset busy for a moment)."""


class DatasetNotFound(ZfsError):
    pass


class DatasetExists(ZfsError):
    pass


class TargetModified(ZfsError):
    """zfs recv: the destination was modified since the base."""


class StreamBroken(ZfsError):
    """The send stream ended early or was corrupted (sender killed, connection lost)."""


class ZfsUnavailable(ZfsError):
    """The zfs service (kernel module / zfs-fuse daemon) is not answering."""


class Unsupported(ZfsError):
    """This zfs lacks an option replq asked for."""
