"""What a benchmark run measures: its scenarios, each with a load, servers, rounds and targets."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Callable

from kvtwist.bench.loadgen import Load

# Ratios are kvtwist's figure over Redis's, so "<=" suits costs and ">=" rates.
_OPERATORS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


# A target's baseline: the floor server on the kvtwist kind's own
# interpreter (kvtwist.bench.floor), measured in the same rounds.
FLOOR = "floor"


@dataclass(frozen=True)
class Target:
    """
    A goal on one ratio, e.g. ``Target("rps", ">=", 1.3)``: against the
    scenario's baseline, or against ``FLOOR``; for every kvtwist kind, or
    only for those in ``only``.
    """

    metric: str  # rps, cpu, p99, rssPerKey
    op: str
    threshold: float
    baseline: str = ""
    only: tuple[str, ...] = ()

    def appliesTo(self, server: str) -> bool:
        return not self.only or server in self.only

    def met(self, ratio: float) -> bool:
        return _OPERATORS[self.op](ratio, self.threshold)

    def describe(self, against: str = "Redis") -> str:
        return f"{self.metric} {self.op} {self.threshold:g}x {against}"


# What a scenario's ratios are taken against: each kvtwist kind's Redis
# counterpart (kvtwist.bench.servers.REDIS_COUNTERPART), or the same kind run from
# the baseline tree (kvtwist -> kvtwist-baseline).
AGAINST_REDIS = "redis"
AGAINST_TREE = "baseline tree"
AGAINST_PLAIN = "without --metrics"
AGAINST_MEMORY = "in memory"


@dataclass(frozen=True)
class Scenario:
    """
    One workload run against some servers for some rounds.

    A ``memory`` scenario starts fresh servers each round, fills the whole
    keyspace once and reports resident bytes per key; the others start their
    servers once, fill the keyspace, then alternate the servers round by round,
    or, with ``freshServers``, start them anew each round.
    """

    key: str
    title: str
    load: Load
    # Kinds from kvtwist.bench.servers; those not available in a run are skipped.
    servers: tuple[str, ...] = ("kvtwist", "redis", "kvtwist-pypy")
    rounds: int = 5
    memory: bool = False
    targets: tuple[Target, ...] = field(default=())
    against: str = AGAINST_REDIS
    # Reverse the servers' order every other round (A B, B A, ...), so that
    # neither always runs first: two trees of one server differ by little.
    alternate: bool = False
    # New server processes every round. A process's own luck (where its
    # memory landed, its hash seed) moves its CPU per request by a few
    # percent for its whole life; comparing two trees of one server, that is
    # as big as what is measured, so each round draws it anew.
    freshServers: bool = False


# Within a round the servers take turns of this many seconds in one kvbench
# run, until each has had the round's duration: a machine that slows down
# for a moment then slows every server alike, where one server measured
# after another would see its own stretch of time. The same kvtwist
# against itself spread over 0.13 to 0.38 from round to round one after
# the other, and over 0.02 to 0.05 in turns of 0.05 s (docs/performance.md).
TURN = 0.05

# The floors show how close to the target any kvtwist could get (kvtwist.bench.floor).
#
# A ratio is only as steady as the machine between its two measurements:
# on a shared VM a server's throughput drifts by tens of percent within
# a minute. So every kvtwist kind runs right beside what its targets
# compare it with (its floor on one side, Redis on the other), and these
# scenarios alternate, so that neither of a pair always runs first. They
# also start new processes every round (``freshServers``): one process's
# luck would otherwise bias all five rounds alike.
_ALWAYS = ("twisted-floor-always", "kvtwist-always", "redis-always", "kvtwist-pypy-always", "twisted-floor-pypy-always")


_WITH_FLOORS = ("twisted-floor", "kvtwist", "redis", "kvtwist-pypy", "twisted-floor-pypy")


# A median drop in throughput beyond 3% against the baseline tree is a regression.
REGRESSION = Target("rps", ">=", 0.97)
TREE_KEYS = ("tree-d1", "tree-d16", "tree-always")
# Each kvtwist kind beside the same kind run from the baseline tree.
_TREES = ("kvtwist-baseline", "kvtwist", "kvtwist-pypy-baseline", "kvtwist-pypy")
_ALWAYS_TREES = ("kvtwist-always-baseline", "kvtwist-always", "kvtwist-pypy-always-baseline", "kvtwist-pypy-always")


def treeScenarios(load: Load, rounds: int, deep: int = 16) -> list[Scenario]:
    """This tree's kvtwist against the baseline tree's: in memory without and with pipelining, and with --fsync always."""
    return [
        Scenario(key, f"{load.connections} conns, depth {depth}, this tree against the baseline",
                 replace(load, depth=depth), _TREES, rounds=rounds, targets=(REGRESSION,),
                 against=AGAINST_TREE, alternate=True, freshServers=True)
        for key, depth in zip(TREE_KEYS, (1, deep))
    ] + [
        Scenario("tree-always", f"{load.connections} conns, fsync always, this tree against the baseline",
                 load, _ALWAYS_TREES, rounds=rounds, targets=(REGRESSION,),
                 against=AGAINST_TREE, alternate=True, freshServers=True)
    ]


# Serving --metrics may cost at most 3% of throughput where requests are cheapest.
METRICS_COST = Target("rps", ">=", 0.97)


def metricsScenario(load: Load, rounds: int) -> Scenario:
    """kvtwist with ``--metrics`` against the same kvtwist without it, at depth 16."""
    return Scenario("metrics-d16", f"{load.connections} conns, depth 16, with --metrics against without",
                    replace(load, depth=16), ("kvtwist", "kvtwist-metrics"), rounds=rounds,
                    targets=(METRICS_COST,), against=AGAINST_PLAIN, alternate=True, freshServers=True)


# A node over Redis may spend at most 3x the CPU per request of one in
# memory, so that a few nodes serve what one in-memory node does. Over
# etcd the same figures are measured for the capacity plan
# (docs/scaling.md), with no target: every operation is an HTTP request to
# etcd's gateway, hundreds of times a request's work in memory.
ENGINE_CPU = Target("cpu", "<=", 3.0)
ENGINE_KEYS = ("engine-redis-d16", "engine-etcd-d16")


def engineScenarios(load: Load, rounds: int) -> list[Scenario]:
    """kvtwist nodes over a local Redis and a local etcd, beside kvtwist in memory and the engine itself."""
    deep = replace(load, depth=16)
    return [
        Scenario("engine-redis-d16", f"{load.connections} conns, depth 16, a node over one Redis",
                 deep, ("kvtwist", "kvtwist-redis", "redis"), rounds=rounds, targets=(ENGINE_CPU,),
                 against=AGAINST_MEMORY, alternate=True),
        Scenario("engine-etcd-d16", f"{load.connections} conns, depth 16, a node over one etcd member",
                 deep, ("kvtwist", "kvtwist-etcd"), rounds=rounds,
                 against=AGAINST_MEMORY, alternate=True),
    ]


def fullPlan(
    rounds: int = 5, duration: float = 5.0, warmup: float = 1.0, durable: bool = True, trees: bool = False,
    turn: float = TURN,
) -> list[Scenario]:
    """
    The plan behind docs/performance.md; ``durable`` adds the ``--fsync always``
    comparison, ``trees`` the comparison with a baseline tree (first, as it
    is the one a refactor waits for).
    """
    base = Load(connections=50, depth=1, keyspace=100_000, reads=80, duration=duration, warmup=warmup, turn=turn)
    short = replace(base, duration=max(duration * 0.6, 0.5))
    sweepRounds = max(1, min(rounds, 3))
    plan = treeScenarios(base, rounds) if trees else []
    plan += [
        Scenario("cal-d1", "C calibration server, 50 conns", base, ("cserver",), rounds=1),
        Scenario("cal-d16", "C calibration server, 50 conns, depth 16", replace(base, depth=16), ("cserver",), rounds=1),
        # Without pipelining Twisted's own path is the ceiling: kvtwist's work
        # must cost under 5% over the floor's on CPython; PyPy must match Redis.
        # (And the floor on Twisted's own reactor: what kvtwist's saves.)
        Scenario("c50", "50 conns, no pipelining", base, ("twisted-floor-stock-reactor", *_WITH_FLOORS), rounds=rounds,
                 targets=(Target("rps", ">=", 0.95, FLOOR, ("kvtwist",)), Target("rps", ">=", 1.0, only=("kvtwist-pypy",))),
                 alternate=True, freshServers=True),
        Scenario("c50-d16", "50 conns, depth 16", replace(base, depth=16), _WITH_FLOORS, rounds=rounds,
                 targets=(Target("rps", ">=", 1.3, only=("kvtwist",)), Target("cpu", "<=", 1.0, only=("kvtwist",))),
                 alternate=True, freshServers=True),
        Scenario("idle10k", "10,000 conns, 50 active", replace(base, idle=9950), _WITH_FLOORS, rounds=rounds,
                 targets=(Target("rps", ">=", 0.95, FLOOR, ("kvtwist",)), Target("p99", "<=", 1.05, FLOOR, ("kvtwist",)),
                          Target("rps", ">=", 1.0, only=("kvtwist-pypy",))),
                 alternate=True, freshServers=True),
    ]
    plan += [
        Scenario(f"sweep-c{n}", f"{n} conns", replace(short, connections=n), rounds=sweepRounds)
        for n in (1, 10, 100, 1000)
    ]
    plan.append(metricsScenario(base, rounds))
    plan += engineScenarios(base, rounds)
    plan.append(
        Scenario("mem1m", "1M keys stored", Load(connections=4, depth=64, keyspace=1_000_000, fill=True),
                 rounds=sweepRounds, memory=True, targets=(Target("rssPerKey", "<=", 1.0),))
    )
    if durable:
        plan.append(
            Scenario("always", "50 conns, fsync always", base, _ALWAYS, rounds=rounds,
                     targets=(Target("rps", ">=", 0.8, only=("kvtwist-always",)),
                              Target("rps", ">=", 1.0, only=("kvtwist-pypy-always",))),
                     alternate=True, freshServers=True)
        )
    return plan


def quickPlan(durable: bool = True, trees: bool = False) -> list[Scenario]:
    """
    A tiny version of every kind of scenario, to check the harness itself in seconds.

    It has no targets: a fraction of a second on two connections says
    nothing about them, and its verdicts would flip from run to run.
    """
    tiny = Load(connections=2, depth=1, keyspace=1000, duration=0.3, warmup=0.1, turn=0.1)
    plan = [replace(s, targets=()) for s in treeScenarios(tiny, rounds=2, deep=4)] if trees else []
    plan += [
        Scenario("cal-d1", "C calibration server", tiny, ("cserver",), rounds=1),
        Scenario("c50", "2 conns", tiny, rounds=2),
        Scenario("c50-d16", "2 conns, depth 4", replace(tiny, depth=4), rounds=1),
        Scenario("idle10k", "2 conns + 20 idle", replace(tiny, idle=20), rounds=1),
        Scenario("sweep-c1", "1 conn", replace(tiny, connections=1), rounds=1),
        Scenario("mem1m", "2000 keys stored", Load(connections=2, depth=8, keyspace=2000, fill=True),
                 rounds=1, memory=True),
    ]
    if durable:
        plan.append(Scenario("always", "2 conns, fsync always", tiny, _ALWAYS, rounds=1))
    return plan
