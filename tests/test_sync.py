"""The sync schedule of DESIGN.md §4, pinned against hand-written version sequences."""

import jax.numpy as jnp
import numpy as np
import pytest

from rl_jax.sync import SyncSchedule


def versions(schedule, steps):
    return [schedule.version_for_step(k) for k in range(1, steps + 1)]


def test_on_policy():
    s = SyncSchedule(1, 0)
    assert versions(s, 5) == [0, 1, 2, 3, 4]
    assert [s.staleness(k) for k in range(1, 6)] == [0] * 5


def test_interval_20_cycles_staleness():
    s = SyncSchedule(20, 0)
    assert versions(s, 45) == [0] * 20 + [20] * 20 + [40] * 5
    assert [s.staleness(k) for k in range(1, 41)] == list(range(20)) * 2


def test_offset_10_holds_staleness_10():
    s = SyncSchedule(1, 10)
    assert versions(s, 14) == [0] * 11 + [1, 2, 3]
    assert [s.staleness(k) for k in range(1, 15)] == list(range(11)) + [10, 10, 10]


def test_offline_is_version_zero():
    s = SyncSchedule(10_000, 0)
    assert set(versions(s, 400)) == {0}
    assert not any(s.snapshot_due(k) for k in range(1, 401))


def test_snapshots_due_exactly_for_versions_an_unbounded_run_uses():
    for interval, offset, total in [(1, 0, 30), (20, 0, 100), (1, 10, 40), (4, 6, 50)]:
        s = SyncSchedule(interval, offset)
        used = set(versions(s, total + offset + interval)) - {0}
        due = {k for k in range(1, total + 1) if s.snapshot_due(k)}
        assert due == {v for v in used if v <= total}, (interval, offset)


def test_version_arithmetic_is_the_same_traced():
    for interval, offset in [(1, 0), (20, 0), (1, 10), (4, 6)]:
        s = SyncSchedule(interval, offset)
        traced = s.version_for_step(jnp.arange(1, 60, dtype=jnp.int32))
        np.testing.assert_array_equal(traced, versions(s, 59))
        np.testing.assert_array_equal(
            s.snapshot_due(jnp.arange(1, 60)), [s.snapshot_due(k) for k in range(1, 60)]
        )


@pytest.mark.parametrize("interval,offset", [(0, 0), (1, -1), (1.5, 0)])
def test_bad_schedule_names_field(interval, offset):
    with pytest.raises(ValueError, match="sync_"):
        SyncSchedule(interval, offset)
