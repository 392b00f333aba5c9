"""Distinct steps never share a generated name, whatever they are called.

The code generator once named its globals by sanitizing step keys, so two
different steps could bind to one global and the later one silently won
(a factory-made ensemble returned 2002 instead of 1006). Every identifier
now comes from one Namespace (backends/namespace.py); these tests hold the
whole class of clashes on every backend. The property tests
(test_property_equivalence.py) draw such names too.
"""

from __future__ import annotations

import linecache
from typing import Any

import pytest

import pipeline_ir as pipeline
from pipeline_ir.backends.namespace import Namespace

BACKENDS = ["local", "tasks", "actors"]

# Names that clash after sanitizing, shadow builtins or keywords, look like
# the generator's own names, or are not ASCII (Python NFKC-normalizes
# identifiers: "ﬁ" and "fi" would be one variable).
CLASHING = ["a b", "a_b", "a-b", "len", "print", "class", "match", "v1", "v2", "f1", "k1", "c1", "_get", "_get_many",
            "_no_match", "fetched", "run", "arun", "group3", "ü", "ﬁ", "fi", "1x", "", "model#2", "model"]


def make(k: int, mode: str) -> Any:
    def model(x: int) -> int:
        return x * k

    return pipeline.step(model, execution_mode=mode)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param != "local":
        request.getfixturevalue("ray_session")
    return str(request.param)


def test_factory_steps_with_one_name_stay_apart(backend: str) -> None:
    # The example: three steps, two of them called "model".
    @pipeline.step(execution_mode=backend)
    def model_2(x: int) -> int:
        return x + 1000

    node = model_2(make(3, backend)(make(2, backend)(pipeline.INPUT)))
    for optimize in (False, True):
        with pipeline.compile(node, optimize=optimize).deploy() as p:
            assert p.call(1) == 1006


def test_steps_named_alike_each_run_their_own_function(backend: str) -> None:
    # Step i adds 10**i, so the sum tells exactly which steps ran.
    node: Any = pipeline.INPUT
    expected = 0
    for i, name in enumerate(CLASHING[:12]):
        def add(x: int, _d: int = 10**i) -> int:
            return x + _d

        node = pipeline.step(add, name=name or None, execution_mode=backend)(node)
        expected += 10**i
    with pipeline.compile(node, optimize=False).deploy() as p:
        assert p.call(0) == expected


def test_every_clashing_name_on_local_with_and_without_passes() -> None:
    node: Any = pipeline.INPUT
    expected = 0
    for i, name in enumerate(CLASHING):
        def add(x: int, _d: int = 3**i) -> int:
            return x + _d

        node = pipeline.step(add, name=name or None)(node)
        expected += 3**i
    for optimize in (False, True):
        with pipeline.compile(node, optimize=optimize).deploy() as p:
            assert p.call(0) == expected


def test_dump_tells_same_named_steps_apart() -> None:
    node = make(3, "local")(make(2, "local")(pipeline.INPUT))
    graph = pipeline.compile(node, optimize=False).graph
    text = graph.dump()
    assert "model(%0)" in text and "model#2(%1)" in text
    assert pipeline.Graph.from_json(graph.to_json()) == graph
    assert len({s.key for s in graph.steps}) == 2


def test_keyword_arguments_that_are_not_identifiers() -> None:
    @pipeline.step
    def collect(**kwargs: int) -> dict[str, int]:
        return dict(kwargs)

    @pipeline.step
    def inc(x: int) -> int:
        return x + 1

    node = collect(**{"a b": inc(pipeline.INPUT), "class": pipeline.INPUT, "ok": 2})
    with node.deploy() as p:
        assert p.call(1) == {"a b": 2, "class": 1, "ok": 2}


def test_namespace_allocates_unique_legal_names() -> None:
    ns = Namespace()
    ns.reserve("_get")
    names = [ns.name(("step", i), c) for i, c in enumerate(CLASHING + CLASHING)]
    assert len(set(names)) == len(names)
    for n in names:
        assert n.isidentifier() and n.isascii() and n not in ("len", "print", "class", "match", "_get")
    assert ns.name(("step", 0), "anything") == names[0]  # the same key, the same name
    with pytest.raises(ValueError, match="_get"):
        ns.reserve("_get")


def test_deploy_and_shutdown_do_not_grow_linecache() -> None:
    @pipeline.step
    def inc(x: int) -> int:
        return x + 1

    compiled = pipeline.compile(inc(inc(pipeline.INPUT)))
    import gc

    def ours() -> int:
        return sum(1 for k in linecache.cache if k.startswith("<pipeline_ir "))

    gc.collect()
    before = ours()
    for _ in range(50):
        with compiled.deploy() as p:
            assert p.call(1) == 3
    gc.collect()
    assert ours() - before <= 2
