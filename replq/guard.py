"""What the engine does on a target to keep its data safe (SPEC §10): it destroys only what it
received itself, proven by GUID. The decisions are pure (safety.py); this is their I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from replq import safety, zfs
from replq.model import Snapshot


def destroy_own_copy(z: zfs.Zfs, dataset: str, sent: Sequence[Snapshot], snap: str, guid: int,
                     say: Callable[[str], None], timeout: float | None = None) -> bool:
    """After a failed full receive or copy: destroy `dataset` on z's node only if it is the copy
    this run sent (snapshot `snap` with `guid`, nothing foreign on it). True if destroyed."""
    listing = z.list([dataset], timeout=timeout)
    if dataset not in listing:
        return False  # the receive left nothing behind (zfs discards a failed full receive itself)
    if not safety.is_own_copy(listing[dataset], sent, snap, guid):
        say(f"left '{dataset}' on {z.node} untouched: it is not the copy this run sent (no snapshot @{snap} "
            f"with guid {guid}, or snapshots of its own)")
        return False
    z.destroy_dataset(dataset, timeout=timeout)
    say(f"deleted '{dataset}' on {z.node}: the copy this run received (@{snap}, guid {guid})")
    return True
