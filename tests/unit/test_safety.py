"""The pure decisions of replq/safety.py (SPEC §10), exhaustively, without a cluster."""

from __future__ import annotations

import pytest

from replq.model import Snapshot
from replq.safety import is_own_copy

A, B = Snapshot("__replicate_100-0_1000__", 11, 1000), Snapshot("__replicate_100-1_1500__", 12, 1500)
NEW = Snapshot("__replicate_100-0_2000__", 13, 2000)
SENT = [A, B, NEW]


# ------------------------------------------------------------------------- is_own_copy (item 7)


@pytest.mark.parametrize(("target", "own"), [
    ([A, B, NEW], True),                       # the -R copy as sent
    ([NEW], True),                             # a subset of what was sent, the new snapshot included
    (None, False),                             # nothing there
    ([], False),                               # a dataset without snapshots: not what this run sent
    ([A, B], False),                           # the new snapshot did not arrive
    ([A, B, Snapshot(NEW.name, 99, 2000)], False),  # same name, another guid: another hand's
    ([A, B, NEW, Snapshot("manual", 5, 2100)], False),  # gained a snapshot of its own
    ([Snapshot("precious", 77, 5)], False),    # appeared by another hand
])
def test_a_target_dataset_is_destroyed_only_when_it_is_this_runs_copy(target: list[Snapshot] | None,
                                                                       own: bool) -> None:
    assert is_own_copy(target, SENT, NEW.name, NEW.guid) is own


def test_a_guid_that_was_not_sent_proves_nothing() -> None:
    assert not is_own_copy([A, B, NEW], SENT, NEW.name, 99)
    assert not is_own_copy([A, B, NEW], [A, B], NEW.name, NEW.guid)
