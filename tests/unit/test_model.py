"""The model's validation rules and operator messages (SPEC §1–2)."""

from __future__ import annotations

import base64

import pytest

from replq.errors import ValidationError
from replq.model import (
    Disk,
    Guest,
    Job,
    JobState,
    Node,
    Storage,
    check_host_key,
    check_state_fields,
    format_rate,
    host_key_fingerprint,
    parse_job_id,
    replicatable_volumes,
    trusted,
)

ED_BLOB = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(range(32))
ED_KEY = "ssh-ed25519 " + base64.b64encode(ED_BLOB).decode()


@pytest.mark.parametrize("jid,expected", [("100-0", (100, 0)), ("999999999-999999999", (999999999, 999999999)),
                                          ("123-45", (123, 45))])
def test_job_id_valid(jid: str, expected: tuple[int, int]) -> None:
    assert parse_job_id(jid) == expected


@pytest.mark.parametrize("jid,message", [
    ("99-0", "guest IDs < 100 are reserved"),
    ("1-0", "guest IDs < 100 are reserved"),
    ("100-01", "leading zeros are not allowed"),
    ("0100-1", "leading zeros are not allowed"),
    ("100-", "invalid replication job id"),
    ("100", "invalid replication job id"),
    ("100-0 ", "invalid replication job id"),
    ("1000000000-0", "invalid replication job id"),
    ("100-1000000000", "invalid replication job id"),
    ("100-0;rm -rf /", "invalid replication job id"),
    ("１００-0", "invalid replication job id"),  # full-width digits
    ("", "invalid replication job id"),
])
def test_job_id_refused(jid: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse_job_id(jid)


def test_job_defaults_and_properties() -> None:
    job = Job("100-3", "pve2")
    assert (job.guest, job.jobnum, job.schedule, job.rate, job.disable, job.type) == (100, 3, None, None, False,
                                                                                       "local")
    # An unset schedule stays unset (pvesr keeps it out of the file); the default applies.
    assert job.effective_schedule == "*/15"
    assert job.config() == {"id": "100-3", "target": "pve2"}


@pytest.mark.parametrize("rate,ok", [("1", 1.0), ("10", 10.0), ("2.5", 2.5), (1, 1.0), ("1e3", 1000.0)])
def test_rate_accepted(rate: object, ok: float) -> None:
    assert Job("100-0", "pve2", rate=rate).rate == ok  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", ["0.5", "0", "-1", "nan", "inf", "10MB", "", "1,5", True, float("nan")])
def test_rate_refused(rate: object) -> None:
    with pytest.raises(ValidationError, match="rate"):
        Job("100-0", "pve2", rate=rate)  # type: ignore[arg-type]


def test_rate_minimum_message() -> None:
    with pytest.raises(ValidationError, match="minimum value of 1"):
        Job("100-0", "pve2", rate=0.9)


def test_format_rate() -> None:
    assert (format_rate(None), format_rate(10.0), format_rate(2.5)) == ("-", "10", "2.5")


def test_comment_length() -> None:
    assert Job("100-0", "pve2", comment="x" * 4096).comment == "x" * 4096
    with pytest.raises(ValidationError, match="4096"):
        Job("100-0", "pve2", comment="x" * 4097)


def test_comment_free_text_but_no_nul_or_surrogates() -> None:
    assert Job("100-0", "pve2", comment="a; rm -rf / `x` $(y) | é ✓").comment
    with pytest.raises(ValidationError, match="NUL"):
        Job("100-0", "pve2", comment="a\x00b")
    with pytest.raises(ValidationError, match="UTF-8"):
        Job("100-0", "pve2", comment="a\udcffb")


def test_schedule_rules() -> None:
    assert Job("100-0", "pve2", schedule="*/00").schedule == "*/00"
    assert Job("100-0", "pve2", schedule="mon..fri 8..17,22:0/15").schedule
    with pytest.raises(ValidationError, match="128"):
        Job("100-0", "pve2", schedule="0," * 64 + "1")
    with pytest.raises(ValidationError):
        Job("100-0", "pve2", schedule="*/0")
    with pytest.raises(ValidationError):
        Job("100-0", "pve2", schedule="")


@pytest.mark.parametrize("expr", ["2015-10-21", "sat *-1..7 15:00", "*-05", "*:*:0/10"])
def test_schedule_job_limits(expr: str) -> None:
    with pytest.raises(ValidationError):
        Job("100-0", "pve2", schedule=expr)


def test_remove_job_values() -> None:
    assert Job("100-0", "pve2", remove_job="local").remove_job == "local"
    assert Job("100-0", "pve2", remove_job="full").remove_job == "full"
    with pytest.raises(ValidationError, match="remove_job"):
        Job("100-0", "pve2", remove_job="all")


@pytest.mark.parametrize("name", ["pve1", "a", "node-1", "A" * 63, "x9"])
def test_node_names_ok(name: str) -> None:
    assert Node(name, "10.0.0.1").name == name


@pytest.mark.parametrize("name", ["-a", "a-", "a_b", "a.b", "A" * 64, "", "a b", "nöde", "a;b", "$(x)"])
def test_node_names_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="invalid node name"):
        Node(name, "10.0.0.1")


@pytest.mark.parametrize("addr,host,port", [("10.0.0.1", "10.0.0.1", 22), ("10.0.0.1:2222", "10.0.0.1", 2222),
                                            ("pve1.example.com", "pve1.example.com", 22), ("[::1]:22", "::1", 22),
                                            ("fe80::1", "fe80::1", 22)])
def test_address(addr: str, host: str, port: int) -> None:
    n = Node("pve1", addr)
    assert (n.host, n.port) == (host, port)


@pytest.mark.parametrize("addr", ["", "host:0", "host:65536", "host:x", "a b", "h;x", "-h", "[::1", "host:22:33x"])
def test_address_refused(addr: str) -> None:
    with pytest.raises(ValidationError, match="address"):
        Node("pve1", addr)


def test_host_key() -> None:
    assert check_host_key(ED_KEY + " root@pve1") == ED_KEY
    assert host_key_fingerprint(ED_KEY).startswith("ssh-ed25519 SHA256:")
    for bad in ["ssh-ed25519", "ssh-dss AAAA", "ssh-ed25519 !!!", "ssh-rsa " + ED_KEY.split()[1], "x"]:
        with pytest.raises(ValidationError, match="host key"):
            check_host_key(bad)


def test_storage_rules() -> None:
    s = Storage("local-zfs", "rpool/data", nodes=["b", "a"])
    assert s.nodes == ["a", "b"] and s.available_on("a") and not s.available_on("c")
    assert Storage("nfs1", None, "nfs").pool is None
    with pytest.raises(ValidationError, match="needs a pool"):
        Storage("zz", None)
    with pytest.raises(ValidationError, match="storage id"):
        Storage("1abc", "rpool")
    with pytest.raises(ValidationError, match="pool"):
        Storage("zz", "rpool/../x y")
    with pytest.raises(ValidationError, match="storage type"):
        Storage("zz", "rpool", "btrfs;")


def test_disks_and_guest() -> None:
    d = Disk.parse("local-zfs:subvol-100-disk-0,replicate=0")
    assert (d.storage, d.volname, d.replicate) == ("local-zfs", "subvol-100-disk-0", False)
    assert Disk.parse("/dev/sdb").is_path
    for bad in ["nocolon", "local-zfs:", "local-zfs:vm 1", "local-zfs:a,replicate=2", "x:y,foo=1", "/dev/../etc"]:
        with pytest.raises(ValidationError):
            Disk.parse(bad)
    g = Guest(100, "pve1", "qemu", [Disk("local-zfs:vm-100-disk-0")])
    assert g.vmid == 100
    for vmid in (99, 1_000_000_000, "0100", "abc", True):
        with pytest.raises(ValidationError):
            Guest(vmid, "pve1")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="reserved"):
        Guest(99, "pve1")
    with pytest.raises(ValidationError, match="guest type"):
        Guest(100, "pve1", "docker")
    with pytest.raises(ValidationError, match="twice"):
        Guest(100, "pve1", "lxc", [Disk("st:b"), Disk("st:b")])


def test_replicatable_volumes() -> None:
    storages = {"local-zfs": Storage("local-zfs", "rpool/data"), "nfs": Storage("nfs", None, "nfs")}
    g = Guest(100, "pve1", "qemu", [Disk("local-zfs:vm-100-disk-0"), Disk("local-zfs:vm-100-disk-1", False),
                                   Disk("nfs:vm-100-disk-2"), Disk("gone:vm-100-disk-3"), Disk("/dev/sdb", False)])
    assert [d.volid for d in replicatable_volumes(g, storages)] == ["local-zfs:vm-100-disk-0"]
    g.disks.append(Disk("/dev/sdc"))
    with pytest.raises(ValidationError, match="unable to replicate local file/device '/dev/sdc'"):
        replicatable_volumes(g, storages)


def test_state_fields() -> None:
    assert check_state_fields({"last_sync": 5, "fail_count": 2, "storeid_list": ["local-zfs"]}) == {
        "last_sync": 5, "fail_count": 2, "storeid_list": ["local-zfs"]}
    for bad in [{"last_sync": -1}, {"fail_count": 1.5}, {"fail_count": True}, {"nope": 1}, {"storeid_list": "x"},
                {"last_node": "a b"}, {"duration": float("inf")}]:
        with pytest.raises(ValidationError):
            check_state_fields(bad)


def test_trusted_skips_validation_and_fills_defaults() -> None:
    st = trusted(JobState, last_sync=5)
    assert (st.last_sync, st.fail_count, st.storeid_list) == (5, 0, [])
    assert trusted(Node, name="n", address="h:2").port == 2
