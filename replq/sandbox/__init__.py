"""The sandbox: a real multi-node ZFS cluster on one machine (SPEC §8, ARCHITECTURE.md).

    state.py     the sandbox's description on disk (<dir>/sandbox.json)
    node.py      a node: mount namespace, zfs-fuse daemon and pool, sshd
    cluster.py   the cluster: up, down, its Redis, registration in the store, status
    services.py  beat, a worker per node, Flower and the metrics exporter
    procs.py     helpers: processes of a namespace, ports, commands, waiting
"""

from __future__ import annotations

from replq.errors import SandboxError
from replq.procs import alive as process_alive
from replq.sandbox.cluster import Sandbox
from replq.sandbox.state import DEFAULT_DIR, default_dir

__all__ = ["Sandbox", "SandboxError", "default_dir", "DEFAULT_DIR", "process_alive"]
