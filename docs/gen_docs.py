"""Regenerates the generated parts of docs/ir.md and docs/user-guide.md, and
docs/graph.schema.json, by running the code they describe.

    python docs/gen_docs.py          # rewrite them
    python docs/gen_docs.py --check  # exit 1 if any is stale

A block between `<!-- generated: NAME -->` and `<!-- end: NAME -->` (the
convention of gen_passes.py, which owns docs/passes.md) is the output of
the function NAME below. tests/test_docs.py runs the check, so dumps, error
messages and the schema in the docs cannot drift from the code. Run it as a
script: steps defined here are `__main__` steps, as in a user's script.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import torch

import pipeline_ir as pipeline

DOCS = Path(__file__).resolve().parent
SCHEMA = DOCS / "graph.schema.json"


def fence(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


# -- steps of the examples --


@pipeline.step
def decode(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.float32)


@pipeline.step(execution_mode="tasks")
def normalize(image: np.ndarray, mean: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return (image - mean.mean()) * scale


@pipeline.step(execution_mode="actors", num_replicas=2, num_gpus=1)
class Model:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(image)


@pipeline.step
def top(scores: torch.Tensor, k: int) -> list[int]:
    return scores.topk(k).indices.tolist()


@pipeline.step
def describe(labels: list[int]) -> str:
    return ", ".join(map(str, labels))


@pipeline.step
def add_one(x: int) -> int:
    return x + 1


@pipeline.step
def double(x: int) -> int:
    return x * 2


@pipeline.step(execution_mode="tasks", name="double")
def double_in_tasks(x: int) -> int:
    return x * 2


@pipeline.step(execution_mode="actors", num_replicas=2)
class Adder:
    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self, x: int) -> int:
        return x + self.value


@pipeline.step
def shout(text: str) -> str:
    return text.upper()


def every_op() -> pipeline.PipelineNode:
    """One pipeline with every op kind the tracer records."""
    image = normalize(decode(pipeline.INPUT["image"]), np.zeros(3, np.float32), scale=0.5)
    scores = pipeline.switch(pipeline.INPUT["model"], {"a": Model("a")(image)}, default=Model("b")(image))
    return describe(top(scores, 3))


# -- ir.md --


def ir_ops() -> str:
    compiled = pipeline.compile(every_op())
    return (
        "As traced (`compiled.source_graph.dump()`):\n\n"
        + fence(compiled.source_graph.dump())
        + "\n\nAfter the default passes (`compiled.graph.dump()`):\n\n"
        + fence(compiled.graph.dump())
    )


def ir_json() -> str:
    graph = pipeline.compile(double(add_one(pipeline.INPUT)), optimize=False).graph
    return fence(json.dumps(json.loads(graph.to_json()), indent=2), "json")


def ir_dot() -> str:
    return fence(pipeline.compile(double(add_one(pipeline.INPUT))).graph.to_dot(), "dot")


def ir_type_error() -> str:
    try:
        pipeline.compile(shout(add_one(pipeline.INPUT)))
    except pipeline.PipelineTypeError as e:
        return fence(f"pipeline_ir.errors.PipelineTypeError: {e}")
    raise AssertionError("compile() accepted an int where a str is expected")


# -- user-guide.md --


def _error(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{fn} raised nothing")


def guide_build_errors() -> str:
    def f(x: int) -> int:
        return x

    node = add_one(pipeline.INPUT)
    cases: list[tuple[str, Callable[[], object]]] = [
        ('pipeline.step(execution_mode="gpu")(f)', lambda: pipeline.step(execution_mode="gpu")(f)),
        ("pipeline.step(execution_mode=3)(f)", lambda: pipeline.step(execution_mode=3)(f)),  # type: ignore[call-overload]
        ('pipeline.step(execution_mode="actors", num_replicas=0)(f)', lambda: pipeline.step(execution_mode="actors", num_replicas=0)(f)),
        ("pipeline.step(num_replicas=2)(f)", lambda: pipeline.step(num_replicas=2)(f)),
        ("add_one(add_one)", lambda: add_one(add_one)),
        ("add_one(Adder)", lambda: add_one(Adder)),
        ("add_one(Adder(1))", lambda: add_one(Adder(1))),
        ("add_one([node])", lambda: add_one([node])),
        ("add_one(pipeline.INPUT, 2)", lambda: add_one(pipeline.INPUT, 2)),
        ("Adder(node)", lambda: Adder(node)),
        ("if node: ...", lambda: bool(node)),
        ("a, b = node", lambda: list(node)),
        ("pipeline.switch(pipeline.INPUT, {1.5: node})", lambda: pipeline.switch(pipeline.INPUT, {1.5: node})),  # type: ignore[dict-item]
        ('pipeline.compile(node, backend="gpu")', lambda: pipeline.compile(node, backend="gpu")),  # type: ignore[arg-type]
        ("pipeline.compile(shout(add_one(pipeline.INPUT)))", lambda: pipeline.compile(shout(add_one(pipeline.INPUT)))),
    ]
    return fence("\n\n".join(f">>> {code}\n{_error(fn)}" for code, fn in cases))


def guide_sync_steps() -> str:
    def tokens(text: str):  # type: ignore[no-untyped-def]
        yield from text.split()

    async def fetch(url: str) -> bytes:
        return url.encode()

    class Model:
        async def __call__(self, x: int) -> int:
            return x

    cases: list[tuple[str, Callable[[], object]]] = [
        ("pipeline.step(tokens)   # def tokens(text): yield from text.split()", lambda: pipeline.step(tokens)),
        ("pipeline.step(fetch)    # async def fetch(url): ...", lambda: pipeline.step(fetch)),
        ("pipeline.step(Model)    # class Model: async def __call__(self, x): ...", lambda: pipeline.step(Model)),
    ]
    return fence("\n\n".join(f">>> {code}\n{_error(fn)}" for code, fn in cases))


def guide_run_errors() -> str:
    @pipeline.step
    def divide(x: int) -> float:
        return 1 / x

    lines = []
    with divide(pipeline.INPUT).deploy() as p:
        try:
            p.call(0)
        except pipeline.StepError as e:
            lines.append(f">>> p.call(0)\nStepError: {e}")
            lines.append(f">>> e.step_name, e.node_id, repr(e.__cause__)\n{(e.step_name, e.node_id, repr(e.__cause__))!r}")
        lines.append(f">>> p.call(4)   # still usable\n{p.call(4)!r}")
    lines.append(f">>> p.call(4)   # after shutdown\n{_error(lambda: p.call(4))}")
    branch = pipeline.switch(pipeline.INPUT["kind"], {"a": add_one(pipeline.INPUT["x"])})
    with branch.deploy() as q:
        lines.append(f'>>> q.call({{"kind": "b", "x": 1}})   # a switch with no default\n{_error(lambda: q.call({"kind": "b", "x": 1}))}')
    return fence("\n\n".join(lines))


def guide_compile() -> str:
    node = Adder(10)(double_in_tasks(add_one(pipeline.INPUT)))
    compiled = pipeline.compile(node)
    local = pipeline.compile(node, backend="local")
    return "\n\n".join(
        fence(text)
        for text in (
            ">>> print(compiled.source_graph.dump())\n" + compiled.source_graph.dump(),
            ">>> print(compiled.graph.dump())\n" + compiled.graph.dump(),
            ">>> print(compiled.explain())\n" + compiled.explain(),
            '>>> local = pipeline.compile(node, backend="local")\n>>> print(local.graph.dump())\n' + local.graph.dump(),
            ">>> print(local.explain())\n" + local.explain(),
        )
    )


CLI_MODULE = '''\
import pipeline_ir as pipeline

@pipeline.step
def add_one(x: int) -> int:
    return x + 1

@pipeline.step(execution_mode="tasks")
def double(x: int) -> int:
    return x * 2

chain = double(add_one(pipeline.INPUT))
compiled = pipeline.compile(chain, backend="local")
'''


def guide_cli() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "my_pipelines.py").write_text(CLI_MODULE)
        shown = []
        for args in (["my_pipelines:chain"], ["my_pipelines:compiled"], ["my_pipelines:compiled", "--raw"], ["my_pipelines:nothing"]):
            proc = subprocess.run(
                [sys.executable, "-m", "pipeline_ir", "dump", *args], cwd=tmp, capture_output=True, text=True, timeout=60
            )
            status = "" if proc.returncode == 0 else f"\n$ echo $?\n{proc.returncode}"
            shown.append(f"$ python -m pipeline_ir dump {' '.join(args)}\n{(proc.stdout + proc.stderr).rstrip()}{status}")
    return fence(CLI_MODULE, "python") + "\n\n" + fence("\n".join(shown), "console")


EXAMPLES: dict[str, Callable[[], str]] = {
    f.__name__: f
    for f in (ir_ops, ir_json, ir_dot, ir_type_error, guide_build_errors, guide_sync_steps, guide_run_errors, guide_compile, guide_cli)
}
PAGES = [DOCS / "ir.md", DOCS / "user-guide.md"]
_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n).*?(\n<!-- end: \2 -->)", re.DOTALL)


def render(text: str) -> str:
    """`text` with every generated block replaced by its current output."""
    return _BLOCK.sub(lambda m: m.group(1) + EXAMPLES[m.group(2)]() + m.group(3), text)


def schema() -> str:
    return json.dumps(msgspec.json.schema(pipeline.Graph), indent=2) + "\n"


def main(argv: list[str]) -> int:
    os.environ.pop("PIPELINE_IR_BACKEND", None)  # the docs show each step's own mode
    check = "--check" in argv
    wanted = {SCHEMA: schema(), **{page: render(page.read_text()) for page in PAGES}}
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if check:
        for path in stale:
            print(f"{path.relative_to(DOCS.parent)} is stale: run python docs/gen_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"rewrote {path.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
