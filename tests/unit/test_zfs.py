"""zfs.py without ZFS: argv building, validation, quoting, parsing, error mapping, features."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence

import pytest

from replq import ssh, zfs
from replq.errors import ValidationError
from replq.model import Snapshot

DS = "rpool/data/subvol-100-disk-0"
SNAP = "__replicate_100-0_1700000000__"


# ------------------------------------------------------------------------- names / argv


@pytest.mark.parametrize(
    "name",
    [
        "-rf",
        "rpool/-x",
        "rpool/data; rm -rf /",
        "rpool/da ta",
        "rpool//data",
        "/rpool",
        "rpool/",
        "rpool@snap",
        "$(id)",
        "",
        "a" * 300,
        "rpool/data\nx",
    ],
)
def test_bad_dataset_names_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        zfs.validate_dataset(name)


@pytest.mark.parametrize("name", ["x@y", "-R", "a b", "a/b", "", "s;id", "a'b"])
def test_bad_snapshot_names_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        zfs.validate_snapname(name)


def test_good_names() -> None:
    assert zfs.validate_dataset(DS) == DS
    assert zfs.validate_dataset("tank/vm:1/base-100-disk-0.x_y") == "tank/vm:1/base-100-disk-0.x_y"
    assert zfs.snapshot_ref(DS, SNAP) == f"{DS}@{SNAP}"


def test_send_recv_argv() -> None:
    assert zfs.send_argv(DS, SNAP) == ["zfs", "send", "-Rp", f"{DS}@{SNAP}"]
    assert zfs.send_argv(DS, SNAP, "__replicate_100-0_1__") == [
        "zfs", "send", "-Rp", "-I", f"{DS}@__replicate_100-0_1__", f"{DS}@{SNAP}",
    ]  # fmt: skip
    assert zfs.recv_argv(DS) == ["zfs", "recv", "-F", "--", DS]
    # A full stream never overwrites: without -F, a dataset of that name makes it fail.
    assert zfs.recv_argv(DS, incremental=False) == ["zfs", "recv", "--", DS]
    with pytest.raises(ValidationError):
        zfs.send_argv(DS, "x y")
    with pytest.raises(ValidationError):
        zfs.recv_argv("-o origin=x")


def test_other_argv() -> None:
    assert zfs.snapshot_argv(DS, SNAP) == ["zfs", "snapshot", "--", f"{DS}@{SNAP}"]
    assert zfs.destroy_snapshot_argv(DS, SNAP) == ["zfs", "destroy", "--", f"{DS}@{SNAP}"]
    assert zfs.destroy_dataset_argv(DS) == ["zfs", "destroy", "-r", "--", DS]
    assert zfs.rollback_argv(DS, SNAP) == ["zfs", "rollback", "-r", "--", f"{DS}@{SNAP}"]
    assert zfs.list_argv(["rpool/data", "tank"])[-3:] == ["--", "rpool/data", "tank"]
    assert zfs.get_argv(["used"], [DS, f"{DS}@{SNAP}"])[-2:] == [DS, f"{DS}@{SNAP}"]
    with pytest.raises(ValidationError):
        zfs.get_argv(["used,guid"], [DS])


def test_never_destroys_a_pool_root() -> None:
    with pytest.raises(ValidationError):
        zfs.destroy_dataset_argv("rpool")


def test_remote_command_quotes_every_word() -> None:
    argv = ["zfs", "recv", "-F", "--", DS]
    assert ssh.remote_command(argv) == "zfs recv -F -- rpool/data/subvol-100-disk-0"
    tricky = ["echo", "a b", "$(id)", "x'y"]
    assert shlex.split(ssh.remote_command(tricky)) == tricky


# ------------------------------------------------------------------------- parsing

LISTING = f"""\
rpool/data\ttype\tfilesystem
rpool/data\tguid\t12230040678443781110
rpool/data\tcreation\t1795625897
{DS}\ttype\tfilesystem
{DS}\tguid\t11700877083256246297
{DS}\tcreation\t1795625897
{DS}@__replicate_100-0_1700000100__\ttype\tsnapshot
{DS}@__replicate_100-0_1700000100__\tguid\t6708677473515053051
{DS}@__replicate_100-0_1700000100__\tcreation\t1795625950
{DS}@__replicate_100-0_1700000000__\ttype\tsnapshot
{DS}@__replicate_100-0_1700000000__\tguid\t2357616663081115608
{DS}@__replicate_100-0_1700000000__\tcreation\t1795625900
"""


def test_parse_listing() -> None:
    listing = zfs.parse_listing(LISTING)
    assert listing["rpool/data"] == []
    assert listing[DS] == [
        Snapshot("__replicate_100-0_1700000000__", 2357616663081115608, 1795625900),
        Snapshot("__replicate_100-0_1700000100__", 6708677473515053051, 1795625950),
    ]


def test_parse_listing_rejects_humanised_numbers() -> None:
    with pytest.raises(zfs.ServiceError):
        zfs.parse_listing(f"{DS}@s\ttype\tsnapshot\n{DS}@s\tguid\t2.04E\n{DS}@s\tcreation\t1\n")


def test_parse_snapshot_list() -> None:
    text = f"{DS}@a\t123\t1000\n{DS}@b\t456\t900\nrpool/x@c\t7\t5\n"
    listing = zfs.parse_snapshot_list(text)
    assert [s.name for s in listing[DS]] == ["b", "a"]
    assert listing["rpool/x"] == [Snapshot("c", 7, 5)]
    with pytest.raises(zfs.ServiceError):
        zfs.parse_snapshot_list("garbage\n")


def test_parse_estimate() -> None:
    assert zfs.parse_estimate("full\tx@y\t123\nsize\t4567\n") == 4567
    assert zfs.parse_estimate("nothing") is None


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("stderr", "cls"),
    [
        ("cannot receive new filesystem stream: out of space", zfs.NoSpace),
        ("cannot receive incremental stream: No space left on device", zfs.NoSpace),
        ("cannot destroy 'rpool/data/x': dataset is busy", zfs.DatasetBusy),
        ("cannot open 'rpool/data/x': dataset does not exist", zfs.DatasetNotFound),
        ("cannot create snapshot 'a@b': dataset already exists", zfs.DatasetExists),
        ("cannot receive incremental stream: destination rpool/data/x has been modified\nsince most recent snapshot",
         zfs.TargetModified),
        ("cannot receive: invalid backup stream", zfs.StreamBroken),
        ("cannot receive new filesystem stream: checksum mismatch or incomplete stream", zfs.StreamBroken),
        ("connect: Connection refused\nPlease make sure that the zfs-fuse daemon is running.",
         zfs.ZfsUnavailable),
        ("invalid option 'n'\nusage:\n\tsend [-RDp]", zfs.Unsupported),
        ("something strange", zfs.ZfsError),
    ],
)  # fmt: skip
def test_error_mapping(stderr: str, cls: type) -> None:
    err = zfs.map_error(stderr, "receiving", "node2", side="target")
    assert type(err) is cls
    assert "node2" in str(err)
    assert "\n" not in str(err)


def test_no_space_message_names_the_target_storage() -> None:
    err = zfs.map_error("cannot receive new filesystem stream: out of space", "receiving x", "node2", side="target")
    assert str(err).startswith("no free space left on the replication target storage on node 'node2'")


# ------------------------------------------------------------------------- Zfs with a fake runner


class FakeRunner:
    node = "nodeX"

    def __init__(self, responses: dict[str, tuple[int, str, str]]) -> None:
        self.responses = responses
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        self.calls.append(list(argv))
        key = " ".join(argv)
        for prefix, (rc, out, err) in self.responses.items():
            if key.startswith(prefix):
                return subprocess.CompletedProcess(list(argv), rc, out, err)
        return subprocess.CompletedProcess(list(argv), 0, "", "")


ZFS_FUSE = {
    "zfs send -nvP": (2, "", "invalid option 'n'\nusage:\n\tsend [-RDp] [-[iI] snapshot] <snapshot>\n"),
    "zfs get -H -o value receive_resume_token": (2, "", "bad property list: invalid property 'receive_resume_token'"),
    "zfs get -H -o value written": (2, "", "bad property list: invalid property 'written'"),
}


def test_features_on_zfs_fuse() -> None:
    z = zfs.Zfs(FakeRunner(dict(ZFS_FUSE)))
    f = z.features()
    assert not f.send_estimate and not f.resume_tokens and not f.written
    z.features()
    assert len(z.runner.calls) == 3  # detected once


def test_features_on_openzfs() -> None:
    r = FakeRunner({"zfs send -nvP": (2, "", "missing snapshot argument\nusage:\n"),
                    "zfs get -H -o value receive_resume_token": (1, "", "cannot open '-nonexistent'"),
                    "zfs get -H -o value written": (1, "", "cannot open '-nonexistent'")})  # fmt: skip
    f = zfs.Zfs(r).features()
    assert f.send_estimate and f.resume_tokens and f.written


# ------------------------------------------------------------------------- markers and the change measure


def test_set_props_is_one_zfs_command_per_property_each_word_quoted() -> None:
    argv = zfs.set_props_argv(DS, {"readonly": "on", "replq:job": "100-0"}, clear=["replq:since"])
    assert argv[:2] == ["sh", "-c"]
    assert argv[2] == (f"zfs set readonly=on {DS} && zfs set replq:job=100-0 {DS} && zfs inherit replq:since {DS}")
    for bad in ({"replq:job": "100-0; rm -rf /"}, {"replq:job": "a b"}, {"Bad:Prop": "1"}, {"replq:job": ""}):
        with pytest.raises(ValidationError):
            zfs.set_props_argv(DS, bad)


def test_local_props_keep_only_what_is_set_on_the_node() -> None:
    out = "\n".join([f"{DS}\treplq:role\treplica\tlocal", f"{DS}\treplq:guest\t100\treceived",
                      f"{DS}\treplq:job\t-\t-"]) + "\n"
    r = FakeRunner({"zfs get -Hp -o name,property,value,source": (0, out, "")})
    assert zfs.Zfs(r).local_props(["replq:role", "replq:guest", "replq:job"], [DS]) == {DS: {"replq:role": "replica"}}


def test_changed_since_without_written_counts_an_incremental_stream() -> None:
    """zfs-fuse: snapshot the present state, count `send -i base check`, destroy the snapshot."""
    r = FakeRunner({**ZFS_FUSE, "sh -c zfs send -i": (0, "  139304\n", "")})
    z = zfs.Zfs(r)
    assert z.changed_since(DS, [SNAP], "__replq_check_9__") == 139304 - zfs.EMPTY_INCREMENTAL
    verbs = [c[1] if c[0] == "zfs" else c[2].split()[1] for c in r.calls[3:]]
    assert verbs == ["snapshot", "send", "destroy"]
    r = FakeRunner({**ZFS_FUSE, "sh -c zfs send -i": (0, "624\n", "")})
    assert zfs.Zfs(r).changed_since(DS, [SNAP], "__replq_check_9__") == 0  # BEGIN and END only: unchanged
    # With a later snapshot the source lacks: each step of the chain is counted.
    r = FakeRunner({**ZFS_FUSE, "sh -c zfs send -i": (0, "1624\n", "")})
    assert zfs.Zfs(r).changed_since(DS, [SNAP, "later"], "__replq_check_9__") == 2000
    sends = [c[2] for c in r.calls if c[0] == "sh"]
    assert [s.split()[3:5] for s in sends] == [[f"{DS}@{SNAP}", f"{DS}@later"],
                                               [f"{DS}@later", f"{DS}@__replq_check_9__"]]


def test_changed_since_with_written_asks_zfs() -> None:
    r = FakeRunner({"zfs send -nvP": (2, "", "missing snapshot argument"),
                    "zfs get -Hp -o name,property,value written@": (0, f"{DS}\twritten@later\t4096\n", ""),
                    "zfs get -Hp -o name,property,value written --": (0, f"{DS}@later\twritten\t100\n", "")})
    assert zfs.Zfs(r).changed_since(DS, [SNAP, "later"], "__replq_check_9__") == 4196
    assert not any("snapshot" in c for c in r.calls)


def test_list_ignores_missing_roots_but_not_other_errors() -> None:
    r = FakeRunner({"zfs get -Hp -r": (1, LISTING, "cannot open 'tank/x': dataset does not exist\n")})
    listing = zfs.Zfs(r).list(["rpool/data", "tank/x"])
    assert DS in listing and "tank/x" not in listing
    r = FakeRunner({"zfs get -Hp -r": (1, "", "connect: Connection refused\n")})
    with pytest.raises(zfs.ZfsUnavailable):
        zfs.Zfs(r).list(["rpool/data"])


def test_destroy_snapshot_missing_ok() -> None:
    r = FakeRunner({"zfs destroy": (1, "", "cannot open 'x@y': dataset does not exist")})
    zfs.Zfs(r).destroy_snapshot(DS, SNAP)
    with pytest.raises(zfs.DatasetNotFound):
        zfs.Zfs(r).destroy_snapshot(DS, SNAP, missing_ok=False)


def test_estimate_without_send_n_uses_space_accounting() -> None:
    base = "__replicate_100-0_1__"
    props = (
        f"{DS}@{SNAP}\tused\t0\n{DS}@{SNAP}\treferenced\t9000\n"
        f"{DS}@{base}\tused\t500\n{DS}@{base}\treferenced\t6000\n"
    )
    r = FakeRunner({**ZFS_FUSE, "zfs get -Hp -o name,property,value used,referenced": (0, props, "")})
    assert zfs.Zfs(r).estimate_send_size(DS, SNAP, base) == 9000 - 6000 + 500
    r = FakeRunner({**ZFS_FUSE,
                    "zfs get -Hp -o name,property,value used --": (0, f"{DS}\tused\t77\n", "")})  # fmt: skip
    assert zfs.Zfs(r).estimate_send_size(DS, None, None) == 77


def test_estimate_with_send_n() -> None:
    r = FakeRunner({"zfs send -nvP -Rp": (0, "full\tx\t10\nsize\t12345\n", ""),
                    "zfs send -nvP": (2, "", "missing snapshot argument"),
                    "zfs get -H": (1, "", "cannot open")})  # fmt: skip
    assert zfs.Zfs(r).estimate_send_size(DS, SNAP, None) == 12345


def test_failed_command_raises_typed_error_with_node() -> None:
    r = FakeRunner({"zfs snapshot": (1, "", "cannot create snapshot 'x': out of space")})
    with pytest.raises(zfs.NoSpace, match="source storage on node 'nodeX'"):
        zfs.Zfs(r).snapshot(DS, SNAP)


def test_local_runner_missing_binary() -> None:
    with pytest.raises(zfs.ZfsUnavailable):
        zfs.LocalRunner(node="n").run(["/nonexistent/zfs", "list"])
