"""The objects users hold while building a pipeline: `INPUT`, the nodes that
calling a step returns, projections and `switch`.

Building records structure only; nothing runs and nothing is checked against
other nodes until compile (trace.py turns these objects into a Graph). Every
argument is checked here, as early as it can be, so that a mistake points at
the line that made it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn, Unpack

if TYPE_CHECKING:
    from pipeline_ir.options import DeployKwargs
    from pipeline_ir.pipeline import Pipeline
    from pipeline_ir.step import ConfiguredStep, FunctionStep

SwitchKey = None | bool | int | str


class PipelineNode:
    """A value of the pipeline under construction.

    Index it (`node[0]`, `node["key"]`) for a projection, pass it to other
    steps, or compile/deploy the pipeline that ends in it.
    """

    __slots__ = ()

    def __getitem__(self, key: int | str) -> ProjectNode:
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise TypeError(
                f"a pipeline node can be indexed by an int or a str, not {type(key).__name__}: "
                "write node[0] or node['key']"
            )
        return ProjectNode(self, key)

    def __iter__(self) -> NoReturn:
        # Without this, Python would iterate through __getitem__ forever.
        raise TypeError(
            f"{self!r} is a pipeline node: its value exists only when the pipeline runs, so it "
            "cannot be unpacked or iterated while building; index it instead (node[0], node[1])"
        )

    def __bool__(self) -> NoReturn:
        raise TypeError(
            f"{self!r} is a pipeline node and has no truth value while building: "
            "use pipeline.switch(key_node, {value: branch, ...}) to choose by a value"
        )

    def deploy(self, **options: Unpack[DeployKwargs]) -> Pipeline:
        """Same as `pipeline_ir.compile(self).deploy(**options)`."""
        from pipeline_ir.compile import compile as compile_

        return compile_(self).deploy(**options)


class InputNode(PipelineNode):
    """The pipeline's argument (`pipeline_ir.INPUT`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "pipeline.INPUT"


INPUT = InputNode()


class CallNode(PipelineNode):
    """The result of calling a step on nodes and values."""

    __slots__ = ("step", "args", "kwargs")

    def __init__(
        self,
        step: FunctionStep[object] | ConfiguredStep,
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        self.step = step
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"<node {self.step.name}(...)>"


class ProjectNode(PipelineNode):
    """`source[key]`."""

    __slots__ = ("source", "key")

    def __init__(self, source: PipelineNode, key: int | str) -> None:
        self.source = source
        self.key = key

    def __repr__(self) -> str:
        return f"<node {self.source!r}[{self.key!r}]>"


class SwitchNode(PipelineNode):
    """One of several branches, chosen per call by the value of `key`."""

    __slots__ = ("key", "cases", "default")

    def __init__(self, key: PipelineNode, cases: tuple[tuple[SwitchKey, object], ...], default: object) -> None:
        self.key = key
        self.cases = cases
        self.default = default

    def __repr__(self) -> str:
        return f"<node switch on {self.key!r}>"


_NO_DEFAULT = object()


def switch(
    key: PipelineNode,
    branches: Mapping[SwitchKey, object],
    default: object = _NO_DEFAULT,
) -> SwitchNode:
    """Pick one branch per call by the value of `key`; only that branch runs.

    `branches` maps each key value (None, bool, int or str) to a node or a
    plain value. With no match and no `default`, the call fails with a
    StepError whose cause is a KeyError. `default=None` means a default
    branch whose value is None.
    """
    if not isinstance(key, PipelineNode):
        raise TypeError(f"pipeline.switch: the key must be a pipeline node, got {type(key).__name__}")
    if not isinstance(branches, Mapping):
        raise TypeError("pipeline.switch: branches must be a dict {value: node_or_value}")
    if not branches and default is _NO_DEFAULT:
        raise ValueError("pipeline.switch: give at least one branch or a default")
    cases: list[tuple[SwitchKey, object]] = []
    for value, branch in branches.items():
        if value is not None and not isinstance(value, (bool, int, str)):
            raise TypeError(
                f"pipeline.switch: branch key {value!r} is a {type(value).__name__}; "
                "keys must be None, bool, int or str"
            )
        check_argument(branch, f"pipeline.switch branch {value!r}")
        cases.append((value, branch))
    if default is not _NO_DEFAULT:
        check_argument(default, "pipeline.switch default")
    return SwitchNode(key, tuple(cases), default)


def has_default(node: SwitchNode) -> bool:
    """Whether `switch()` was given a default branch."""
    return node.default is not _NO_DEFAULT


def check_argument(value: object, where: str) -> None:
    """Reject values that look like a mistake when passed to a step.

    An uncalled step, an uninstantiated class step, or a node hidden inside
    a container would otherwise become a constant and fail much later.
    """
    from pipeline_ir.step import ClassStep, ConfiguredStep, FunctionStep

    if isinstance(value, FunctionStep):
        raise TypeError(
            f"{where}: got the step {value.name!r} itself, not a node; call it on its inputs "
            f"first, e.g. {value.name}(pipeline.INPUT)"
        )
    if isinstance(value, ClassStep):
        raise TypeError(
            f"{where}: got the class step {value.name!r} itself; instantiate it with its init "
            f"args and call it on its inputs, e.g. {value.name}(...)(pipeline.INPUT)"
        )
    if isinstance(value, ConfiguredStep):
        raise TypeError(
            f"{where}: got the configured step {value.name!r} without inputs; call it on its "
            f"inputs, e.g. {value.name}(...)(pipeline.INPUT)"
        )
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        items = list(value.values()) + list(value.keys()) if isinstance(value, dict) else list(value)
        for item in items:
            if isinstance(item, (PipelineNode, FunctionStep, ClassStep, ConfiguredStep)):
                raise TypeError(
                    f"{where}: a pipeline node or step is inside a {type(value).__name__}; "
                    "nodes must be passed as arguments themselves: write f(a, b) or f(*nodes), "
                    "not f([a, b])"
                )
