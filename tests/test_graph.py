"""The DAG executor on dummy nodes: order, sharing, freeing, prefetch, caching."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

import pytest

from merge_engine.graph import Executor, schedule


@dataclass(frozen=True)
class Read:
    io: ClassVar[bool] = True
    key: str

    def deps(self):
        return ()

    def run(self, ctx):
        ctx["reads"].append(self.key)
        ctx["threads"].add(threading.current_thread().name)
        return len(self.key)


@dataclass(frozen=True)
class Add:
    io: ClassVar[bool] = False
    name: str
    inputs: tuple

    def deps(self):
        return self.inputs

    def run(self, ctx, *values):
        ctx["live"].append(None)
        return sum(values)


def _ctx():
    return {"reads": [], "threads": set(), "live": []}


def test_schedule_puts_dependencies_first_and_once():
    a, b = Read("a"), Read("bb")
    t1, t2 = Add("t1", (a, b)), Add("t2", (b,))
    order = schedule([t1, t2])
    assert order.index(a) < order.index(t1) and order.index(b) < order.index(t1)
    assert order.count(b) == 1 and order[-1] == t2


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_results_in_target_order_and_shared_reads_happen_once(prefetch):
    reads = [Read("x" * i) for i in range(1, 6)]
    targets = [Add(f"t{i}", (reads[i], reads[(i + 1) % 5])) for i in range(5)]
    ctx = _ctx()
    ex = Executor(targets, ctx, prefetch=prefetch)
    out = list(ex.run())
    assert [n for n, _ in out] == targets
    assert [v for _, v in out] == [(i + 1) + ((i + 1) % 5 + 1) for i in range(5)]
    assert sorted(ctx["reads"]) == sorted(r.key for r in reads)  # each read exactly once
    if prefetch:
        assert any(t.startswith("merge-io") for t in ctx["threads"])


def test_values_are_freed_after_last_use():
    # a long chain of independent targets: the working set must stay bounded
    targets = [Add(f"t{i}", (Read(f"r{i}"), Read(f"s{i}"))) for i in range(200)]
    ex = Executor(targets, _ctx(), prefetch=2)
    for _ in ex.run():
        pass
    assert ex.peak_live <= 3


def test_cached_values_are_not_recomputed():
    a = Read("aaa")
    t = Add("t", (a,))
    ctx = _ctx()
    seen = []
    ex = Executor([t], ctx, cached=lambda n: 100 if n == a else None,
                  on_computed=lambda n, v: seen.append(n))
    assert list(ex.run()) == [(t, 100)]
    assert ctx["reads"] == [] and seen == [t]


def test_error_in_a_node_propagates():
    @dataclass(frozen=True)
    class Boom:
        io: ClassVar[bool] = True

        def deps(self):
            return ()

        def run(self, ctx):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        list(Executor([Add("t", (Boom(),))], _ctx(), prefetch=2).run())
