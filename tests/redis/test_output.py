"""Progress as operators read it: in `replq status --progress` while a job runs, and in `replq run`."""

from __future__ import annotations

import subprocess
import sys

from replq.model import Disk, Guest, Job, Node, Storage
from replq.output import human_bytes, progress_line
from replq.store import Store


def test_progress_line_formats_bytes_rate_and_eta() -> None:
    p = {"bytes": 12 * 1024**2, "total": 48 * 1024**2, "rate": 2_000_000.0, "eta": 17}
    assert progress_line(p) == "12.0 MiB of 48.0 MiB (25%), 2.0 MB/s, ETA 0:17"
    assert progress_line({"bytes": 0}) == "0 B"
    assert progress_line({"bytes": 5 * 1024**3, "eta": 3725}) == "5.0 GiB, ETA 1:02:05"
    assert human_bytes(3 * 1024**4) == "3.0 TiB"


def test_status_text_shows_progress_of_a_running_job(redis_url: str) -> None:
    store = Store.from_url(redis_url)
    for n in ("pve1", "pve2"):
        store.add_node(Node(name=n, address=f"10.0.0.{n[-1]}"))
    store.add_storage(Storage(id="local-zfs", pool="rpool/data"))
    store.add_guest(Guest(vmid=100, node="pve1", disks=[Disk("local-zfs:subvol-100-disk-0")]))
    store.create_job(Job(id="100-0", target="pve2"))
    store.update_state("100-0", worker="replq@pve1", task_id="t1")
    store.set_progress("100-0", {"bytes": 1024**2, "total": 4 * 1024**2, "rate": 1e6, "eta": 3})
    r = subprocess.run([sys.executable, "-m", "replq", "status", "--progress"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    row = r.stdout.splitlines()[1]
    assert row.startswith("100-0 ")
    assert row.endswith(" SYNCING 1.0 MiB of 4.0 MiB (25%), 1.0 MB/s, ETA 0:03")
    # pvesr's format by default: a parser reading the State column sees SYNCING alone.
    plain = subprocess.run([sys.executable, "-m", "replq", "status"], capture_output=True, text=True, timeout=60)
    assert plain.stdout.splitlines()[1].endswith(" SYNCING")


def test_progress_publishing_survives_a_redis_error() -> None:
    import redis

    from replq.transfer import Progress

    calls: list[dict | None] = []

    def publish(record: dict | None) -> None:
        calls.append(record)
        raise redis.exceptions.ConnectionError("Redis restarting")

    p = Progress(publish=publish, total=100)
    p.update(40, force=True)  # must not raise: the transfer goes on
    assert calls and calls[0]["bytes"] == 40
