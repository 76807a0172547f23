"""Which shard runs where: the driver's bookkeeping as a small state machine, with no Ray in it.

A shard is pending, then in flight on one actor, then committed. Events:

- `committed(actor)`: its shard is done; the actor is free again;
- `died(actor)`: its shard goes back to the front of the queue and a replacement is wanted, until
  the run has seen more than `max_restarts` deaths, which stops it;
- `failed(actor, error)`: the shard (or the actor's start) failed with an error, which stops the run.

After a stop no shard is handed out, but those in flight finish and commit, so the partial pool is
as complete as it can be. Actors are opaque hashable handles. A replacement joins as *starting* and
gets work only once `ready(actor)`, so a shard never waits on an actor the cluster cannot place
while the others could run it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable

from engine.errors import GenerationError

_STARTING = None  # the "shard" of an actor whose start is still being probed


class ShardSchedule:
    """Pending shards, actors in flight (their shard, or starting), committed shards, the first error.

    `fault_shard` (a test hook) marks the first assignment of that shard as one that must crash.
    """

    def __init__(self, todo: Iterable[int], max_restarts: int, fault_shard: int | None = None) -> None:
        self.pending: deque[int] = deque(todo)
        self.free: list[Hashable] = []
        self.busy: dict[Hashable, int | None] = {}
        self.committed_shards: list[int] = []
        self.restarts = 0
        self.max_restarts = max_restarts
        self.failure: Exception | None = None
        self._fault_shard = fault_shard

    # -- state -------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the driver must wait for more: shards left and no stop, or shards in flight."""
        return (bool(self.pending) and self.failure is None) or any(
            shard is not _STARTING for shard in self.busy.values()
        )

    def shard_of(self, actor: Hashable) -> int | None:
        """The shard `actor` runs (None: it is starting)."""
        return self.busy[actor]

    # -- events ------------------------------------------------------------------------------------
    def add_actor(self, actor: Hashable, *, ready: bool = True) -> None:
        """A new actor: free at once, or (a replacement) starting until `ready(actor)`."""
        if ready:
            self.free.append(actor)
        else:
            self.busy[actor] = _STARTING

    def assign(self) -> list[tuple[Hashable, int, bool]]:
        """Hand pending shards to free actors: (actor, shard, fault) each; nothing after a stop."""
        out = []
        while self.pending and self.free and self.failure is None:
            actor, shard = self.free.pop(), self.pending.popleft()
            fault = shard == self._fault_shard
            if fault:
                self._fault_shard = None  # only the first attempt crashes
            self.busy[actor] = shard
            out.append((actor, shard, fault))
        return out

    def ready(self, actor: Hashable) -> None:
        """A starting actor is up: it may take work."""
        if self.busy.pop(actor) is not _STARTING:
            raise ValueError(f"actor {actor!r} was running a shard, not starting")
        self.free.append(actor)

    def committed(self, actor: Hashable) -> int:
        """The actor's shard is committed; returns it."""
        shard = self.busy.pop(actor)
        if shard is _STARTING:
            raise ValueError(f"actor {actor!r} was starting, not running a shard")
        self.committed_shards.append(shard)
        self.free.append(actor)
        return shard

    def died(self, actor: Hashable) -> bool:
        """The actor's process is gone. Returns whether to start a replacement: not once the run
        has stopped (no more work to give), nor past `max_restarts` deaths (which stops it)."""
        shard = self.busy.pop(actor, _STARTING)
        self.restarts += 1
        if self.failure is not None:
            return False
        if self.restarts > self.max_restarts:
            where = "while starting" if shard is _STARTING else f"on shard {shard}"
            self.stop(
                GenerationError(
                    f"workers died {self.restarts} times (limit {self.max_restarts}); last {where}; "
                    "re-run the same command to resume"
                )
            )
            return False
        if shard is not _STARTING:
            self.pending.appendleft(shard)
        return True

    def failed(self, actor: Hashable, error: Exception) -> None:
        """The actor's shard or start failed with `error`: the run stops (the actor gets no more work)."""
        self.busy.pop(actor, None)
        self.stop(error)

    def stop(self, error: Exception) -> None:
        """Stop handing out shards; the first error is the one reported."""
        self.failure = self.failure or error
