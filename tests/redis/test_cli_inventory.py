"""Inventory commands end to end: node (host key fetched from a real sshd and pinned), storage,
guest, settings, config export/import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from replq.model import Disk, Guest, Job, Node, Storage
from replq.store import Store
from tests.support.helpers import ok, refused, run
from tests.support.redisproc import free_port


def keygen(path: Path) -> tuple[str, str]:
    """A new ed25519 key: (public key line without comment, `ssh-keygen -l` fingerprint)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True)
    pub = " ".join(Path(f"{path}.pub").read_text().split()[:2])
    fp = subprocess.run(["ssh-keygen", "-l", "-f", f"{path}.pub"], capture_output=True, text=True, check=True).stdout
    return pub, fp.split()[1]


class Sshd:
    """A private sshd on a free loopback port, with its own host key; restartable with a new key."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.pub = self.fingerprint = ""

    def start(self, key_name: str = "host_key") -> None:
        key = self.dir / key_name
        self.pub, self.fingerprint = keygen(key)
        cfg = self.dir / "sshd_config"
        cfg.write_text(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile {self.dir}/sshd.pid\n"
                       "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\n"
                       f"AuthorizedKeysFile {self.dir}/none\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory (absent on a fresh machine)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = Sshd(tmp_path)
    server.start()
    yield server
    server.stop()


def test_node_add_fetches_and_pins_host_key(redis_url: str, sshd: Sshd) -> None:
    out = ok("node", "add", "pve1", "--address", f"127.0.0.1:{sshd.port}", "--yes")
    assert out.strip() == f"node 'pve1' added; host key ssh-ed25519 {sshd.fingerprint}"
    node = Store.from_url(redis_url).get_node("pve1")
    assert node.host_key == sshd.pub and node.port == sshd.port
    # Re-adding the same node is a no-op; the key is fetched again and compared (already trusted).
    data = json.loads(ok("node", "add", "pve1", "--address", f"127.0.0.1:{sshd.port}", "--output-format", "json"))
    assert data["added"] is False and data["fingerprint"] == f"ssh-ed25519 {sshd.fingerprint}"
    # The node's key changes (reinstalled or impostor): refused, the pinned key stays.
    old = sshd.pub
    sshd.stop()
    sshd.start("other_key")
    err = refused("node", "add", "pve1", "--address", f"127.0.0.1:{sshd.port}", "--yes")
    assert "different pinned host key" in err and sshd.fingerprint in err
    assert Store.from_url(redis_url).get_node("pve1").host_key == old


def test_node_add_without_confirmation_is_refused(redis_url: str, sshd: Sshd) -> None:
    """No trust on first use in silence: without a terminal and without --yes, the fetched
    fingerprint is shown and nothing is pinned."""
    err = refused("node", "add", "pve1", "--address", f"127.0.0.1:{sshd.port}")
    assert err == (f"replq: node 'pve1': 127.0.0.1:{sshd.port} offers host key ssh-ed25519 {sshd.fingerprint}; "
                   "not pinned without confirmation (compare it on the node, then add --yes, or give --host-key)\n")
    assert Store.from_url(redis_url).list_nodes() == []


def node_add_on_a_terminal(port: int, answer: str) -> tuple[int, str]:
    """`node add` with a terminal on stdin (as an operator types it) answering `answer`."""
    import pty
    import sys

    from tests.support.helpers import REPO

    master, slave = pty.openpty()
    try:
        argv = [sys.executable, "-m", "replq", "node", "add", "pve1", "--address", f"127.0.0.1:{port}"]
        proc = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        os.write(master, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    return proc.returncode, (out + err).decode()


def test_node_add_asks_on_a_terminal(redis_url: str, sshd: Sshd) -> None:
    code, out = node_add_on_a_terminal(sshd.port, "n")
    assert code == 1 and f"offers the host key ssh-ed25519 {sshd.fingerprint}" in out, out
    assert "Pin this host key? [y/N]" in out and "host key not confirmed" in out
    assert Store.from_url(redis_url).list_nodes() == []
    code, out = node_add_on_a_terminal(sshd.port, "y")
    assert code == 0 and f"node 'pve1' added; host key ssh-ed25519 {sshd.fingerprint}" in out, out
    assert Store.from_url(redis_url).get_node("pve1").host_key == sshd.pub


def test_node_add_unreachable(redis_url: str) -> None:
    err = refused("node", "add", "pve1", "--address", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert "cannot fetch the host key of 127.0.0.1" in err
    assert Store.from_url(redis_url).list_nodes() == []


def test_node_add_explicit_key_list_remove(redis_url: str, tmp_path: Path) -> None:
    pub, fp = keygen(tmp_path / "k")
    assert fp in ok("node", "add", "pve2", "--address", "10.0.0.2", "--host-key", pub + " root@pve2")
    ok("node", "add", "pve3", "--address", "10.0.0.3:2222", "--user", "replq", "--host-key", pub)
    lines = ok("node", "list").splitlines()
    assert lines[0].split() == ["Name", "Address", "User", "HostKey"]
    assert lines[2].split() == ["pve3", "10.0.0.3:2222", "replq", "ssh-ed25519", fp]
    rows = json.loads(ok("node", "list", "--output-format", "json"))
    assert rows[0] == {"name": "pve2", "address": "10.0.0.2", "user": "root", "host_key": pub,
                       "fingerprint": f"ssh-ed25519 {fp}"}
    other, _ = keygen(tmp_path / "k2")
    assert "different pinned host key" in refused("node", "add", "pve2", "--address", "10.0.0.2", "--host-key", other)
    ok("node", "remove", "pve3")
    assert "no such cluster node 'pve3'" in refused("node", "remove", "pve3")


def inventory(redis_url: str, guests: tuple[int, ...] = ()) -> Store:
    """Nodes pve1..3 (and optionally local-zfs and guests on pve1), set up in-process for speed."""
    store = Store.from_url(redis_url)
    for n in (1, 2, 3):
        store.add_node(Node(f"pve{n}", f"10.0.0.{n}"))
    if guests:
        store.add_storage(Storage("local-zfs", "rpool/data"))
    for vmid in guests:
        store.add_guest(Guest(vmid, "pve1", "lxc", [Disk(f"local-zfs:subvol-{vmid}-disk-0")]))
    return store


def test_storage_and_guest_commands(redis_url: str) -> None:
    inventory(redis_url)
    ok("storage", "add", "local-zfs", "--pool", "rpool/data")
    ok("storage", "add", "tank", "--pool", "tank/vm", "--nodes", "pve2,pve1", "--disable")
    ok("storage", "add", "shared", "--type", "nfs")
    assert "already defined" in refused("storage", "add", "tank", "--pool", "x")
    assert "needs a pool" in refused("storage", "add", "zz")
    lines = ok("storage", "list").splitlines()
    assert [ln.split() for ln in lines] == [["ID", "Type", "Pool", "Nodes", "Enabled"],
                                             ["local-zfs", "zfspool", "rpool/data", "all", "yes"],
                                             ["shared", "nfs", "-", "all", "yes"],
                                             ["tank", "zfspool", "tank/vm", "pve1,pve2", "no"]]
    ok("guest", "add", "100", "--node", "pve1", "--disk", "local-zfs:subvol-100-disk-0",
       "--disk", "local-zfs:subvol-100-disk-1,replicate=0", "--disk", "shared:subvol-100-disk-2")
    ok("guest", "add", "200", "--node", "pve2", "--type", "qemu", "--disk", "/dev/sdb")
    assert "guest 100 already exists" in refused("guest", "add", "100", "--node", "pve2")
    assert "storage 'nope' does not exist" in refused("guest", "add", "300", "--node", "pve1", "--disk", "nope:x-1")
    lines = ok("guest", "list").splitlines()
    assert lines[0].split() == ["VMID", "Type", "Node", "Disks", "Status"] and lines[2].split()[:3] == ["200", "qemu",
                                                                                                      "pve2"]
    show = json.loads(ok("guest", "show", "100", "--output-format", "json"))
    assert show["replicatable"] == ["local-zfs:subvol-100-disk-0"] and show["jobs"] == []
    assert "unable to replicate local file/device" in json.loads(ok("guest", "show", "200", "--output-format",
                                                                    "json"))["replicatable"]
    assert "unable to replicate local file/device '/dev/sdb'" in refused("create-local-job", "200-0", "pve1")
    ok("guest", "add", "300", "--node", "pve1", "--disk", "shared:vm-300-disk-0")
    assert "No replicatable volumes found" in refused("create-local-job", "300-0", "pve2")
    ok("create-local-job", "100-0", "pve2")
    ok("create-local-job", "100-1", "pve3")
    assert refused("guest", "remove", "100").strip().endswith(
        "There is a replication job '100-0' for guest '100' - Please remove that first")
    assert "still holds guest(s) 100, 300" in refused("node", "remove", "pve1")
    assert "replication job '100-1' targets node 'pve3'" in refused("node", "remove", "pve3")
    assert "100-0, 100-1" in ok("guest", "remove", "100", "--purge")
    store = Store.from_url(redis_url)
    assert {j.remove_job for j in store.list_jobs(100)} == {"full"} and store.get_guest(100).purge
    assert "removing" in ok("guest", "list").splitlines()[1]
    ok("guest", "remove", "300")
    ok("storage", "remove", "tank")
    assert "does not exist" in refused("storage", "remove", "tank")


def test_settings(redis_url: str) -> None:
    s = json.loads(ok("settings", "show", "--output-format", "json"))
    assert s["retry_interval"] == 1800 and s["timezone"]
    ok("settings", "set", "retry_interval", "900")
    ok("settings", "set", "timezone", "Europe/Vienna")
    ok("settings", "set", "stall_timeout", "15")
    assert ok("settings", "show").splitlines()[1:] == ["liveness_window 60", "retry_interval  900",
                                                       "stall_timeout   15", "timezone        Europe/Vienna"]
    assert "stall_timeout: value must be between 5 and 86400 seconds" in refused("settings", "set", "stall_timeout",
                                                                                  "2")
    assert "unknown time zone" in refused("settings", "set", "timezone", "Europe/Atlantis")
    assert "unknown setting" in refused("settings", "set", "colour", "blue")
    assert "retry_interval" in refused("settings", "set", "retry_interval", "5")


# As pvesr writes it: sections in file order (not sorted), an unset schedule absent, a comment
# UTF-8 encoded and %-escaped (PVE::Tools::encode_text), a blank line after every section.
CFG = ("local: 101-0\n\ttarget pve2\n\trate 2.5\n\tschedule */00\n\n"
       "local: 100-0\n\tcomment DR%3A copy 100%25%0Anext line, B%C3%BCro\n\ttarget pve2\n\trate 10\n"
       "\tschedule */5\n\tsource pve1\n\n"
       "local: 100-1\n\tdisable\n\ttarget pve3\n\n")


def test_config_export_import_round_trip(redis_url: str, tmp_path: Path) -> None:
    inventory(redis_url, (100, 101))
    f = tmp_path / "replication.cfg"
    f.write_text(CFG)
    assert ok("config", "import", str(f)).strip() == "imported 3 job(s), 0 unchanged"
    assert ok("config", "export") == CFG
    assert Store.from_url(redis_url).get_job("100-0").comment == "DR: copy 100%\nnext line, Büro"
    assert Store.from_url(redis_url).get_job("100-1").schedule is None
    assert ok("config", "import", str(f)).strip() == "imported 0 job(s), 3 unchanged"
    # Export, wipe, import the export: identical again.
    exported = ok("config", "export")
    for jid in ("100-0", "100-1", "101-0"):
        Store.from_url(redis_url).delete_job(jid)
    f.write_text(exported)
    ok("config", "import", str(f))
    assert ok("config", "export") == CFG
    # A job created later is appended, as pvesr appends a new section.
    Store.from_url(redis_url).add_guest(Guest(102, "pve1", "lxc", [Disk("local-zfs:subvol-102-disk-0")]))
    ok("create-local-job", "102-0", "pve3")
    assert ok("config", "export") == CFG + "local: 102-0\n\ttarget pve3\n\n"


def test_config_import_warns_of_schedules_outside_the_job_limits(redis_url: str, tmp_path: Path) -> None:
    # pvesr accepts any calendar event; replq's job limits (SPEC §4) must not make a whole Proxmox
    # file fail: such a job is imported as it is, with a warning, and keeps its schedule.
    store = inventory(redis_url, (100, 101, 102))
    f = tmp_path / "replication.cfg"
    f.write_text("local: 100-0\n\ttarget pve2\n\tschedule sat *-1..7 15:00\n\n"
                 "local: 101-0\n\ttarget pve2\n\tschedule *:*:0/10\n\n"
                 "local: 102-0\n\ttarget pve2\n\n")
    r = run("config", "import", str(f))
    assert r.returncode == 0 and r.stdout.strip() == "imported 3 job(s), 0 unchanged", r.stderr
    warnings = r.stderr.splitlines()
    assert len(warnings) == 2 and all(w.startswith("replq: warning: job 10") for w in warnings), warnings
    assert "sat *-1..7 15:00" in warnings[0] and "7 days" in warnings[0] and "once a minute" in warnings[1]
    assert [j.schedule for j in store.list_jobs()] == ["sat *-1..7 15:00", "*:*:0/10", None]
    # create-local-job and update keep refusing them, naming the limit ...
    assert "7 days" in refused("update", "102-0", "--schedule", "sat *-1..7 15:00")
    assert "once a minute" in refused("update", "102-0", "--schedule", "*:*:0/10")
    # ... but an imported job's other properties can still be changed.
    ok("update", "100-0", "--rate", "5")
    assert store.get_job("100-0").schedule == "sat *-1..7 15:00" and store.get_job("100-0").rate == 5


@pytest.mark.parametrize("text,message", [
    ("local: 100-0\n\ttarget pve2\n\nlocal: 101-0\n\ttarget pve1\n", "Source and target must not be identical"),
    ("local: 100-0\n\ttarget pve2\n\nlocal: 100-1\n\ttarget pve2\n", "to target 'pve2' already exists"),
    ("local: 100-0\n\ttarget pve2\n\nlocal: 150-0\n\ttarget pve2\n", "guest '150' does not exist"),
    ("local: 100-0\n\ttarget pve2\n\nlocal: 101-0\n\ttarget pve9\n", "no such cluster node 'pve9'"),
    ("local: 100-0\n\ttarget pve2\n\nlocal: 101-0\n\ttarget pve2\n\tschedule */0\n", "line 4"),
])
def test_config_import_validates_everything_first(redis_url: str, tmp_path: Path, text: str, message: str) -> None:
    inventory(redis_url, (100, 101))
    raw = redis.Redis.from_url(redis_url)
    before = {k: raw.dump(k) for k in raw.keys("*")}
    f = tmp_path / "bad.cfg"
    f.write_text(text)
    assert message in refused("config", "import", str(f))
    assert {k: raw.dump(k) for k in raw.keys("*")} == before


def test_config_import_refuses_changed_existing_job(redis_url: str, tmp_path: Path) -> None:
    inventory(redis_url, (100,)).create_job(Job("100-0", "pve2", rate=5))
    f = tmp_path / "r.cfg"
    f.write_text("local: 100-0\n\ttarget pve2\n\trate 6\n")
    assert "different configuration" in refused("config", "import", str(f))
    assert "cannot read" in refused("config", "import", str(tmp_path / "missing.cfg"))
    f.write_bytes(b"local: 100-0\n\tcomment \xff\n\ttarget pve2\n")
    assert "not UTF-8" in refused("config", "import", str(f))
