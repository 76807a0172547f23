"""The driver's scheduling state machine (engine.schedule), without Ray: assignments, commits, deaths
and replacements, failures, and the exactly-once promise under random deaths."""

from __future__ import annotations

import random

import pytest

from engine.errors import GenerationError
from engine.schedule import ShardSchedule


def test_free_actors_take_pending_shards_in_order_and_commits_free_them() -> None:
    s = ShardSchedule([0, 1, 2, 3], max_restarts=2)
    s.add_actor("a")
    s.add_actor("b")
    first = s.assign()
    assert sorted(shard for _, shard, _ in first) == [0, 1] and {a for a, _, _ in first} == {"a", "b"}
    assert s.assign() == []  # nobody free
    actor = next(a for a, shard, _ in first if shard == 0)
    assert s.committed(actor) == 0
    assert s.assign() == [(actor, 2, False)]
    assert s.running


def test_a_dead_actor_requeues_its_shard_first_and_its_replacement_waits_until_ready() -> None:
    s = ShardSchedule([0, 1, 2], max_restarts=1)
    s.add_actor("a")
    s.add_actor("b")
    s.assign()
    dead = next(a for a in ("a", "b") if s.shard_of(a) == 1)
    assert s.died(dead) is True and list(s.pending) == [1, 2]
    s.add_actor("c", ready=False)
    assert s.shard_of("c") is None and s.assign() == []  # starting: no work yet
    s.ready("c")
    assert s.assign() == [("c", 1, False)]
    with pytest.raises(ValueError):
        s.ready("c")


def test_deaths_beyond_the_limit_stop_the_run_but_in_flight_shards_finish() -> None:
    s = ShardSchedule([0, 1, 2, 3], max_restarts=0)
    s.add_actor("a")
    s.add_actor("b")
    s.assign()
    dead, alive = sorted(("a", "b"), key=lambda a: s.shard_of(a))
    assert s.died(dead) is False
    assert isinstance(s.failure, GenerationError)
    assert (
        str(s.failure) == "workers died 1 times (limit 0); last on shard 0; re-run the same command to resume"
    )
    assert s.running  # the other shard is still in flight
    s.committed(alive)
    assert s.assign() == [] and not s.running and s.committed_shards == [1]


def test_a_failed_shard_stops_the_run_and_the_first_error_is_kept() -> None:
    s = ShardSchedule([0, 1, 2], max_restarts=5)
    s.add_actor("a")
    s.add_actor("b")
    s.assign()
    first, second = RuntimeError("disk full"), RuntimeError("later")
    s.failed("a", first)
    assert s.running and s.assign() == []
    s.failed("b", second)
    assert not s.running and s.failure is first
    s.add_actor("c")
    s.assign()
    assert s.died("c") is False  # a stopped run wants no replacement


def test_the_fault_hook_marks_only_the_first_attempt() -> None:
    s = ShardSchedule([0, 1], max_restarts=1, fault_shard=1)
    s.add_actor("a")
    assert s.assign() == [("a", 0, False)]
    s.committed("a")
    assert s.assign() == [("a", 1, True)]
    assert s.died("a")
    s.add_actor("b", ready=False)
    s.ready("b")
    assert s.assign() == [("b", 1, False)]


@pytest.mark.parametrize("seed", range(30))
def test_random_deaths_still_commit_every_shard_exactly_once(seed: int) -> None:
    """A simulated driver: actors die at random (replacements start, some die starting); with
    deaths under the limit every shard is committed once, else the run stops with the error."""
    rng = random.Random(seed)
    todo = list(range(rng.randint(1, 12)))
    limit = rng.randint(0, 6)
    s = ShardSchedule(todo, max_restarts=limit)
    names = iter(f"actor{i}" for i in range(1000))
    for _ in range(rng.randint(1, 4)):
        s.add_actor(next(names))
    while s.running:
        s.assign()
        actor = rng.choice(sorted(s.busy))
        if rng.random() < 0.3:
            if s.died(actor):
                s.add_actor(next(names), ready=False)
        elif s.shard_of(actor) is None:
            s.ready(actor)
        else:
            s.committed(actor)
    if s.failure is None:
        assert sorted(s.committed_shards) == todo and s.restarts <= limit
    else:
        assert s.restarts > limit and len(set(s.committed_shards)) == len(s.committed_shards)
        assert not set(s.committed_shards) & set(s.pending)
