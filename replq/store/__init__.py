"""The cluster store: configuration, job state, schedule index, logs and locks in Redis.

The only code that knows Redis keys (the layout is in keys.py). One public class, `Store`,
made of its parts by concern:

    keys.py       key layout, Lua scripts, connection, transactions, shared parsers
    inventory.py  nodes, storages, guests, guest-wide changes (migration, direction switch)
    jobs.py       jobs, job state, cluster settings, the schedule index
    runtime.py    routes and queued markers, locks, progress, replication logs
    backup.py     the whole cluster read in one snapshot and restored in one transaction

Every rule that spans keys (unique id, one job per guest and target, references between
objects, digests) is checked inside WATCH/MULTI, so concurrent clients cannot both win;
validation happens before anything is queued, so a refusal writes nothing.
"""

from __future__ import annotations

from replq.store.backup import BackupStore
from replq.store.inventory import GuestChange, InventoryStore
from replq.store.jobs import JobStore
from replq.store.keys import DEFAULT_PREFIX, job_digest
from replq.store.runtime import JobRoute, RuntimeStore


class Store(InventoryStore, JobStore, RuntimeStore, BackupStore):
    """The whole cluster store (see the package docstring for its parts)."""


__all__ = ["Store", "GuestChange", "JobRoute", "job_digest", "DEFAULT_PREFIX"]
