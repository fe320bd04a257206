"""Least loaded, in Python: the healthy backend with the lowest value of a
signal per unit of weight (by default `in-flight`, so least connections),
ties taking turns by the host's shared ticket. The signal is prefetched:
its values for ids 0 to 3 come with each decision (`hint`), so a pool of up
to four backends is decided without a `read`.

policy_config: {"signal": "in-flight"} (any signal name the host knows).
Built by examples/build.sh into a fulcrum:plugin@0.2.0 balancer.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import backends, shared

# Module state is the instance's: one per pool and worker thread.
SIGNAL = 0
HEALTHY = []  # (id, weight)
TOP_ID = -1


class Lifecycle(exports.Lifecycle):
    def init(self, config: str) -> None:
        global SIGNAL
        try:
            settings = json.loads(config or "{}")
        except ValueError as e:
            raise Err(f"bad config: {e}")
        unknown = sorted(set(settings) - {"signal"})
        if unknown:
            raise Err(f"bad config: unknown key {unknown[0]!r}, expected 'signal'")
        name = settings.get("signal", "in-flight")
        signal = backends.signal(name)
        if signal is None:
            raise Err(f"the host has no signal called {name!r}")
        SIGNAL = signal
        backends.prefetch(signal)


class Policy(exports.Policy):
    def set_backends(self, pushed) -> None:
        global HEALTHY, TOP_ID
        HEALTHY = [(b.id, max(b.weight, 1)) for b in pushed if b.healthy]
        TOP_ID = max((b.id for b in pushed), default=-1)

    def select(self, hint):
        return pick((), hint)

    def reselect(self, tried, hint):
        return pick(tried, hint)


def pick(tried, hint):
    candidates = [(id, weight) for id, weight in HEALTHY if id not in tried]
    if not candidates:
        return None
    loads = {}
    first = 0
    while first <= TOP_ID:
        batch = hint if first == 0 else backends.read(SIGNAL, first)
        for i, value in enumerate(batch.values):
            loads[first + i] = value
        first += 4
    lowest = min(loads.get(id, 0) / weight for id, weight in candidates)
    tied = [id for id, weight in candidates if loads.get(id, 0) / weight == lowest]
    return tied[shared.next_ticket(0) % len(tied)]
