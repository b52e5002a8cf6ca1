"""pvesr's grammar applies to every replq command: the rewriting layer on the real command tree."""

from __future__ import annotations

import click
import pytest

from replq.cli import cli, config, jobs, run, sandbox
from replq.cli.grammar import Group, canonical_args
from replq.views import split_list

HELP = ["-h", "--help"]


def walk(group: click.Group, path: str = "replq"):  # noqa: ANN201 - a generator of (path, command)
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        yield f"{path} {name}", cmd
        if isinstance(cmd, click.Group):
            yield from walk(cmd, f"{path} {name}")


def test_every_group_has_the_grammar() -> None:
    assert isinstance(cli, Group)
    groups = [p for p, c in walk(cli) if isinstance(c, click.Group) and not isinstance(c, Group)]
    assert groups == [], "groups made without replq.cli.base.group miss pvesr's grammar"


def test_root_options_prefix_and_single_dash() -> None:
    assert canonical_args(cli, ["-red", "redis://x", "--no", "n1", "list", "--x"], HELP, leading_only=True) == [
        "--redis=redis://x", "--node=n1", "list", "--x"]


def test_pass_through_tail_is_left_alone() -> None:
    args = ["--dir", "/tmp/sb", "node1", "zfs", "list", "--sched", "-H"]
    assert canonical_args(sandbox.exec_, args, HELP) == ["--dir=/tmp/sb", "node1", "zfs", "list", "--sched", "-H"]
    assert canonical_args(sandbox.exec_, ["node1", "--", "-x"], HELP) == ["node1", "--", "-x"]


def test_ignore_unknown_options_commands_keep_their_words() -> None:
    assert canonical_args(config.settings_set, ["retry_interval", "-5"], HELP) == ["retry_interval", "-5"]
    assert canonical_args(config.settings_set, ["k", "-abc"], HELP) == ["k", "-abc"]


@pytest.mark.parametrize(("args", "expected"), [
    (["--verbose", "1", "--id", "100-0"], ["--verbose", "--id=100-0"]),
    (["--verbose", "0", "--id=100-0"], ["--id=100-0"]),
    (["-id", "100-0", "--no-w"], ["--id=100-0", "--no-wait"]),
    (["--dry", "--id", "100-0", "-h"], ["--dry-run", "--id=100-0", "-h"]),
])
def test_run_flags(args: list[str], expected: list[str]) -> None:
    assert canonical_args(run.run_cmd, args, HELP) == expected


def test_update_delete_list_and_optional_boolean() -> None:
    assert canonical_args(jobs.update, ["100-0", "--delete", "rate", "-del", "comment", "--disable"], HELP) == [
        "--delete=rate,comment", "--disable=1", "100-0"]
    assert canonical_args(jobs.update, ["100-0", "--disable", "No"], HELP) == ["--disable=0", "100-0"]


@pytest.mark.parametrize(("args", "message"), [
    (["100-0", "--d"], "option '--d' is ambiguous: --delete, --digest, --disable"),
    (["100-0", "--nosuch", "1"], "No such option '--nosuch'"),
    (["100-0", "--rate"], "option '--rate' requires an argument"),
    (["100-0", "--disable=2"], "unable to parse boolean option --disable '2'"),
    (["100-0", "--rate", "1", "-rate", "2"], "option '--rate' given more than once"),
])
def test_usage_errors(args: list[str], message: str) -> None:
    with pytest.raises(click.UsageError) as exc:
        canonical_args(jobs.update, args, HELP)
    assert message in exc.value.format_message()


def test_split_list_as_pve_tools() -> None:
    assert split_list("a,b;c  d,,") == ["a", "b", "c", "d"]
    assert split_list(" ") == [] and split_list(None) == []
