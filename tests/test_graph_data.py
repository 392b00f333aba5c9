"""The graph's lookups (GraphIndex), the cache they live in, the one-way
imports of the ir package, and graphs far longer than Python's recursion
limit. Correctness only: how compile time grows is benchmarks/bench_compile.py."""

from __future__ import annotations

import ast
import copy
import pickle
import sys
from pathlib import Path

import msgspec
import pytest

import pipeline_ir as pipeline
from pipeline_ir.errors import GraphError
from pipeline_ir.ir import Call, Constant, Fused, Graph, Inline, Input, Placement, StepSpec
from pipeline_ir.ir.graph_data import GraphIndex
from pipeline_ir.ir.verify import verify

IR = Path(pipeline.__file__).parent / "ir"


def _spec(key: str) -> StepSpec:
    return StepSpec(key=key, name=key, path=f"m:{key}", kind="function")


def _fused_graph() -> Graph:
    """%0 input; %1 = a(%0); fused %4 {%2 = 1; %3 = b(%2, %1)}; %5 = a(%4)."""
    body = (Constant(id=2, value=Inline(value=1)), Call(id=3, step="b", args=(2, 1)))
    return Graph(
        name="g",
        nodes=(
            Input(id=0),
            Call(id=1, step="a", args=(0,)),
            Fused(id=4, placement=Placement(mode="local"), inputs=(1,), body=body, output=3),
            Call(id=5, step="a", args=(4,)),
        ),
        steps=(_spec("a"), _spec("b")),
        outputs=(5,),
    )


def test_index_finds_every_node_step_position_unit_and_call() -> None:
    g = _fused_graph()
    verify(g)
    index = g.index()
    assert [n.id for n in index.all_nodes] == [0, 1, 2, 3, 4, 5]  # a body before its group
    assert g.all_nodes() == index.all_nodes
    assert {i: index.nodes[i].id for i in range(6)} == {i: i for i in range(6)}
    assert g.node(3) == Call(id=3, step="b", args=(2, 1)) and isinstance(g.node(4), Fused)
    assert g.step("b") == _spec("b")
    assert dict(index.position) == {0: 0, 1: 1, 4: 2, 5: 3}  # top-level only
    assert dict(index.unit) == {0: 0, 1: 1, 2: 4, 3: 4, 4: 4, 5: 5}
    assert dict(index.calls) == {"a": (1, 5), "b": (3,)}


def test_missing_ids_and_keys_name_the_graph() -> None:
    g = _fused_graph()
    with pytest.raises(KeyError, match=r"graph 'g' has no node %9"):
        g.node(9)
    with pytest.raises(KeyError, match=r"graph 'g' has no step 'zz'"):
        g.step("zz")


def test_index_is_built_once_per_graph_and_stays_out_of_its_data() -> None:
    g = _fused_graph()
    assert g.index() is g.index()
    twin = Graph.from_json(g.to_json())
    assert twin == g and hash(twin) == hash(g) and twin.index() is not g.index()
    # Not in the JSON, in pickles or in copies: those carry the fields only.
    assert b"index" not in g.to_json()
    assert pickle.loads(pickle.dumps(g)) == g
    assert "_index" not in pickle.loads(pickle.dumps(g)).__dict__
    assert "_index" not in copy.copy(g).__dict__
    assert msgspec.structs.asdict(g).keys() == {"name", "nodes", "steps", "outputs", "multi_output"}


def test_a_rewritten_graph_gets_its_own_index() -> None:
    g = _fused_graph()
    g.index()
    shorter = msgspec.structs.replace(g, nodes=g.nodes[:2], steps=(_spec("a"),), outputs=(1,))
    verify(shorter)
    assert [n.id for n in shorter.all_nodes()] == [0, 1]
    with pytest.raises(KeyError):
        shorter.node(5)


def test_a_repeated_id_resolves_to_its_first_definition_and_verify_reports_it() -> None:
    g = Graph(
        name="g",
        nodes=(Input(id=0), Constant(id=1, value=Inline(value="first")), Constant(id=1, value=Inline(value="second"))),
        steps=(),
        outputs=(1,),
    )
    assert g.node(1) == Constant(id=1, value=Inline(value="first"))
    assert g.index().position[1] == 1
    with pytest.raises(GraphError, match="defined twice"):
        verify(g)


def test_index_of_an_empty_graph_is_empty() -> None:
    index = GraphIndex.of(Graph(name="g", nodes=(), steps=(), outputs=()))
    assert index.all_nodes == () and not index.nodes and not index.calls


# -- imports go one way inside ir/ --


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):  # also imports inside functions and `if TYPE_CHECKING:`
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("module", ["graph_data.py", "printer.py", "verify.py", "nodes.py", "types.py"])
def test_the_layers_under_graph_py_never_import_it(module: str) -> None:
    assert "pipeline_ir.ir.graph" not in _imported_modules(IR / module)


def test_graph_py_builds_on_printer_verify_and_graph_data() -> None:
    assert {"pipeline_ir.ir.graph_data", "pipeline_ir.ir.printer", "pipeline_ir.ir.verify"} <= _imported_modules(IR / "graph.py")


# -- graphs longer than the recursion limit --

LONG = 3000


def add_one(x: int) -> int:
    return x + 1


def _long_chain(distinct_steps: bool) -> pipeline.PipelineNode:
    same = pipeline.step(add_one)
    node: pipeline.PipelineNode = pipeline.INPUT
    for i in range(LONG):
        node = (pipeline.step(name=f"s{i}")(add_one) if distinct_steps else same)(node)
    return node


@pytest.mark.parametrize("distinct_steps", [False, True], ids=["one step", "a step each"])
@pytest.mark.parametrize("optimize", [True, False], ids=["optimized", "optimize=False"])
def test_a_chain_of_3000_local_steps_compiles_prints_and_runs(distinct_steps: bool, optimize: bool) -> None:
    assert LONG > sys.getrecursionlimit()
    compiled = pipeline.compile(_long_chain(distinct_steps), optimize=optimize)
    graph = compiled.graph
    if optimize:
        # One fused block of every call; the dump shows it with all its lines.
        assert [type(n).__name__ for n in graph.nodes] == ["Input", "Fused"]
        assert "fused local {" in graph.dump() and f"{LONG} nodes" in graph.dump()
    else:
        assert len(graph.nodes) == LONG + 1
    assert graph.dump().count(" = ") == LONG + (1 if optimize else 0)
    assert graph.to_dot().count("->") >= LONG
    assert Graph.from_json(graph.to_json()) == graph
    with compiled.deploy() as p:
        assert p.call(1) == LONG + 1
        assert p.call(-LONG) == 0


def test_a_fan_out_of_3000_local_steps_compiles_and_runs() -> None:
    src = pipeline.step(name="src")(add_one)(pipeline.INPUT)
    outs = tuple(pipeline.step(name=f"s{i}")(add_one)(src) for i in range(LONG))
    compiled = pipeline.compile(outs)
    assert len(compiled.graph.outputs) == LONG
    with compiled.deploy() as p:
        assert p.call(0) == (2,) * LONG


def test_a_step_that_fails_deep_in_a_long_chain_is_named() -> None:
    def fail_at(x: int) -> int:
        if x == LONG // 2:
            raise ValueError("half way")
        return x + 1

    node: pipeline.PipelineNode = pipeline.INPUT
    for i in range(LONG):
        node = pipeline.step(name=f"s{i}")(fail_at)(node)
    with pipeline.compile(node).deploy() as p:
        with pytest.raises(pipeline.StepError, match=rf"s{LONG // 2}\b") as info:
            p.call(0)
        assert isinstance(info.value.__cause__, ValueError)
