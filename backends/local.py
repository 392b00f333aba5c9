"""The LOCAL backend: steps called inline, in the caller's process.

`LocalLauncher` spells a local call as a plain Python call of the function,
or of the class instance it builds at deploy time. It also runs the bodies
of fused groups inside Ray workers and actors, where every call is local.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from pipeline_ir.bindings import StepBinding
from pipeline_ir.errors import StepError
from pipeline_ir.ir.graph import Graph
from pipeline_ir.ir.nodes import Call, Fused


def instantiate(graph: Graph, key: str, binding: StepBinding) -> Callable[..., object]:
    """The callable for step `key`: the function, or a new instance of the
    class built with its init args (a constructor failure names the step
    and its first call)."""
    step = graph.step(key)
    if step.kind == "function":
        return binding.target
    try:
        instance = binding.target(*binding.init_args, **binding.init_kwargs)
    except Exception as e:
        node_id = graph.callers(key)[0].id
        raise StepError(
            step.name, node_id, e, message=f"step {step.name!r} (node %{node_id}) failed in its constructor: {type(e).__name__}: {e}"
        ) from e
    assert callable(instance)
    return instance


def single_items(graph: Graph, key: str, obj: Callable[..., object]) -> Callable[..., object]:
    """How a call site calls step `key`: a batched step's callable takes a
    list, so outside a batching replica (LOCAL, TASKS, a forced backend)
    each call is a batch of one (backends/batching.py)."""
    if graph.step(key).placement.batching is None:
        return obj
    from pipeline_ir.backends.batching import one_at_a_time

    return one_at_a_time(obj)


class LocalLauncher:
    """Calls steps in this process. Class steps are instantiated once, here."""

    remote = False

    def __init__(self, graph: Graph, steps: Mapping[str, StepBinding], keys: Iterable[str]) -> None:
        self.objects: dict[str, Callable[..., object]] = {
            key: single_items(graph, key, instantiate(graph, key, steps[key])) for key in keys
        }

    def callee(self, node: Call | Fused) -> object:
        assert isinstance(node, Call), "local fused groups are emitted inline"
        return self.objects[node.step]

    def expr(self, node: Call | Fused, callee: str, args: str, is_async: bool = False) -> str:
        return f"{callee}({args})"
