"""The IR as data: JSON round trip (property-tested over generated graphs),
strict decoding, invariants, types, and the dump and Graphviz forms."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline_ir as pipeline
from pipeline_ir.errors import GraphError
from pipeline_ir.ir import Batching, Call, Case, Constant, External, Fused, Graph, Inline, Input, Param, Placement, Project, StepSpec, Switch
from pipeline_ir.ir.types import ANY, TypeRef, can_match, from_annotation, render
from pipeline_ir.ir.verify import verify

# -- generated graphs --

names = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
json_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6)
type_refs = st.recursive(
    st.sampled_from(["builtins.int", "builtins.str", "torch.Tensor", "typing.Any"]).map(lambda n: TypeRef(name=n)),
    lambda inner: st.builds(lambda n, a: TypeRef(name=n, args=tuple(a), bases=("x.Base",)), st.sampled_from(["builtins.list", "typing.Union"]), st.lists(inner, max_size=2)),
    max_leaves=4,
)
values = json_values.map(lambda v: Inline(value=v)) | st.builds(External, key=names, repr=st.text(max_size=8))


@st.composite
def graphs(draw: st.DrawFn) -> Graph:
    """Structurally valid graphs exercising every op kind and field."""
    n_steps = draw(st.integers(1, 3))
    steps = []
    for i in range(n_steps):
        mode = draw(st.sampled_from(["local", "tasks", "actors"]))
        steps.append(
            StepSpec(
                key=f"s{i}",
                name=draw(names),
                path=f"mod:{draw(names)}",
                kind=draw(st.sampled_from(["function", "class"])),
                placement=Placement(
                    mode=mode,
                    num_replicas=draw(st.integers(1, 3)) if mode == "actors" else 1,
                    num_cpus=draw(st.none() | st.floats(0, 8)),
                    num_gpus=draw(st.none() | st.floats(0, 2)),
                    colocate=draw(st.none() | names),
                    batching=draw(st.none() | st.builds(Batching, max_batch_size=st.integers(1, 64), batch_wait_timeout_s=st.floats(0, 1)))
                    if mode == "actors"
                    else None,
                    idempotent=draw(st.booleans()) if mode != "local" else False,
                ),
                fuse=draw(st.booleans()),
                init_args=tuple(draw(st.lists(values, max_size=2))),
                init_kwargs=tuple((k, v) for k, v in draw(st.dictionaries(names, values, max_size=2)).items()),
                params=(Param(name="x", kind="positional", type=draw(type_refs)),),
                returns=draw(type_refs),
            )
        )
    nodes: list[Any] = [Input(id=0)]
    used: set[str] = set()
    for i in range(1, draw(st.integers(1, 8)) + 1):
        earlier = [n.id for n in nodes]
        kind = draw(st.sampled_from(["constant", "call", "project", "switch", "fused"]))
        pick = st.sampled_from(earlier)
        t = draw(type_refs)
        if kind == "constant":
            nodes.append(Constant(id=i, type=t, value=draw(values)))
        elif kind == "call":
            s = draw(st.sampled_from(steps))
            used.add(s.key)
            nodes.append(Call(id=i, type=t, step=s.key, args=tuple(draw(st.lists(pick, max_size=3))), kwargs=(("k", draw(pick)),)))
        elif kind == "project":
            nodes.append(Project(id=i, type=t, source=draw(pick), key=draw(st.integers(-2, 2) | st.text(max_size=3))))
        elif kind == "switch":
            cases = tuple(Case(value=v, branch=draw(pick)) for v in draw(st.lists(st.none() | st.booleans() | st.integers() | st.text(max_size=3), min_size=1, max_size=3)))
            nodes.append(Switch(id=i, type=t, key=draw(pick), cases=cases, default=draw(st.none() | pick)))
        else:
            s = draw(st.sampled_from(steps))
            used.add(s.key)
            inner_id = 1000 + i
            body = (Constant(id=inner_id, value=Inline(value=1)), Call(id=inner_id + 500, step=s.key, args=(inner_id, earlier[-1])))
            unbatched = msgspec.structs.replace(s.placement, batching=None)
            index = next(j for j, spec in enumerate(steps) if spec.key == s.key)
            s = steps[index] = msgspec.structs.replace(s, placement=unbatched)  # a batched step is never fused
            nodes.append(Fused(id=i, type=t, placement=unbatched, inputs=(earlier[-1],), body=body, output=inner_id + 500))
    steps = [s for s in steps if s.key in used]
    if not steps:
        return Graph(name=draw(names), nodes=tuple(nodes), steps=(), outputs=(nodes[-1].id,))
    outs = tuple(draw(st.lists(st.sampled_from([n.id for n in nodes]), min_size=1, max_size=3)))
    return Graph(name=draw(names), nodes=tuple(nodes), steps=tuple(steps), outputs=outs, multi_output=len(outs) > 1 or draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(graphs())
def test_json_round_trip(graph: Graph) -> None:
    verify(graph)
    data = graph.to_json()
    back = Graph.from_json(data)
    assert back == graph
    assert back.to_json() == data
    assert back.dump() == graph.dump()


@settings(max_examples=100, deadline=None)
@given(graphs())
def test_dumps_name_every_node(graph: Graph) -> None:
    text, dot = graph.dump(), graph.to_dot()
    for n in graph.all_nodes():
        if not isinstance(n, Input):
            assert f"%{n.id}: " in text
        assert (f"subgraph cluster_{n.id} " if isinstance(n, Fused) else f"n{n.id} [label=") in dot


def test_from_json_never_imports_or_builds_objects() -> None:
    graph = pipeline.compile(pipeline.step(lambda x: x)(pipeline.INPUT)).graph
    doc = json.loads(graph.to_json())
    doc["steps"][0]["path"] = "os:system"  # a path is only a string
    assert Graph.from_json(json.dumps(doc)).steps[0].path == "os:system"
    doc["nodes"][1]["op"] = "pickle"
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'pickle'"):
        Graph.from_json(json.dumps(doc))


def test_from_json_verifies_structure() -> None:
    g = Graph(name="g", nodes=(Input(id=0), Project(id=1, source=5, key=0)), steps=(), outputs=(1,))
    with pytest.raises(GraphError, match=r"node %1 reads %5, which is not defined before it"):
        Graph.from_json(g.to_json())


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (Graph(name="g", nodes=(Project(id=1, source=0, key=0),), steps=(), outputs=(1,)), "first node must be the input"),
        (Graph(name="g", nodes=(Input(id=0), Constant(id=0, value=Inline(value=1))), steps=(), outputs=(0,)), "defined twice"),
        (Graph(name="g", nodes=(Input(id=0), Call(id=1, step="nope")), steps=(), outputs=(1,)), "unknown step 'nope'"),
        (Graph(name="g", nodes=(Input(id=0),), steps=(), outputs=(0, 0)), "single-output graph has 2 outputs"),
        (Graph(name="g", nodes=(Input(id=0),), steps=(StepSpec(key="a", name="a", path="m:a", kind="function"),), outputs=(0,)), "not called by any node"),
        (Graph(name="g", nodes=(Input(id=0), Switch(id=1, key=0, cases=())), steps=(), outputs=(1,)), "no case and no default"),
        (
            Graph(name="g", nodes=(Input(id=0), Call(id=1, step="a")), steps=(StepSpec(key="a", name="a", path="m:a", kind="function", placement=Placement(num_replicas=2)),), outputs=(1,)),
            "num_replicas=2 needs execution_mode 'actors'",
        ),
    ],
)
def test_verify_rejects_broken_graphs(graph: Graph, message: str) -> None:
    with pytest.raises(GraphError, match=message):
        verify(graph)


# -- types --


class Base:
    pass


class Derived(Base):
    pass


class Other:
    pass


@pytest.mark.parametrize(
    ("src", "dst", "ok"),
    [
        (int, int, True),
        (int, float, True),
        (bool, int, True),
        (float, int, False),
        (str, int, False),
        (Derived, Base, True),
        (Base, Derived, True),  # a Base-typed value may be a Derived at run time
        (Other, Base, False),
        (list[int], list[int], True),
        (list[int], list[str], False),
        (list[int], list, True),
        (int | None, int, True),
        (str, int | None, False),
        (tuple[int, ...], tuple[int, int], True),
        (dict[str, int], dict[str, str], False),
        (Any, int, True),
        (int, object, True),
    ],
)
def test_can_match(src: object, dst: object, ok: bool) -> None:
    assert can_match(from_annotation(src), from_annotation(dst)) is ok


def test_abstract_classes_match_permissively() -> None:
    from collections.abc import Sequence

    assert can_match(from_annotation(list[int]), from_annotation(Sequence[int]))
    assert can_match(from_annotation(Sequence[int]), from_annotation(list[int]))


def test_render() -> None:
    assert render(from_annotation(dict[str, list[int] | None])) == "dict[str, list[int] | None]"
    assert render(from_annotation(tuple[int, ...])) == "tuple[int, ...]"
    assert render(ANY) == "Any"


# -- dumps --


@pipeline.step(execution_mode="tasks")
def pre(x: bytes) -> list[float]:
    return [float(len(x))]


@pipeline.step(execution_mode="actors", num_replicas=2, num_gpus=1)
class Classifier:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, x: list[float]) -> dict[str, float]:
        return {self.name: x[0]}


@pipeline.step
def merge(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {**a, **b}


@pipeline.step
def label(d: dict[str, float]) -> str:
    return ",".join(sorted(d))


def test_golden_dump_and_dot() -> None:
    x = pre(pipeline.INPUT)
    node = label(merge(Classifier("resnet18")(x), Classifier("resnet34")(x)))
    compiled = pipeline.compile(node, name="ensemble", passes=[__import__("pipeline_ir").passes.fuse_local])
    assert compiled.source_graph.dump() == (
        "pipeline ensemble(%0: Any) -> str:\n"
        "  %1: list[float] = pre(%0)                     # tasks\n"
        '  %2: dict[str, float] = Classifier("resnet18")(%1) # actors x2 gpu=1\n'
        '  %3: dict[str, float] = Classifier#2("resnet34")(%1) # actors x2 gpu=1\n'
        "  %4: dict[str, float] = merge(%2, %3)\n"
        "  %5: str = label(%4)\n"
        "  return %5"
    )
    assert compiled.graph.dump() == (
        "pipeline ensemble(%0: Any) -> str:\n"
        "  %1: list[float] = pre(%0)                     # tasks\n"
        '  %2: dict[str, float] = Classifier("resnet18")(%1) # actors x2 gpu=1\n'
        '  %3: dict[str, float] = Classifier#2("resnet34")(%1) # actors x2 gpu=1\n'
        "  %6: str = fused local {                       # local, 2 nodes\n"
        "    %4: dict[str, float] = merge(%2, %3)\n"
        "    %5: str = label(%4)\n"
        "  } -> %5\n"
        "  return %6"
    )
    assert compiled.explain() == (
        "fuse_local:\n"
        "  - fused merge %4, label %5 into %6 (local): adjacent LOCAL steps run as one block of generated code"
    )
    dot = compiled.graph.to_dot()
    assert dot.startswith('digraph "ensemble" {')
    assert "subgraph cluster_6 {" in dot and "n1 -> n2;" in dot and "n5 -> out [style=bold];" in dot
