"""The pass manager: runs passes in order and keeps what each rewrote.

A pass is a pure function `Graph -> PassResult`: the new graph and one line
per rewrite saying what changed and why. A pass that changes nothing returns
the very same Graph object, so "changed?" is an identity check. With
`verify_each=True` (tests, and `compile(debug=True)`) the graph is verified
and type-checked after every pass, and a failure names the pass and the
passes that ran before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline_ir.errors import GraphError, PipelineTypeError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.verify import check_types, verify


@dataclass(frozen=True)
class PassResult:
    """What one pass produced: the graph and its rewrites, one line each."""

    graph: Graph
    rewrites: tuple[str, ...] = ()


Pass = Callable[[Graph], PassResult]


@dataclass(frozen=True)
class PassRecord:
    """One pass as it ran within compile(): its name and rewrites."""

    name: str
    rewrites: tuple[str, ...]
    changed: bool


def pass_name(p: Pass) -> str:
    """A pass's name: its function name (partials included)."""
    inner = getattr(p, "func", p)
    return str(getattr(inner, "__name__", repr(inner)))


def run_passes(graph: Graph, passes: Sequence[Pass], *, verify_each: bool = False) -> tuple[Graph, tuple[PassRecord, ...]]:
    """Run `passes` in order on `graph`; return the result and the records."""
    records: list[PassRecord] = []
    for p in passes:
        name = pass_name(p)
        result = p(graph)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {name!r} returned {type(result).__name__}, not a PassResult")
        changed = result.graph is not graph
        if verify_each and changed:
            before = ", ".join(r.name for r in records) or "none"
            try:
                verify(result.graph)
                check_types(result.graph)
            except (GraphError, PipelineTypeError) as e:
                raise GraphError(f"pass {name!r} (after passes: {before}) produced an invalid graph: {e}") from e
        records.append(PassRecord(name=name, rewrites=result.rewrites, changed=changed))
        graph = result.graph
    return graph, tuple(records)


def explain(records: Sequence[PassRecord]) -> str:
    """The records as text: each pass, then what it rewrote and why."""
    if not records:
        return "no passes ran (optimize=False)"
    lines: list[str] = []
    for r in records:
        if not r.rewrites:
            lines.append(f"{r.name}: no change")
            continue
        lines.append(f"{r.name}:")
        lines.extend(f"  - {w}" for w in r.rewrites)
    return "\n".join(lines)
