"""Builder nodes -> Graph: the tracer.

Walks the objects users built (builder.py) from the outputs back to INPUT and
records them as IR nodes in topological order, with one StepSpec per step
(per configured instance for class steps). The callables and non-JSON
constants go into `Bindings` (bindings.py), beside the graph, so that the
Graph stays plain data that JSON can carry. Reads builder.py and step.py;
neither imports this module, nor does anything a Ray worker runs.
"""

from __future__ import annotations

import inspect
import math
import re
import typing
from collections.abc import Callable

import msgspec

from pipeline_ir.bindings import Bindings, StepBinding
from pipeline_ir.builder import CallNode, InputNode, PipelineNode, ProjectNode, StepObject, SwitchNode, has_default
from pipeline_ir.errors import PipelineTypeError, PipelineValueError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import (
    AnyNode,
    Batching,
    Call,
    Case,
    Constant,
    External,
    Inline,
    Input,
    Param,
    ParamKind,
    Placement,
    Project,
    StepSpec,
    Switch,
    Value,
)
from pipeline_ir.ir.types import ANY, TypeRef, from_annotation, item_type, join
from pipeline_ir.step import ClassStep, ConfiguredStep, FunctionStep, StepOptions

StepHandle = FunctionStep[object] | ConfiguredStep


_PARAM_KINDS: dict[inspect._ParameterKind, ParamKind] = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


def _hints(fn: Callable[..., object]) -> dict[str, object]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        # Unresolvable forward references: those parameters are untyped.
        return {}


def _signature_types(fn: Callable[..., object], skip_first: bool) -> tuple[tuple[Param, ...], TypeRef]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return (), ANY
    hints = _hints(fn)
    params = list(sig.parameters.values())[1 if skip_first else 0 :]
    out = tuple(
        Param(
            name=p.name,
            kind=_PARAM_KINDS[p.kind],
            type=from_annotation(hints.get(p.name, inspect.Parameter.empty)),
            has_default=p.default is not inspect.Parameter.empty,
        )
        for p in params
    )
    return out, from_annotation(hints.get("return", inspect.Parameter.empty))


def is_plain_json(value: object) -> bool:
    """Whether `value` survives a JSON round trip as an equal value of the
    same types: None, bool, int (64-bit), finite float, str, and lists or
    str-keyed dicts of those."""
    if value is None or type(value) in (bool, str):
        return True
    if type(value) is int:
        return -(2**63) <= value < 2**64
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(is_plain_json(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and is_plain_json(v) for k, v in value.items())
    return False


def short_repr(value: object) -> str:
    """A one-line description of a constant for dumps (never its full data)."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"<{type(value).__name__} shape={tuple(shape)} dtype={dtype}>"
    if isinstance(value, (bytes, bytearray)):
        return f"<{type(value).__name__} len={len(value)}>"
    text = re.sub(r"\s+", " ", repr(value))
    return text if len(text) <= 40 else f"<{type(value).__name__}>"


def _type_of_value(value: object) -> TypeRef:
    return from_annotation(type(value))


class _Tracer:
    def __init__(self) -> None:
        self.nodes: list[AnyNode] = []
        self.ids: dict[int, int] = {}  # id(builder node) -> node id
        self.keep_alive: list[object] = []  # so id() values stay unique
        self.steps: dict[int, StepSpec] = {}  # id(step handle) -> spec
        self.step_keys: set[str] = set()
        self.bindings: dict[str, StepBinding] = {}
        self.constants: dict[str, object] = {}
        self.nodes.append(Input(id=0))

    def _new_id(self) -> int:
        return len(self.nodes)

    def value(self, value: object, key_hint: str) -> Value:
        if is_plain_json(value):
            return Inline(value=value)
        key = key_hint
        self.constants[key] = value
        return External(key=key, repr=short_repr(value))

    def constant(self, value: object) -> int:
        node_id = self._new_id()
        self.nodes.append(Constant(id=node_id, type=_type_of_value(value), value=self.value(value, f"const{node_id}")))
        return node_id

    def step_spec(self, handle: StepObject) -> StepSpec:
        if not isinstance(handle, (FunctionStep, ConfiguredStep)):
            # Only these two make call nodes (step.py); a ClassStep is refused earlier.
            raise PipelineTypeError(f"cannot trace a call of {handle!r}")
        spec = self.steps.get(id(handle))
        if spec is not None:
            return spec
        options = handle.options
        key = options.name
        n = 1
        while key in self.step_keys:
            n += 1
            key = f"{options.name}#{n}"
        self.step_keys.add(key)
        if isinstance(handle, FunctionStep):
            target: Callable[..., object] = handle.fn
            params, returns = _signature_types(handle.fn, skip_first=False)
            init_args: tuple[Value, ...] = ()
            init_kwargs: tuple[tuple[str, Value], ...] = ()
            self.bindings[key] = StepBinding(handle.fn)
        else:
            target = handle.step.cls
            params, returns = _signature_types(handle.step.cls.__call__, skip_first=True)
            init_args = tuple(self.value(a, f"init:{key}:{i}") for i, a in enumerate(handle.init_args))
            init_kwargs = tuple((k, self.value(v, f"init:{key}:{k}")) for k, v in handle.init_kwargs.items())
            self.bindings[key] = StepBinding(target, handle.init_args, dict(handle.init_kwargs))
        if options.max_batch_size is not None:
            params, returns = _per_item(params, returns)
        spec = StepSpec(
            key=key,
            name=options.name,
            path=f"{target.__module__}:{target.__qualname__}",
            kind="function" if isinstance(handle, FunctionStep) else "class",
            placement=_placement(options),
            fuse=options.fuse,
            pure=options.pure,
            init_args=init_args,
            init_kwargs=init_kwargs,
            params=params,
            returns=returns,
        )
        self.steps[id(handle)] = spec
        self.keep_alive.append(handle)
        return spec

    def operand(self, value: object) -> int:
        """The node id of an argument: a traced node, or a new constant."""
        if isinstance(value, PipelineNode):
            return self.ids[id(value)]
        return self.constant(value)

    def trace(self, outputs: tuple[PipelineNode, ...]) -> None:
        # Iterative post-order walk: deep chains must not hit the recursion limit.
        stack: list[tuple[PipelineNode, bool]] = [(o, False) for o in reversed(outputs)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in self.ids:
                continue
            if not expanded:
                stack.append((node, True))
                for dep in reversed(_dependencies(node)):
                    if id(dep) not in self.ids:
                        stack.append((dep, False))
                continue
            self.ids[id(node)] = self.record(node)
            self.keep_alive.append(node)

    def record(self, node: PipelineNode) -> int:
        if isinstance(node, InputNode):
            return 0
        if isinstance(node, CallNode):
            spec = self.step_spec(node.step)
            args = tuple(self.operand(a) for a in node.args)
            kwargs = tuple((k, self.operand(v)) for k, v in node.kwargs.items())
            node_id = self._new_id()
            self.nodes.append(Call(id=node_id, type=spec.returns, step=spec.key, args=args, kwargs=kwargs))
            return node_id
        if isinstance(node, ProjectNode):
            source = self.ids[id(node.source)]
            node_id = self._new_id()
            source_type = self.nodes[source].type
            self.nodes.append(Project(id=node_id, type=item_type(source_type, node.key), source=source, key=node.key))
            return node_id
        if isinstance(node, SwitchNode):
            key = self.ids[id(node.key)]
            cases = tuple(Case(value=v, branch=self.operand(b)) for v, b in node.cases)
            default = self.operand(node.default) if has_default(node) else None
            branch_ids = [c.branch for c in cases] + ([default] if default is not None else [])
            node_id = self._new_id()
            result_type = join(tuple(self.nodes[b].type for b in branch_ids))
            self.nodes.append(Switch(id=node_id, type=result_type, key=key, cases=cases, default=default))
            return node_id
        raise PipelineTypeError(f"cannot trace {node!r}")


def _per_item(params: tuple[Param, ...], returns: TypeRef) -> tuple[tuple[Param, ...], TypeRef]:
    """A batched step's signature as its callers see it: its callable takes
    a list of inputs (its first parameter) and returns a list of results,
    but each call passes one input and gets one result."""

    def element(t: TypeRef) -> TypeRef:
        return item_type(t, 0) if t.name in _SEQUENCES else ANY

    if params:
        params = (msgspec.structs.replace(params[0], type=element(params[0].type)),) + params[1:]
    return params, element(returns)


_SEQUENCES = frozenset({"builtins.list", "collections.abc.Sequence", "typing.Sequence"})


def _placement(options: StepOptions) -> Placement:
    """A step's options as the IR's Placement."""
    batching = None
    if options.max_batch_size is not None:
        assert options.batch_wait_timeout_s is not None  # step.py sets the default
        batching = Batching(max_batch_size=options.max_batch_size, batch_wait_timeout_s=options.batch_wait_timeout_s)
    return Placement(
        mode=options.mode.value,
        num_replicas=options.num_replicas,
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
        batching=batching,
        idempotent=options.idempotent,
    )


def _dependencies(node: PipelineNode) -> list[PipelineNode]:
    if isinstance(node, CallNode):
        return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, PipelineNode)]
    if isinstance(node, ProjectNode):
        return [node.source]
    if isinstance(node, SwitchNode):
        deps: list[object] = [node.key, *(b for _, b in node.cases)]
        if has_default(node):
            deps.append(node.default)
        return [d for d in deps if isinstance(d, PipelineNode)]
    return []


def trace(outputs: PipelineNode | tuple[PipelineNode, ...] | list[PipelineNode], name: str | None = None) -> tuple[Graph, Bindings]:
    """Record the pipeline ending in `outputs` as a Graph and its Bindings.

    A tuple or list of nodes makes a multi-output pipeline whose call
    returns a tuple.
    """
    multi = isinstance(outputs, (tuple, list))
    outs: tuple[object, ...] = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    if not outs:
        raise PipelineValueError("compile() needs at least one output node")
    for i, o in enumerate(outs):
        if isinstance(o, StepObject):
            raise PipelineTypeError(o.not_a_node(f"compile() output {i}"))
        if not isinstance(o, PipelineNode):
            raise PipelineTypeError(
                f"compile() output {i} is a {type(o).__name__}, not a pipeline node; "
                "compile the node returned by calling a step, e.g. compile(step(pipeline.INPUT))"
            )
    tracer = _Tracer()
    nodes_out = tuple(o for o in outs if isinstance(o, PipelineNode))
    tracer.trace(nodes_out)
    output_ids = tuple(tracer.ids[id(o)] for o in nodes_out)
    first_use = _first_uses(tracer.nodes)
    steps = tuple(sorted(tracer.steps.values(), key=lambda s: first_use[s.key]))
    graph = Graph(
        name=name or _default_name(nodes_out, tracer),
        nodes=tuple(tracer.nodes),
        steps=steps,
        outputs=output_ids,
        multi_output=multi,
    )
    return graph, Bindings(steps=dict(tracer.bindings), constants=dict(tracer.constants))


def _first_uses(nodes: list[AnyNode]) -> dict[str, int]:
    """Each step key -> the id of the first node calling it (one walk, not one per step)."""
    first: dict[str, int] = {}
    for n in nodes:
        if isinstance(n, Call):
            first.setdefault(n.step, n.id)
    return first


def _default_name(outputs: tuple[PipelineNode, ...], tracer: _Tracer) -> str:
    last = outputs[-1]
    if isinstance(last, CallNode):
        return re.sub(r"\W", "_", tracer.step_spec(last.step).name)
    return "pipeline"
