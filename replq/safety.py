"""The decisions that keep data safe at the moment of failure (SPEC §10, pure).

Each is a function of what zfs and the store reported, so it is tested exhaustively without a
cluster; the engine (guard.py, replicate.py, migrate.py) does the I/O around it.

    is_own_copy        may a target dataset be destroyed as the copy this run received?
"""

from __future__ import annotations

from collections.abc import Sequence

from replq.model import Snapshot


def is_own_copy(target: Sequence[Snapshot] | None, sent: Sequence[Snapshot], snap: str, guid: int) -> bool:
    """A target dataset is this run's own copy (and may be destroyed after a failure) only if it
    holds snapshot `snap` with the guid that was sent, and every snapshot on it is one of the
    source's (same name and guid). A dataset that appeared by another hand meanwhile, or one that
    gained snapshots of its own, is not. `target` None: the dataset does not exist."""
    if not target:
        return False
    mine = {s.name: s.guid for s in sent}
    if mine.get(snap) != guid:
        return False
    return any(s.name == snap and s.guid == guid for s in target) and all(mine.get(s.name) == s.guid for s in target)
