"""Which notices are due: each rule by name (pure)."""

from flushctl.notify.rules import Figures, Timing, due

T = Timing(interval=100.0, stale_after=1000.0, digest_every=500.0)


def held(n=3, oldest=0.0, refused=0, refused_last=None, quota=None):
    return Figures(n, n * 100, oldest, refused, refused_last, quota, None)


def test_nothing_held_nothing_due():
    assert due(held(0, None), {}, 5000.0, T) == []


def test_held_once_then_only_after_the_domain_was_empty_and_the_interval_passed():
    assert due(held(), {}, 10.0, T) == ["held"]
    assert due(held(), {"held": 10.0, "empty": 5.0}, 50.0, T) == []
    # empty again since, but within the interval: not yet
    assert due(held(), {"held": 10.0, "empty": 20.0}, 50.0, T) == []
    assert due(held(), {"held": 10.0, "empty": 20.0}, 111.0, T) == ["held"]


def test_digest_every_period_after_the_held_notice():
    assert due(held(), {"held": 10.0}, 400.0, T) == []
    assert due(held(), {"held": 10.0}, 511.0, T) == ["digest"]
    assert due(held(), {"held": 10.0, "digest": 511.0}, 900.0, T) == []


def test_quota_at_ninety_percent_once_per_interval():
    assert due(held(8, quota=10), {"held": 0.0}, 10.0, T) == []
    assert due(held(9, quota=10), {"held": 0.0}, 10.0, T) == ["quota"]
    assert due(held(9, quota=10), {"held": 0.0, "quota": 10.0}, 50.0, T) == []


def test_refused_for_new_refusals_at_most_once_per_interval():
    """A sender cannot make a storm of them: one bad recipient a minute,
    refused by the customer's server, is one notice per interval."""
    assert due(held(refused=2, refused_last=30.0), {"held": 0.0}, 40.0, T) == ["refused"]
    assert due(held(refused=2, refused_last=30.0), {"held": 0.0, "refused": 40.0}, 60.0, T) == []
    assert due(held(refused=3, refused_last=50.0), {"held": 0.0, "refused": 40.0}, 60.0,
               T) == []   # a new one, within the interval
    assert due(held(refused=3, refused_last=50.0), {"held": 0.0, "refused": 40.0}, 141.0,
               T) == ["refused"]


def test_times_recorded_while_the_clock_was_ahead_do_not_silence_everything():
    year = 365 * 86400.0
    sent = {"held": 1000.0 + year, "refused": 1000.0 + year, "quota": 1000.0 + year}
    assert due(held(9, 990.0, refused=1, refused_last=995.0, quota=10), sent, 1000.0, T) == \
        ["held", "quota", "refused"]   # once again, then recorded at the right time


def test_stale_once_per_episode():
    assert due(held(oldest=0.0), {"held": 0.0, "digest": 1000.0}, 1001.0, T) == ["stale"]
    sent = {"held": 0.0, "digest": 1400.0, "stale": 1001.0}
    assert due(held(oldest=500.0), sent, 1600.0, T) == []   # a newer oldest: same episode
    sent["empty"] = 1200.0   # emptied since: a new episode, with a new "held"
    assert due(held(oldest=500.0), sent, 1600.0, T) == ["held", "stale"]
