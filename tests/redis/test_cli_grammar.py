"""pvesr's command-line grammar on the real job commands (PVE::CLIHandler, JSONSchema::get_options).

Scripts written for pvesr pass booleans with a value, repeat list options, use one dash or a
prefix of an option or command. Each case is checked by its effect on the stored job.
"""

from __future__ import annotations

import pytest

from replq.model import Job
from replq.store import Store
from tests.support.helpers import job_cluster, ok, refused, run


@pytest.fixture
def store(redis_url: str) -> Store:
    s = job_cluster(redis_url, ("pve1", "pve2", "pve3", "pve4"), {100: "pve1"})
    s.create_job(Job("100-0", "pve2", schedule="*/5", rate=10, comment="DR copy"))
    return s


def test_repeated_delete_unsets_every_property(store: Store) -> None:
    # pvesr: `--delete a --delete b` is `--delete a,b`. Keeping only the last one silently left
    # the rate limit in place while the operator believed it removed.
    ok("update", "100-0", "--delete", "rate", "--delete", "comment")
    job = store.get_job("100-0")
    assert (job.rate, job.comment, job.schedule) == (None, None, "*/5")


def test_delete_list_as_pvesr_splits_it(store: Store) -> None:
    # PVE::Tools::split_list: commas, semicolons and blanks separate; empty items are nothing.
    ok("update", "100-0", "--delete", "rate; comment,")
    job = store.get_job("100-0")
    assert (job.rate, job.comment) == (None, None)


@pytest.mark.parametrize(("args", "disabled"), [
    (["--disable"], True), (["--disable", "1"], True), (["--disable", "0"], False), (["--disable=yes"], True),
    (["--disable", "off"], False), (["-disable", "TRUE"], True), (["--dis"], True),
])
def test_update_disable_takes_an_optional_boolean(store: Store, args: list[str], disabled: bool) -> None:
    store.update_job("100-0", {"disable": not disabled})
    ok("update", "100-0", *args)
    assert store.get_job("100-0").disable is disabled


def test_create_flag_with_value_and_single_dash_options(store: Store) -> None:
    ok("create-local-job", "100-1", "pve3", "--disable", "0", "-schedule", "*/10", "-rate", "5")
    job = store.get_job("100-1")
    assert (job.disable, job.schedule, job.rate) == (False, "*/10", 5.0)
    ok("create-local-job", "100-2", "pve4", "--disable", "1")
    assert store.get_job("100-2").disable is True


def test_option_prefixes_and_case(store: Store) -> None:
    ok("update", "100-0", "--sched", "*/20", "--RATE", "3", "--com=hello")
    job = store.get_job("100-0")
    assert (job.schedule, job.rate, job.comment) == ("*/20", 3.0, "hello")


def test_ambiguous_option_prefix_is_refused_with_the_candidates(store: Store) -> None:
    err = refused("update", "100-0", "--d", "1", code=2)
    assert "--delete, --digest, --disable" in err
    assert store.get_job("100-0").disable is False


def test_command_prefixes(store: Store) -> None:
    assert ok("stat").splitlines()[0].startswith("JobID")
    assert ok("li") == ok("list")
    err = refused("s", code=2)
    assert "ambiguous command 's'" in err and "status" in err and "schedule-now" in err
    assert "No such command" in refused("stattus", code=2)


def test_delete_force_and_keep_take_values(store: Store) -> None:
    ok("delete", "100-0", "--force", "0", "--keep", "1")
    assert store.get_job("100-0").remove_job == "local"
    store.update_job("100-0", {}, ["remove_job"])
    ok("delete", "100-0", "--keep", "0")
    assert store.get_job("100-0").remove_job == "full"


def test_bad_boolean_and_repeated_scalar_are_usage_errors(store: Store) -> None:
    assert "unable to parse boolean option" in refused("update", "100-0", "--disable=maybe", code=2)
    assert "given more than once" in refused("update", "100-0", "--rate", "3", "--rate", "4", code=2)
    assert store.get_job("100-0").rate == 10


def test_values_starting_with_a_dash_and_negative_numbers(store: Store) -> None:
    ok("update", "100-0", "--comment", "-x --y")
    assert store.get_job("100-0").comment == "-x --y"
    r = run("settings", "set", "retry_interval", "-5")
    assert r.returncode == 1 and "retry_interval" in r.stderr  # a value, validated as a value
