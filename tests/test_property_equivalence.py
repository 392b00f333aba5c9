"""Property tests: every pass keeps every result.

Hypothesis draws a recipe (a small program: 1-10 steps with fan-out,
fan-in, projections, constants, switches, random modes, replica counts,
purity, fuse flags, GPU shares and CPU requests (half of the recipes
have a GPU and a CPU actor step of equal replicas, for colocate_actors'
fold), repeated calls for CSE to find, and step names that clash: one __name__ from a factory, names equal after
sanitizing, builtins, keywords, generated-looking and non-ASCII) built
from the module-level steps below, so that Ray workers can import them.
The recipe becomes a builder graph; a reference evaluator walks that
builder graph in plain Python, and each pipeline must agree with it on
several inputs, including which calls fail (a step raises ValueError for
some inputs; a switch only runs its chosen arm).

Local backend: hundreds of graphs, with no pass, each pass alone, all
default passes, and all but one; after every pass the graph is verified,
type-checked and round-trips through JSON. The optimized IR keeps its
fused tasks/actors groups and is then forced onto the local backend, so
what the passes decided is what runs. Ray backends: the same recipes on
"tasks", "actors" and the steps' own modes, optimized and not, a few
deploys each, every pipeline shut down.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pipeline_ir as pipeline
from pipeline_ir.builder import CallNode, InputNode, PipelineNode, ProjectNode, SwitchNode, has_default
from pipeline_ir.compile import CompiledPipeline
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Fused, Switch
from pipeline_ir.ir.verify import check_types, verify
from pipeline_ir.passes import (
    Cluster,
    Pass,
    colocate,
    colocate_actors,
    default_passes,
    eliminate_common,
    eliminate_dead,
    force_backend,
    fuse_local,
    fuse_tasks,
    place,
)
from pipeline_ir.step import ConfiguredStep, FunctionStep
from pipeline_ir.trace import trace

# -- the steps: plain module-level functions and a class --

# How many times each step target ran in this process, and how many times
# `check` raised: what Pipeline.stats() must report for LOCAL steps.
RAN: collections.Counter[object] = collections.Counter()
RAISED: collections.Counter[object] = collections.Counter()


def inc(x: int) -> int:
    RAN[inc] += 1
    return x + 1


def double(x: int) -> int:
    RAN[double] += 1
    return 2 * x


def neg(x: int) -> int:
    RAN[neg] += 1
    return -x


def check(x: int) -> int:
    """Fails for some inputs, so that equivalence covers errors too."""
    RAN[check] += 1
    if x % 4 == 3:
        RAISED[check] += 1
        raise ValueError(f"check: {x} % 4 == 3")
    return x


def add(a: int, b: int) -> int:
    RAN[add] += 1
    return a + b


def sub(a: int, b: int) -> int:
    RAN[sub] += 1
    return a - b


def mod3(x: int) -> int:
    RAN[mod3] += 1
    return x % 3


def pair(x: int) -> tuple[int, int]:
    RAN[pair] += 1
    return x, x + 3


def to_array(x: int) -> np.ndarray:
    RAN[to_array] += 1
    return np.array([x, x + 1, x + 2])


def array_sum(a: np.ndarray) -> int:
    RAN[array_sum] += 1
    return int(a.sum())


class Offset:
    """A class step: its init arg is fixed at deploy."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, x: int) -> int:
        RAN[Offset] += 1
        return x + self.k


def make_shift(k: int) -> Callable[[int], int]:
    """A factory: every step it makes is called "shift" (one __name__ and
    __qualname__ for different functions, as an ensemble built in a loop)."""

    def shift(x: int) -> int:
        RAN[shift] += 1
        return x + k

    return shift


SHIFTS = {k: make_shift(k) for k in (1, 10, 100)}

UNARY = {"inc": inc, "double": double, "neg": neg, "check": check, **{f"shift{k}": f for k, f in SHIFTS.items()}}
BINARY = {"add": add, "sub": sub}
MODES = ("local", "tasks", "actors")


@dataclass(frozen=True)
class Variant:
    """How one step is decorated."""

    mode: str = "local"
    replicas: int = 1
    pure: bool = False
    fuse: bool = True
    gpus: float | None = None
    name: str | None = None  # the step's name= option (None: its __name__)
    cpus: float | None = None


# Step names that once made two different steps share one generated global:
# equal after sanitizing, builtins and keywords, the generator's own names,
# other steps' names, and non-ASCII (NFKC folds "ﬁ" into "fi").
NAMES = ["a b", "a_b", "a-b", "len", "print", "class", "v1", "v2", "f1", "_get", "fetched", "run", "arun",
         "group5", "inc", "double", "shift", "shift#2", "ü", "ﬁ", "fi", "9"]


def variants(allow_gpu: bool) -> st.SearchStrategy[Variant]:
    @st.composite
    def draw(draw: st.DrawFn) -> Variant:
        mode = draw(st.sampled_from(MODES))
        return Variant(
            mode=mode,
            replicas=draw(st.sampled_from([1, 2])) if mode == "actors" else 1,
            pure=draw(st.booleans()),
            fuse=draw(st.sampled_from([True, True, True, False])),
            gpus=draw(st.sampled_from([None, None, None, 1.0])) if allow_gpu and mode != "local" else None,
            name=draw(st.sampled_from([None, None, *NAMES])),
        )

    return draw()


_STEPS: dict[tuple[object, Variant], Any] = {}


def step_of(target: Callable[..., object], v: Variant) -> Any:
    """The step for `target` decorated as `v`: one object per pair, so a
    recipe that reuses a variant reuses the step (one StepSpec, one pool)."""
    v = dataclasses.replace(v, pure=v.pure and not isinstance(target, type))
    if (target, v) not in _STEPS:
        decorate = pipeline.step(
            execution_mode=v.mode, num_replicas=v.replicas, num_gpus=v.gpus, num_cpus=v.cpus, fuse=v.fuse, pure=v.pure, name=v.name
        )
        _STEPS[(target, v)] = decorate(target)
    return _STEPS[(target, v)]


# -- recipes: drawn programs --

Op = tuple[Any, ...]


@dataclass
class Recipe:
    """Ops that each add one value (value i + 1 is op i's; value 0 is
    INPUT), then the indices of the values to return."""

    ops: list[Op] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)


@st.composite
def recipes(draw: st.DrawFn, max_steps: int = 10, allow_gpu: bool = True) -> Recipe:
    """`kinds` tracks which values are ints, pairs or arrays, so that every
    op is well typed and compile() accepts every recipe."""
    kinds = ["int"]
    recipe = Recipe()
    # A few decorations per recipe, so neighbours often share a mode and
    # replica count (fusion has work) and steps are often shared.
    palette = draw(st.lists(variants(allow_gpu), min_size=1, max_size=3))
    if allow_gpu and draw(st.booleans()):
        # A GPU actor step and a CPU one with equal replicas, so that
        # colocate_actors' fold (a CPU step asking for at most 1 CPU joins
        # the GPU step's actor) has work, and is refused for 2 CPUs.
        replicas = draw(st.sampled_from([1, 2]))
        cpus = draw(st.sampled_from([None, None, 1.0, 2.0]))
        palette = [Variant(mode="actors", replicas=replicas, gpus=1.0), Variant(mode="actors", replicas=replicas, cpus=cpus), *palette[:1]]

    def pick(kind: str) -> int:
        # Mostly the latest value (chains, which fusion works on, and
        # graphs whose values the outputs reach), else any earlier one.
        candidates = [i for i, k in enumerate(kinds) if k == kind]
        return candidates[-1] if draw(st.integers(0, 2)) else draw(st.sampled_from(candidates))

    def variant() -> Variant:
        return draw(st.sampled_from(palette))

    def operand() -> Op:
        if draw(st.integers(0, 4)) == 0:
            return ("const", draw(st.integers(-3, 3)))
        return ("ref", pick("int"))

    def branch() -> Op:
        # A fresh call only its arm reads, a copy of an earlier call (which
        # eliminate_common may merge, but never out of its arm), a value
        # from outside, or a constant.
        calls = [i for i, op in enumerate(recipe.ops) if op[0] in ("unary", "binary", "offset")]
        choice = draw(st.integers(0, 3))
        if choice == 0:
            return ("call", draw(st.sampled_from(sorted(UNARY))), variant(), pick("int"))
        if choice == 1 and calls:
            return ("repeat", draw(st.sampled_from(calls)))
        return ("ref", pick("int")) if choice == 2 else ("const", draw(st.integers(-3, 3)))

    def add(op: Op, kind: str) -> None:
        recipe.ops.append(op)
        kinds.append(kind)

    for _ in range(draw(st.integers(1, max_steps))):
        calls = [i for i, op in enumerate(recipe.ops) if op[0] in ("unary", "binary", "offset")]
        kinds_of_op = ["unary", "check", "binary", "offset", "pair", "array", "switch"] + (["repeat"] if calls else [])
        kind = draw(st.sampled_from(kinds_of_op))
        if kind in ("unary", "check"):
            name = "check" if kind == "check" else draw(st.sampled_from(sorted(UNARY)))
            add(("unary", name, variant(), pick("int")), "int")
        elif kind == "binary":
            add(("binary", draw(st.sampled_from(sorted(BINARY))), variant(), operand(), operand()), "int")
        elif kind == "offset":
            # Instance 0 or 1 of a variant: the same instance twice is one pool.
            add(("offset", variant(), draw(st.integers(0, 1)), pick("int")), "int")
        elif kind == "pair":
            add(("pair", variant(), pick("int")), "pair")
            source = len(kinds) - 1
            for item in draw(st.lists(st.sampled_from([0, 1]), min_size=1, max_size=2)):
                add(("project", source, item), "int")
        elif kind == "array":
            add(("array", variant(), pick("int")), "array")
            add(("array_sum", variant(), len(kinds) - 1), "int")
        elif kind == "switch":
            cases = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3, unique=True))
            add(("switch", variant(), pick("int"), [(c, branch()) for c in cases], branch()), "int")
        else:
            add(("repeat", draw(st.sampled_from(calls))), "int")
    recipe.outputs = [len(kinds) - 1, *draw(st.lists(st.integers(0, len(kinds) - 1), max_size=2))]
    return recipe


def build(recipe: Recipe) -> PipelineNode | tuple[PipelineNode, ...]:
    """The builder graph a recipe describes."""
    values: list[PipelineNode] = [pipeline.INPUT]
    instances: dict[tuple[Variant, int], ConfiguredStep] = {}

    def arg(op: Op) -> object:
        return op[1] if op[0] == "const" else values[op[1]]

    def call(op: Op) -> PipelineNode:
        match op:
            case ("unary", name, v, i):
                return step_of(UNARY[name], v)(values[i])
            case ("binary", name, v, a, b):
                return step_of(BINARY[name], v)(arg(a), arg(b))
            case ("offset", v, n, i):
                if (v, n) not in instances:
                    instances[(v, n)] = step_of(Offset, v)(n + 1)
                return instances[(v, n)](values[i])
            case ("repeat", j):
                return call(recipe.ops[j])
            case ("pair", v, i):
                return step_of(pair, v)(values[i])
            case ("project", source, item):
                return values[source][item]
            case ("array", v, i):
                return step_of(to_array, v)(values[i])
            case ("array_sum", v, i):
                return step_of(array_sum, v)(values[i])
            case ("switch", v, i, cases, default):
                key = step_of(mod3, v)(values[i])
                return pipeline.switch(key, {c: branch(b) for c, b in cases}, default=branch(default))
        raise AssertionError(op)

    def branch(op: Op) -> object:
        if op[0] == "call":
            return call(("unary", *op[1:]))
        return call(op) if op[0] == "repeat" else arg(op)

    for op in recipe.ops:
        values.append(call(op))
    outs = tuple(values[i] for i in recipe.outputs)
    return outs[0] if len(outs) == 1 else outs


# -- the reference: the builder graph's meaning, in plain Python --

Outcome = object  # a normalized result, or the exception type a call raised


def normalize(value: object) -> object:
    """Arrays compare by content; tuples item by item."""
    if isinstance(value, np.ndarray):
        return ("array", value.tolist())
    if isinstance(value, tuple):
        return tuple(normalize(v) for v in value)
    return value


def reference(outputs: PipelineNode | tuple[PipelineNode, ...], x: object) -> Outcome:
    """Evaluate the builder graph on `x`: each node once, a switch only on
    its chosen branch, a class step with one instance per configured step."""
    memo: dict[int, object] = {}
    instances: dict[int, Callable[..., object]] = {}

    def value(v: object) -> object:
        return ev(v) if isinstance(v, PipelineNode) else v

    def ev(n: PipelineNode) -> object:
        if id(n) not in memo:
            memo[id(n)] = compute(n)
        return memo[id(n)]

    def compute(n: PipelineNode) -> object:
        if isinstance(n, InputNode):
            return x
        if isinstance(n, CallNode):
            args = [value(a) for a in n.args]
            kwargs = {k: value(v) for k, v in n.kwargs.items()}
            if isinstance(n.step, FunctionStep):
                return n.step.fn(*args, **kwargs)
            if id(n.step) not in instances:
                instances[id(n.step)] = n.step.step.cls(*n.step.init_args, **n.step.init_kwargs)
            return instances[id(n.step)](*args, **kwargs)
        if isinstance(n, ProjectNode):
            return ev(n.source)[n.key]  # type: ignore[index]
        if isinstance(n, SwitchNode):
            key = ev(n.key)
            for case, b in n.cases:
                if key == case:
                    return value(b)
            if has_default(n):
                return value(n.default)
            raise KeyError(key)
        raise AssertionError(n)

    try:
        if isinstance(outputs, tuple):
            return normalize(tuple(ev(o) for o in outputs))
        return normalize(ev(outputs))
    except ValueError as e:
        return type(e)


def outcome(call: Callable[[object], object], x: object) -> Outcome:
    """What the pipeline gave for `x`, in the reference's terms."""
    try:
        return normalize(call(x))
    except pipeline.StepError as e:
        assert e.__cause__ is not None, e
        return type(e.__cause__)


# -- local backend: every pass configuration, hundreds of graphs --


def _name(p: Pass) -> str:
    return str(getattr(getattr(p, "func", p), "__name__", p))


# A CPU-only cluster large enough for any generated graph: the fallback runs.
ON_CPU = functools.partial(place, cluster=Cluster.single(cpus=1e6), fallback=True)
SINGLE: list[Pass] = [eliminate_dead, eliminate_common, fuse_local, fuse_tasks, colocate_actors, colocate, ON_CPU]
CONFIGS: dict[str, list[Pass]] = {
    "none": [],
    "default": default_passes(),
    "default+place": [*default_passes(), ON_CPU],
    **{_name(p): [p] for p in SINGLE},
    **{f"default-{_name(p)}": [q for q in default_passes() if q is not p] for p in default_passes()},
}


def checked_passes(graph: Graph, passes: Sequence[Pass]) -> Graph:
    """Run `passes`, checking after each what every pass must keep."""
    for p in passes:
        result = p(graph)
        if result.graph is not graph:
            assert result.graph != graph, f"{_name(p)} built an equal graph: return the same object"
        verify(result.graph)
        check_types(result.graph)
        assert Graph.from_json(result.graph.to_json()) == result.graph
        _assert_actor_pools_whole(result.graph)
        graph = result.graph
    return graph


def _assert_actor_pools_whole(graph: Graph) -> None:
    """A step called inside an actors group is called nowhere else."""
    where: dict[str, set[int]] = {}
    for n in graph.nodes:
        if isinstance(n, Call):
            where.setdefault(n.step, set()).add(-1)
        elif isinstance(n, Fused):
            for b in n.body:
                if isinstance(b, Call):
                    where.setdefault(b.step, set()).add(n.id if n.placement.mode == "actors" else -1)
    for key, places in where.items():
        groups = places - {-1}
        assert not groups or places == groups and len(groups) == 1, f"step {key} runs in {places}"


def run_local(compiled: CompiledPipeline, graph: Graph, xs: Sequence[object]) -> list[Outcome]:
    """The outcomes of `graph` on the local backend; its stats() must count
    every step run and every failure as the steps themselves saw them
    (calls go through `call` and `call_async` in turn, and the first call
    through the timed program)."""
    local = force_backend(graph, backend="local").graph
    verify(local)
    program = CompiledPipeline(graph=local, source_graph=compiled.source_graph, bindings=compiled.bindings, records=())
    RAN.clear()
    RAISED.clear()
    with program.deploy() as p:
        results = [outcome(p.call if i % 2 == 0 else lambda v: asyncio.run(p.call_async(v)), x) for i, x in enumerate(xs)]
        stats = p.stats()
    calls: collections.Counter[object] = collections.Counter()
    errors: collections.Counter[object] = collections.Counter()
    for key, figures in stats.items():
        target = compiled.bindings.steps[key].target
        calls[target] += figures["calls"] or 0
        errors[target] += figures["errors"] or 0
    nonzero = lambda c: {k: v for k, v in c.items() if v}  # noqa: E731
    assert nonzero(calls) == nonzero(RAN) and nonzero(errors) == nonzero(RAISED), f"stats {dict(calls)} errors {dict(errors)}; ran {dict(RAN)} raised {dict(RAISED)}\n{graph.dump()}"
    return results


INPUTS = st.lists(st.integers(-10, 10), min_size=1, max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=recipes(), xs=INPUTS)
def test_local_every_pass_configuration_matches_the_reference(recipe: Recipe, xs: list[int]) -> None:
    node = build(recipe)
    expected = [reference(node, x) for x in xs]
    graph, bindings = trace(node)
    verify(graph)
    check_types(graph)
    compiled = CompiledPipeline(graph=graph, source_graph=graph, bindings=bindings, records=())
    for name, passes in CONFIGS.items():
        optimized = checked_passes(graph, passes)
        assert run_local(compiled, optimized, xs) == expected, f"passes: {name}\n{optimized.dump()}"
        if name == "default":
            _record(graph, optimized, expected)


def _record(graph: Graph, optimized: Graph, expected: list[Outcome]) -> None:
    """What the drawn examples exercised (pytest --hypothesis-show-statistics)."""
    fused = [n for n in optimized.nodes if isinstance(n, Fused)]
    for mode in sorted({f.placement.mode for f in fused}):
        event(f"fused {mode} group")
    if len(optimized.all_nodes()) - len(fused) < len(graph.nodes):
        event("eliminate_common merged nodes")
    if any(s.placement.colocate for s in optimized.steps) or any(f.placement.colocate for f in fused):
        event("colocate labelled")
    if any(f.placement.num_gpus and any(isinstance(b, Call) and not optimized.step(b.step).placement.num_gpus for b in f.body) for f in fused):
        event("a CPU step folded into a GPU actor")
    if any(isinstance(n, Switch) for n in graph.nodes):
        event("has a switch")
    if ValueError in expected:
        event("some calls fail")


def test_a_node_two_arms_share_runs_only_when_one_of_them_is_chosen() -> None:
    # Found by the property above: check(inc(x)) is needed by arms 1 and 2
    # only, and used to run before the switch, failing calls that chose arm 0.
    check_, inc_, mod3_ = (step_of(f, Variant()) for f in (check, inc, mod3))
    shared = check_(inc_(pipeline.INPUT))
    node = pipeline.switch(mod3_(pipeline.INPUT), {0: pipeline.INPUT, 1: shared, 2: inc_(shared)})
    with pipeline.compile(node, backend="local").deploy() as p:
        assert [outcome(p.call, x) for x in (6, 2, 7, 4)] == [6, ValueError, 8, 5]
        assert [reference(node, x) for x in (6, 2, 7, 4)] == [6, ValueError, 8, 5]


# -- Ray backends: the same recipes, a few deploys each --


RAY_INPUTS = st.lists(st.integers(-10, 10), min_size=3, max_size=5)
# Actor deploys cost seconds (a process per replica on a 2-core CI box):
# these counts keep the three tests near two minutes together.
RAY_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_on_ray(backend: str | None, recipe: Recipe, xs: list[int], channels: bool = False, fast_path: bool = True) -> None:
    """Deploy the recipe unoptimized and optimized (two deploys; a third
    with Compiled Graph channels when `channels`), call each on all of
    `xs`, and compare with the reference. Actor calls take the fast path
    (the default) in the optimized deploys, and in the unoptimized one,
    where values hop between the most actors, only when `fast_path` (drawn:
    the other half go through Ray actor calls). Without GPUs: the test cluster's
    one logical GPU could not hold two GPU replicas (the place pass's tests
    cover GPUs)."""
    node = build(recipe)
    expected = [reference(node, x) for x in xs]
    variants = [(False, False), (True, False)] + ([(True, True)] if channels else [])
    for optimize, use_channels in variants:
        compiled = pipeline.compile(node, backend=backend, optimize=optimize, channels=use_channels, debug=True)
        assert Graph.from_json(compiled.graph.to_json()) == compiled.graph
        fast = fast_path or optimize
        with compiled.deploy(fast_path=fast) as p:
            got = [outcome(p.call, x) for x in xs]
        assert got == expected, f"backend={backend} optimize={optimize} channels={use_channels} fast_path={fast}\n{compiled.graph.dump()}"
        if optimize and not use_channels:
            _record(compiled.source_graph, compiled.graph, expected)
        if use_channels:
            event(f"channel units: {sum(1 for n in compiled.graph.all_nodes() if _is_channel(compiled.graph, n))}")


@settings(RAY_SETTINGS, max_examples=60)
@given(recipe=recipes(max_steps=6, allow_gpu=False), xs=RAY_INPUTS)
def test_ray_tasks_backend_matches_the_reference(ray_session: Any, recipe: Recipe, xs: list[int]) -> None:
    check_on_ray("tasks", recipe, xs)


@settings(RAY_SETTINGS, max_examples=15)
@given(recipe=recipes(max_steps=6, allow_gpu=False), xs=RAY_INPUTS, fast_path=st.booleans(), channels=st.booleans())
def test_ray_actors_backend_matches_the_reference(
    ray_session: Any, recipe: Recipe, xs: list[int], fast_path: bool, channels: bool
) -> None:
    # The opt-in channels deploy (a compiled graph to build and tear down,
    # the slowest of the three) for half the examples.
    check_on_ray("actors", recipe, xs, channels=channels, fast_path=fast_path)


@settings(RAY_SETTINGS, max_examples=20)
@given(recipe=recipes(max_steps=6, allow_gpu=False), xs=RAY_INPUTS, fast_path=st.booleans(), channels=st.booleans())
def test_ray_steps_own_modes_match_the_reference(
    ray_session: Any, recipe: Recipe, xs: list[int], fast_path: bool, channels: bool
) -> None:
    check_on_ray(None, recipe, xs, channels=channels, fast_path=fast_path)


def _is_channel(graph: Graph, node: Any) -> bool:
    if isinstance(node, Fused):
        return node.placement.channel
    return isinstance(node, Call) and graph.step(node.step).placement.channel
