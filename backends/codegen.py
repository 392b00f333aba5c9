"""Graph -> Python source: the code generator all backends share.

As in torch.fx, a pipeline runs as generated straight-line Python: one
assignment per node, so a chain of local steps costs what calling the
functions by hand costs. Each node's call is spelled by the launcher of its
mode (local.py, ray_tasks.py, ray_actors.py); this module decides nothing
about placement, it only writes down what the IR says. For
`add_one (local) -> double (tasks) -> Adder(10) (actors)`:

    def run(v0):
        v1 = add_one(v0)                   # local: the function itself
        v2 = double.submit(2, v1)          # tasks: an ObjectRef
        v3 = Adder.submit(3, v2)           # actors: an ObjectRef
        return _get(v3, 3)                 # one fetch, at the end

Every identifier (step callables, constants, values, helpers) is allocated
by one `Namespace` (namespace.py), so two different steps never share a
global whatever their names. A local node reading a remote value fetches it
first (`_get`); remote nodes pass ObjectRefs straight on. A switch becomes
if/elif over the key, and the nodes only one arm needs are emitted inside
that arm (ir/schedule.py). The line of each node is recorded so that an
exception inside a step is reported with the step's name and node id
(`translate_error`).
"""

from __future__ import annotations

import itertools
import keyword
import linecache
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pipeline_ir.backends.namespace import Namespace
from pipeline_ir.errors import PipelineTimeoutError, StepError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import AnyNode, Call, Constant, Fused, Inline, Input, Mode, Project, Switch
from pipeline_ir.ir.printer import node_label
from pipeline_ir.ir.schedule import Block, Branches, remote_values, schedule


class Launcher(Protocol):
    """How one execution mode spells a call (see local.py, ray_*.py)."""

    remote: bool  # whether the values it produces are Ray ObjectRefs

    def callee(self, node: Call | Fused) -> object:
        """The object the generated code calls for `node` (a global)."""
        ...

    def expr(self, node: Call | Fused, callee: str, args: str, is_async: bool = False) -> str:
        """The Python expression that runs `node` given its argument list
        (in an `async def` entry point when `is_async`)."""
        ...


@dataclass
class PythonCode:
    """Generated source, the globals it runs with, and which line of it
    belongs to which node."""

    source: str
    globals: dict[str, object]
    line_nodes: dict[int, int]
    filename: str
    entry: str
    # LOCAL calls counted but not returned yet when a line starts (a
    # straight run of code bumps one counter for all its calls as it
    # begins): a call that fails there takes these back (`unreturned_at`).
    unreturned: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # The timed program this one hands one call in n to (`generate`'s
    # `sampled`): an error raised there is read against its lines.
    inner: PythonCode | None = None

    def load(self) -> Callable[..., object]:
        """Compile the source and return its entry function."""
        # Registering the source lets tracebacks show the generated lines;
        # the entry goes when the function does, so a process that deploys
        # and shuts down pipelines for days does not grow linecache.
        linecache.cache[self.filename] = (len(self.source), None, self.source.splitlines(True), self.filename)
        namespace = dict(self.globals)
        exec(compile(self.source, self.filename, "exec"), namespace)
        fn = namespace[self.entry]
        assert callable(fn)
        weakref.finalize(fn, linecache.cache.pop, self.filename, None)
        return fn


_counter = itertools.count()

# Names the runtime helpers are bound under (ray_runtime.runtime_globals,
# `_no_match` below): reserved before any other name is allocated.
RUNTIME_NAMES = ("_get", "_aget", "_get_many", "_aget_many", "_no_match", "_clock")


class Probes(Protocol):
    """Where the figures of LOCAL calls go (backends/stats.py): a counter
    bumped (`next`) as a straight run of code begins, counting a call of
    each LOCAL call in it, and, in the timed variant of a program, a
    recorder of each call's duration. Both are C-level, so a probe costs
    tens of nanoseconds."""

    def counter(self, node_ids: tuple[int, ...]) -> Iterator[int]: ...

    def recorder(self, node_id: int) -> Callable[[float], object]: ...


@dataclass
class _Emitter:
    graph: Graph
    launchers: Mapping[Mode, Launcher]
    constants: Mapping[str, object]
    is_async: bool
    probes: Probes | None = None  # count LOCAL calls for Pipeline.stats()
    timed: bool = False  # and time them (`_clock`)
    sampled: tuple[PythonCode, Callable[..., object], int] | None = None  # (the timed program, loaded, n): one call in n runs it
    lines: list[str] = field(default_factory=list)
    line_nodes: dict[int, int] = field(default_factory=dict)
    unreturned: list[int] = field(default_factory=list)  # LOCAL calls of this straight run counted, not returned yet
    unreturned_lines: dict[int, tuple[int, ...]] = field(default_factory=dict)
    first_counted_by_entry: bool = False  # the timed twin: the entry bumped its first run's counter
    globals: dict[str, object] = field(default_factory=dict)
    remote: set[int] = field(default_factory=set)
    fetched: set[int] = field(default_factory=set)  # remote values already fetched in scope
    names: Namespace = field(default_factory=Namespace)

    def __post_init__(self) -> None:
        # Which values are ObjectRefs follows from the nodes' modes alone.
        remote_modes = frozenset(m for m, launcher in self.launchers.items() if launcher.remote)
        self.remote = remote_values(self.graph, remote_modes)
        for name in RUNTIME_NAMES:
            self.names.reserve(name)

    def emit(self, indent: int, text: str, node_id: int | None = None) -> None:
        self.lines.append("    " * indent + text)
        # +1: lines are 1-based; the def line is added before them.
        line = len(self.lines) + 1
        if node_id is not None:
            self.line_nodes[line] = node_id
        if self.unreturned:
            self.unreturned_lines[line] = tuple(self.unreturned)

    def local_calls(self, items: Block) -> tuple[int, ...]:
        """The LOCAL calls a straight run of items makes (LOCAL groups run
        inline), in order."""
        found: list[int] = []
        for item in items:
            if isinstance(item, Call) and not self.launchers[self.graph.step(item.step).placement.mode].remote:
                found.append(item.id)
            elif isinstance(item, Fused) and not self.launchers[item.placement.mode].remote:
                found.extend(self.local_calls(item.body))
        return tuple(found)

    def counted_calls(self, items: Block) -> tuple[int, ...]:
        """The LOCAL calls of a straight run that a counter counts: none
        without probes."""
        return self.local_calls(items) if self.probes is not None else ()

    def counter(self, ids: tuple[int, ...]) -> str:
        """The global counting a call of each of `ids` (LOCAL calls of one
        straight run; there are probes) per bump."""
        assert self.probes is not None and ids
        names = [self.graph.step(n.step).name for n in map(self.graph.node, ids) if isinstance(n, Call)]
        label = names[0] if len(names) == 1 else f"{names[0]}_to_{names[-1]}"
        return self.bind(("count", ids), f"count_{label}", self.probes.counter(ids))

    def straight(self, indent: int, items: Block, counted: bool = False) -> None:
        """A straight run of items (no branches): one counter bump for its
        LOCAL calls first (unless `counted`: the entry bumped it)."""
        ids = self.counted_calls(items)
        if ids:
            if not counted:
                self.emit(indent, f"next({self.counter(ids)})")
            self.unreturned = list(ids)
        for item in items:
            assert not isinstance(item, Branches), "a straight run ends at a branch"
            self.node(indent, item)
        self.unreturned = []

    def bind(self, key: Hashable, candidate: str, value: object) -> str:
        """A global holding `value`, named once per `key`."""
        name = self.names.name(("global", key), candidate)
        self.globals[name] = value
        return name

    def var(self, node_id: int) -> str:
        """The variable holding node `node_id`'s value (an ObjectRef for a
        remote value)."""
        return self.names.name(("value", node_id), f"v{node_id}")

    def local(self, node_id: int, indent: int) -> str:
        """A variable holding the node's value in this process. A remote
        value is fetched once, where first needed: the fetch is emitted
        before the statement being built, and later readers in the same
        block or nested blocks reuse it (a channel unit's CompiledDAGRef
        can be fetched only once)."""
        if node_id not in self.remote:
            return self.var(node_id)
        name = self.names.name(("fetched", node_id), f"f{node_id}")
        if node_id not in self.fetched:
            get = f"await _aget({self.var(node_id)}, {node_id})" if self.is_async else f"_get({self.var(node_id)}, {node_id})"
            self.emit(indent, f"{name} = {get}", node_id)
            self.fetched.add(node_id)
        return name

    def arguments(self, node: Call, fetch: bool, indent: int) -> str:
        def ref(i: int) -> str:
            return self.local(i, indent) if fetch else self.var(i)

        parts = [ref(a) for a in node.args]
        plain = [(k, v) for k, v in node.kwargs if k.isidentifier() and not keyword.iskeyword(k)]
        # `f(**{"a b": 1})` reaches a **kwargs step with a key no `k=v` can spell.
        odd = [(k, v) for k, v in node.kwargs if (k, v) not in plain]
        parts += [f"{k}={ref(v)}" for k, v in plain]
        if odd:
            parts.append("**{" + ", ".join(f"{k!r}: {ref(v)}" for k, v in odd) + "}")
        return ", ".join(parts)

    def node(self, indent: int, node: AnyNode) -> None:
        match node:
            case Input():
                pass
            case Constant(value=value):
                obj = value.value if isinstance(value, Inline) else self.constants[value.key]
                self.emit(indent, f"{self.var(node.id)} = {self.bind(('constant', node.id), f'c{node.id}', obj)}")
            case Call():
                step = self.graph.step(node.step)
                launcher = self.launchers[step.placement.mode]
                # One global per step key: every call of a step shares it.
                name = self.bind(("step", step.key), step.name, launcher.callee(node))
                args = self.arguments(node, not launcher.remote, indent)
                probes = self.probes if not launcher.remote else None
                timer = self.names.name(("clock", node.id), f"t{node.id}") if probes and self.timed else None
                if timer is not None:
                    self.emit(indent, f"{timer} = _clock()")
                self.emit(indent, f"{self.var(node.id)} = {launcher.expr(node, name, args, self.is_async)}", node.id)
                if probes is not None:
                    self.unreturned.remove(node.id)  # past its line, it returned
                if probes is not None and timer is not None:
                    record = self.bind(("record", node.id), f"record_{step.name}", probes.recorder(node.id))
                    self.emit(indent, f"{record}(_clock() - {timer})")
            case Project(source=source, key=key):
                self.emit(indent, f"{self.var(node.id)} = {self.local(source, indent)}[{key!r}]", node.id)
            case Fused(placement=placement, inputs=inputs):
                launcher = self.launchers[placement.mode]
                if not launcher.remote:
                    for inner in node.body:
                        self.node(indent, inner)
                    self.emit(indent, f"{self.var(node.id)} = {self.var(node.output)}")
                    return
                name = self.bind(("group", node.id), f"group{node.id}", launcher.callee(node))
                args = ", ".join(self.var(i) for i in inputs)
                self.emit(indent, f"{self.var(node.id)} = {launcher.expr(node, name, args, self.is_async)}", node.id)
            case Switch():
                raise AssertionError("switches are emitted from their Branches block")

    def block(self, indent: int, items: Block, first_counted: bool = False) -> None:
        """Items, as straight runs between branches (`first_counted`: the
        entry bumped the first run's counter already)."""
        start = 0
        for i, item in enumerate([*items, None]):
            if item is None or isinstance(item, Branches):
                if i > start:
                    self.straight(indent, items[start:i], counted=first_counted and start == 0)
                if isinstance(item, Branches):
                    self.branches(indent, item)
                start = i + 1

    def branches(self, indent: int, item: Branches) -> None:
        sw = item.switch
        key_var = self.names.name(("key", sw.id), f"k{sw.id}")
        self.emit(indent, f"{key_var} = {self.local(sw.key, indent)}", sw.id)
        arms: list[tuple[str, Block, int]] = []
        for i, (case, body) in enumerate(zip(sw.cases, item.arms)):
            value = self.bind(("case", sw.id, i), f"case{sw.id}_{i}", case.value)
            arms.append((f"{'if' if i == 0 else 'elif'} {key_var} == {value}:", body, case.branch))
        if item.default is not None and sw.default is not None:
            arms.append(("else:" if arms else "if True:", item.default, sw.default))
        all_remote = sw.id in self.remote
        for cond, body, branch in arms:
            self.emit(indent, cond)
            outer = set(self.fetched)  # what an arm fetches is not fetched after it
            self.block(indent + 1, body)
            value = self.var(branch) if all_remote else self.local(branch, indent + 1)
            self.emit(indent + 1, f"{self.var(sw.id)} = {value}", sw.id)
            self.fetched = outer
        if item.default is None or sw.default is None:
            self.emit(indent, "else:" if arms else "if True:")
            self.emit(indent + 1, f"raise _no_match({sw.id}, {key_var})", sw.id)

    def function(self, name: str, params: tuple[int, ...], items: Block, outputs: tuple[int, ...], multi: bool) -> PythonCode:
        entry = self.names.name(("entry",), name)
        param_names = [self.var(p) for p in params]  # allocated before the body's names
        first = self.counted_calls(_first_run(items))
        if self.sampled is not None:
            _, timed, every = self.sampled
            assert every > 0 and every & (every - 1) == 0, "a power of two: one AND picks the sampled calls"
            # The first run's counter doubles as the tick; the timed twin
            # then leaves that bump to this entry (`first_counted_by_entry`).
            tick = self.counter(first) if first else self.bind(("tick",), "_tick", itertools.count())
            sampled = self.bind(("timed",), "_timed", timed)
            self.emit(1, f"if not next({tick}) & {every - 1}:")
            self.emit(2, f"return {'await ' if self.is_async else ''}{sampled}({', '.join(param_names)})")
        self.block(1, items, first_counted=bool(first) and (self.sampled is not None or self.first_counted_by_entry))
        remote_outs = list(dict.fromkeys(o for o in outputs if o in self.remote and o not in self.fetched))
        fetched = self.names.name(("fetched-outputs",), "fetched")
        if remote_outs:
            refs = ", ".join(self.var(o) for o in remote_outs)
            ids = ", ".join(str(o) for o in remote_outs)
            fetch = f"await _aget_many(({refs},), ({ids},))" if self.is_async else f"_get_many(({refs},), ({ids},))"
            self.emit(1, f"{fetched} = {fetch}")
        values = [f"{fetched}[{remote_outs.index(o)}]" if o in remote_outs else self.local(o, 1) for o in outputs]
        self.emit(1, f"return ({', '.join(values)},)" if multi else f"return {values[0]}")
        head = f"{'async def' if self.is_async else 'def'} {entry}({', '.join(param_names)}):"
        source = "\n".join([head, *self.lines]) + "\n"
        self.globals["_no_match"] = _no_match_factory(self.graph)
        filename = f"<pipeline_ir {self.graph.name} {entry} #{next(_counter)}>"
        inner = self.sampled[0] if self.sampled is not None else None
        return PythonCode(source, self.globals, self.line_nodes, filename, entry, self.unreturned_lines, inner)


def _first_run(items: Block) -> Block:
    """The items before the first branch."""
    for i, item in enumerate(items):
        if isinstance(item, Branches):
            return items[:i]
    return items


def _no_match_factory(graph: Graph) -> Callable[[int, object], StepError]:
    def no_match(node_id: int, key: object) -> StepError:
        node = graph.node(node_id)
        cases = [c.value for c in node.cases] if isinstance(node, Switch) else []
        return StepError(
            node_label(graph, node_id),
            node_id,
            KeyError(key),
            message=f"switch (node %{node_id}) has no branch for key {key!r} and no default; branches: {cases}",
        )

    return no_match


def generate(
    graph: Graph,
    launchers: Mapping[Mode, Launcher],
    constants: Mapping[str, object],
    runtime: Mapping[str, object],
    *,
    is_async: bool = False,
    probes: Probes | None = None,
    timed: bool = False,
    sampled: tuple[PythonCode, Callable[..., object], int] | None = None,
    counted_by_entry: bool = False,
) -> PythonCode:
    """The program that runs one call of `graph`: `run(v0)` or `arun(v0)`.
    With `probes`, LOCAL calls are counted and, when `timed`, timed
    through the `_clock` helper that `runtime` then provides. With
    `sampled` (a timed program, the function it loaded as, n), one call
    in n runs that program instead: Pipeline.stats()' latencies, at a
    fraction of the cost of timing every call; that program is generated
    with `counted_by_entry` (the entry bumps its first counter)."""
    emitter = _Emitter(graph, launchers, constants, is_async, probes, timed, sampled, first_counted_by_entry=counted_by_entry)
    emitter.globals.update(runtime)
    items = schedule(graph.nodes, graph.outputs)
    return emitter.function("arun" if is_async else "run", (0,), items, graph.outputs, graph.multi_output)


def generate_body(graph: Graph, fused: Fused, launcher: Launcher, constants: Mapping[str, object]) -> PythonCode:
    """The function a remote fused group runs: its inputs in, output out.

    Only local calls happen inside a group, so `launcher` is a local one."""
    emitter = _Emitter(graph, {fused.placement.mode: launcher}, constants, is_async=False)
    return emitter.function(f"group{fused.id}", fused.inputs, tuple(fused.body), (fused.output,), False)


def translate_error(exc: BaseException, code: PythonCode, graph: Graph) -> BaseException:
    """The error a user sees for `exc` raised while running `code`.

    A StepError passes through (a remote step already named itself). Else
    the innermost line of generated code in the traceback names the node.
    """
    if isinstance(exc, (StepError, PipelineTimeoutError)) or not isinstance(exc, Exception):
        return exc
    found = _innermost(exc, code)
    node_id = None if found is None else found[0].line_nodes.get(found[1])
    if node_id is None:
        return exc
    return StepError(node_label(graph, node_id), node_id, exc)


def unreturned_at(exc: BaseException, code: PythonCode) -> tuple[int, ...]:
    """The LOCAL calls counted as their straight run of `code` began that
    never returned, `exc` having stopped the run first."""
    found = _innermost(exc, code)
    return () if found is None else found[0].unreturned.get(found[1], ())


def _innermost(exc: BaseException, code: PythonCode) -> tuple[PythonCode, int] | None:
    """The program (`code` or the timed one it hands calls to) and line
    the exception passed through last: the line its frame was running
    when it was raised or propagated."""
    codes = {c.filename: c for c in (code, code.inner) if c is not None}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        program = codes.get(tb.tb_frame.f_code.co_filename)
        if program is not None:
            found = (program, tb.tb_lineno)
        tb = tb.tb_next
    return found
