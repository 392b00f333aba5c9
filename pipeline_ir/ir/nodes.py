"""The op kinds of the IR. This docstring is the language reference.

A pipeline is a `Graph` (see graph.py) of nodes in topological order, in
A-normal form: every argument of a node is the id of an earlier node, so the
printed graph reads like a straight-line program::

    pipeline add_chain(%0: Any) -> int:
      %1: int = add_one(%0)
      %2: int = double(%1)                     # tasks
      %3: int = 10
      %4: int = Adder(%3)(%2)                  # actors x2
      return %4

Op kinds (the JSON tag `"op"`):

``input``      ``%0``, the pipeline's argument. Exactly one, always first.
``constant``   a plain value baked into the pipeline. `Inline` values are
               JSON data stored in the graph; other values (arrays, bytes,
               objects) are `External`: the graph keeps their repr and a key,
               the compiled pipeline keeps the value.
``call``       calls a step (`Graph.steps[key]`) on earlier nodes, with
               positional `args` and keyword `kwargs`.
``project``    ``%1[0]`` or ``%1["k"]``: an item of an earlier node's value.
``switch``     picks one of several earlier nodes by the value of `key`;
               nodes needed only by one case run only when it is chosen
               (see schedule.py).
``fused``      a group of call/constant/project nodes run as one unit on one
               backend (its `placement`): inline code for LOCAL, one Ray task for TASKS, one
               actor process per replica for ACTORS. Introduced by passes;
               its `body` keeps the original nodes, and `output` names the
               body node whose value the group returns.

Where a call runs is its step's `placement`, where a fused group runs is
the group's own (placement.py): mode, replicas, resources, colocation,
channel, batching, idempotence, in one value.

Every node has an `id` (unique in the graph, printed ``%id``) and the `type`
of its value. Nodes are frozen msgspec Structs: passes build new ones with
`msgspec.structs.replace`, never mutate.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias, assert_never

import msgspec

# Re-exported: nodes.py is where the IR's names are imported from.
from pipeline_ir.ir.placement import Batching as Batching, Mode as Mode, Placement as Placement
from pipeline_ir.ir.types import ANY, TypeRef

StepKind: TypeAlias = Literal["function", "class"]
ParamKind: TypeAlias = Literal["positional", "var_positional", "keyword", "var_keyword"]
SwitchValue: TypeAlias = None | bool | int | str


class Inline(msgspec.Struct, frozen=True, tag_field="kind", tag="inline"):
    """A constant stored in the graph itself: plain JSON data (None, bool,
    int, float, str, list, str-keyed dict; never tuples, which would come
    back from JSON as lists). trace.py decides what qualifies."""

    # Any, not a recursive alias: msgspec cannot decode recursive aliases,
    # and any JSON value decodes to exactly the data trace.py admits.
    value: Any


class External(msgspec.Struct, frozen=True, tag_field="kind", tag="external"):
    """A constant the graph only names: its value lives in the compiled
    pipeline's bindings under `key`, so decoding JSON never builds objects."""

    key: str
    repr: str


Value: TypeAlias = Inline | External


class Param(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One parameter of a step's call signature."""

    name: str
    kind: ParamKind
    type: TypeRef = ANY
    has_default: bool = False


class StepSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a `call` node calls and where it runs.

    `key` is unique within a graph: every call of one decorated function, or
    of one configured class instance (`Adder(2)`), shares one spec, and so
    one replica pool. `path` is "module:qualname" for dumps and tools; the
    callable itself travels in the compiled pipeline's bindings.
    `placement` (placement.py) says where its calls run when they are not
    inside a fused group (a group's own placement applies there).
    """

    key: str
    name: str
    path: str
    kind: StepKind
    placement: Placement = Placement()
    fuse: bool = True
    pure: bool = False
    init_args: tuple[Value, ...] = ()
    init_kwargs: tuple[tuple[str, Value], ...] = ()
    params: tuple[Param, ...] = ()
    returns: TypeRef = ANY


class Node(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="op"):
    """Base of every op kind: an id and the type of the node's value."""

    id: int
    type: TypeRef = ANY


class Input(Node, frozen=True, kw_only=True, tag="input"):
    """The pipeline's argument."""


class Constant(Node, frozen=True, kw_only=True, tag="constant"):
    """A value fixed when the pipeline was built."""

    value: Value


class Call(Node, frozen=True, kw_only=True, tag="call"):
    """`step(*args, **kwargs)` where each argument is a node id."""

    step: str
    args: tuple[int, ...] = ()
    kwargs: tuple[tuple[str, int], ...] = ()


class Project(Node, frozen=True, kw_only=True, tag="project"):
    """`source[key]`."""

    source: int
    key: int | str


class Case(msgspec.Struct, frozen=True, kw_only=True):
    """One arm of a switch: when the key equals `value`, the result is `branch`."""

    value: SwitchValue
    branch: int


class Switch(Node, frozen=True, kw_only=True, tag="switch"):
    """The value of the case whose `value` equals the value of node `key`."""

    key: int
    cases: tuple[Case, ...]
    default: int | None = None


BodyNode: TypeAlias = Constant | Call | Project


class Fused(Node, frozen=True, kw_only=True, tag="fused"):
    """Several nodes run as one unit (introduced by fusion passes).

    `inputs` are the ids of outside nodes the body reads, in a fixed order;
    `body` holds the original nodes in topological order; `output` is the id
    of the body node whose value is the group's value. `placement`
    applies to the unit as a whole (its members' own placements do not).
    """

    placement: Placement
    inputs: tuple[int, ...]
    body: tuple[BodyNode, ...]
    output: int


AnyNode: TypeAlias = Input | Constant | Call | Project | Switch | Fused


def node_inputs(node: AnyNode) -> tuple[int, ...]:
    """Ids of the nodes whose values `node` reads (in argument order)."""
    match node:
        case Input() | Constant():
            return ()
        case Call(args=args, kwargs=kwargs):
            return args + tuple(v for _, v in kwargs)
        case Project(source=source):
            return (source,)
        case Switch(key=key, cases=cases, default=default):
            branches = tuple(c.branch for c in cases)
            return (key,) + branches + (() if default is None else (default,))
        case Fused(inputs=inputs):
            return inputs
        case _:
            assert_never(node)


def remap_inputs(node: AnyNode, mapping: dict[int, int]) -> AnyNode:
    """`node` reading `mapping[i]` wherever it read `i` (same object if no
    input is remapped). The dual of `node_inputs`, for passes."""
    if not any(i in mapping for i in node_inputs(node)):
        return node

    def m(i: int) -> int:
        return mapping.get(i, i)

    match node:
        case Input() | Constant():
            return node
        case Call(args=args, kwargs=kwargs):
            return msgspec.structs.replace(node, args=tuple(m(a) for a in args), kwargs=tuple((k, m(v)) for k, v in kwargs))
        case Project(source=source):
            return msgspec.structs.replace(node, source=m(source))
        case Switch(key=key, cases=cases, default=default):
            return msgspec.structs.replace(
                node,
                key=m(key),
                cases=tuple(msgspec.structs.replace(c, branch=m(c.branch)) for c in cases),
                default=None if default is None else m(default),
            )
        case Fused(inputs=inputs, body=body):
            new_body = tuple(remap_inputs(b, mapping) for b in body)
            return msgspec.structs.replace(node, inputs=tuple(m(i) for i in inputs), body=new_body)
        case _:
            assert_never(node)
