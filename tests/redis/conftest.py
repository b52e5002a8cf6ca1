"""Fixtures of the Redis tier."""

from __future__ import annotations

import pytest

from replq.model import Disk, Guest, Node, Storage
from replq.store import Store


@pytest.fixture
def store(redis_url: str) -> Store:
    """A small cluster in an empty store: nodes pve1..pve3, storage local-zfs, guests 100-102 on pve1
    (modules with other needs define their own `store`)."""
    s = Store.from_url(redis_url)
    s.set_setting("timezone", "UTC")
    for n in ("pve1", "pve2", "pve3"):
        s.add_node(Node(n, f"10.0.0.{n[-1]}"))
    s.add_storage(Storage("local-zfs", "rpool/data"))
    for vmid in (100, 101, 102):
        s.add_guest(Guest(vmid, "pve1", "lxc", [Disk(f"local-zfs:subvol-{vmid}-disk-0")]))
    return s
