"""Regenerates the dumps in docs/passes.md from the example pipelines here.

    python docs/gen_passes.py          # rewrite the generated blocks
    python docs/gen_passes.py --check  # exit 1 if docs/passes.md is stale

Each block between `<!-- generated: NAME -->` and `<!-- end: NAME -->` in
passes.md is the output of the function `NAME` below: the graph before,
the graph after, and what the pass recorded. tests/test_docs_passes.py
runs the check, so the document cannot drift from the code.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import torch

import pipeline_ir as pipeline
from pipeline_ir.compile import CompiledPipeline
from pipeline_ir.ir.graph import Graph
from pipeline_ir.passes import (
    Pass,
    colocate,
    colocate_actors,
    eliminate_common,
    eliminate_dead,
    fuse_local,
    fuse_tasks,
    place,
    run_passes,
    use_channels,
)
from pipeline_ir.passes.manager import explain
from pipeline_ir.passes.place_cluster import Cluster, ClusterNode, Resources

DOC = Path(__file__).with_name("passes.md")


# -- steps of the examples --


@pipeline.step(execution_mode="tasks")
def decode(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


@pipeline.step(execution_mode="tasks")
def resize(image: np.ndarray) -> np.ndarray:
    return image[:224]


@pipeline.step(execution_mode="tasks", num_gpus=1)
def embed(image: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(image)


@pipeline.step(execution_mode="actors", num_replicas=2, num_gpus=1)
class Classifier:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(image)


@pipeline.step(execution_mode="actors", num_replicas=2, num_gpus=1)
class TopK:
    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, scores: torch.Tensor) -> list[int]:
        return scores.topk(self.k).indices.tolist()


@pipeline.step(execution_mode="actors")
class Logger:
    def __call__(self, labels: list[int]) -> list[int]:
        return labels


@pipeline.step(pure=True)
def tokenize(text: str) -> list[str]:
    return text.split()


@pipeline.step
def count(tokens: list[str]) -> int:
    return len(tokens)


@pipeline.step
def ratio(a: int, b: list[str]) -> float:
    return a / max(len(b), 1)


@pipeline.step
def label(x: float) -> str:
    return f"{x:.2f}"


# -- the examples: each returns the text of one generated block --


def _block(before: Graph, after: Graph, records: str) -> str:
    return f"Before:\n\n```\n{before.dump()}\n```\n\nAfter:\n\n```\n{after.dump()}\n```\n\nexplain():\n\n```\n{records}\n```"


def _run(node: pipeline.PipelineNode | tuple[pipeline.PipelineNode, ...], passes: list[Pass], name: str, pre: list[Pass] | None = None) -> str:
    before = pipeline.compile(node, optimize=False, name=name).graph
    if pre:
        before, _ = run_passes(before, pre)
    after, records = run_passes(before, passes, verify_each=True)
    return _block(before, after, explain(records))


def eliminate_dead_example() -> str:
    tokens = tokenize(pipeline.INPUT)
    traced = pipeline.compile((label(ratio(count(tokens), tokens)), count(tokens)), optimize=False, name="stats").graph
    # As if edited by hand or decoded from JSON: only the first output is kept.
    before = msgspec.structs.replace(traced, outputs=traced.outputs[:1], multi_output=False)
    after, records = run_passes(before, [eliminate_dead], verify_each=True)
    return _block(before, after, explain(records))


def eliminate_common_example() -> str:
    node = ratio(count(tokenize(pipeline.INPUT)), tokenize(pipeline.INPUT))
    return _run(node, [eliminate_common], "stats")


def fuse_local_example() -> str:
    tokens = tokenize(pipeline.INPUT)
    return _run(label(ratio(count(tokens), tokens)), [fuse_local], "stats")


def fuse_tasks_example() -> str:
    return _run(embed(resize(decode(pipeline.INPUT))), [fuse_tasks], "embed")


def colocate_actors_example() -> str:
    x = decode(pipeline.INPUT)
    shared = Classifier("resnet34")
    node = (TopK(5)(Classifier("resnet18")(x)), TopK(3)(shared(x)), shared(resize(x)))
    return _run(node, [colocate_actors], "classify")


@pipeline.step(execution_mode="actors", num_replicas=2)
def normalize(image: np.ndarray) -> np.ndarray:
    return image / 255


@pipeline.step(execution_mode="actors", num_replicas=2)
def to_labels(scores: torch.Tensor) -> list[int]:
    return scores.argmax().tolist()  # type: ignore[no-any-return]


@pipeline.step(execution_mode="actors", num_replicas=2, num_cpus=4)
class Augment:
    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image[::-1]


def colocate_actors_fold_example() -> str:
    x = decode(pipeline.INPUT)
    node = (to_labels(Classifier("resnet18")(normalize(x))), Classifier("resnet50")(Augment()(x)))
    return _run(node, [colocate_actors], "classify")


def colocate_example() -> str:
    node = Logger()(TopK(5)(Classifier("resnet18")(resize(decode(pipeline.INPUT)))))
    return _run(node, [colocate], "classify", pre=[fuse_tasks, colocate_actors])


def _node(name: str, cpus: float, gpus: float = 0.0, free_cpus: float | None = None) -> ClusterNode:
    total = Resources(cpu=cpus, gpu=gpus)
    free = total if free_cpus is None else Resources(cpu=free_cpus, gpu=gpus)
    return ClusterNode(id=name.ljust(56, "0"), total=total, available=free, address=name)


# A CPU-only cluster, and one with a GPU node, as ray_runtime.cluster_snapshot() describes them.
CPU_ONLY = Cluster(nodes=(_node("10.0.0.1", 8), _node("10.0.0.2", 8)))
GPU_CLUSTER = Cluster(nodes=(_node("10.0.0.1", 4), _node("10.0.0.2", 8, gpus=2), _node("10.0.0.3", 8, free_cpus=2)))


def _classify() -> pipeline.PipelineNode:
    return TopK(5)(Classifier("resnet18")(resize(decode(pipeline.INPUT))))


def place_example() -> str:
    graph = pipeline.compile(_classify(), optimize=False, name="classify").graph
    graph, _ = run_passes(graph, [fuse_tasks, colocate_actors])
    after, records = run_passes(graph, [functools.partial(place, cluster=GPU_CLUSTER)], verify_each=True)
    assert after is graph
    return f"```\n{explain(records)}\n```"


def place_fallback_example() -> str:
    placing = functools.partial(place, cluster=CPU_ONLY, fallback=True)
    return _run(_classify(), [placing], "classify", pre=[fuse_tasks, colocate_actors])


def _error(compiled: CompiledPipeline, cluster: Cluster) -> str:
    try:
        compiled.place(cluster)
    except pipeline.PlacementError as e:
        return f"```\npipeline_ir.errors.PlacementError: {e}\n```"
    raise AssertionError("place() must fail here")


def place_gpu_error_example() -> str:
    return _error(pipeline.compile(_classify(), name="classify"), CPU_ONLY)


@pipeline.step(execution_mode="actors", num_replicas=8, num_cpus=1)
class Embedder:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(image)


def place_room_error_example() -> str:
    node = Embedder("clip")(decode(pipeline.INPUT))
    return _error(pipeline.compile(node, name="embed"), Cluster(nodes=(_node("10.0.0.1", 4),)))


@pipeline.step
def load(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


@pipeline.step
def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(image)


@pipeline.step
def summarize(x: torch.Tensor) -> float:
    return float(x.sum())


@pipeline.step(execution_mode="actors")
class Scorer:
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(image)


@pipeline.step(execution_mode="actors")
class Rank:
    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.sort().values


def use_channels_example() -> str:
    x = load(pipeline.INPUT)
    node = (summarize(Rank()(Scorer()(x))), TopK(5)(to_tensor(x)))
    return _run(node, [use_channels], "score", pre=[colocate_actors])


@pipeline.step(execution_mode="actors", idempotent=True)
class Preprocess:
    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image


@pipeline.step(execution_mode="actors", max_batch_size=8, idempotent=True)
class BatchedModel:
    def __call__(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        return [torch.as_tensor(i) for i in images]


@pipeline.step(execution_mode="actors", idempotent=True)
class Postprocess:
    def __call__(self, scores: torch.Tensor) -> list[int]:
        return scores.tolist()


def batching_example() -> str:
    x = Preprocess()(load(pipeline.INPUT))
    node = Postprocess()(BatchedModel()(Preprocess()(x)))
    return _run(node, [colocate_actors, use_channels], "batched")


def default_passes_example() -> str:
    x = decode(pipeline.INPUT)
    node = Logger()(TopK(5)(Classifier("resnet18")(resize(x))))
    compiled: CompiledPipeline = pipeline.compile(node, name="classify")
    return _block(compiled.source_graph, compiled.graph, compiled.explain())


EXAMPLES: dict[str, Callable[[], str]] = {
    f.__name__.removesuffix("_example"): f
    for f in (
        eliminate_dead_example,
        eliminate_common_example,
        fuse_local_example,
        fuse_tasks_example,
        colocate_actors_example,
        colocate_actors_fold_example,
        colocate_example,
        place_example,
        place_fallback_example,
        place_gpu_error_example,
        place_room_error_example,
        use_channels_example,
        batching_example,
        default_passes_example,
    )
}

_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n).*?(\n<!-- end: \2 -->)", re.DOTALL)


def render(text: str) -> str:
    """`text` with every generated block replaced by its current output."""
    missing = set(EXAMPLES) - set(m.group(2) for m in _BLOCK.finditer(text))
    if missing:
        raise SystemExit(f"{DOC}: no block for {sorted(missing)}")
    return _BLOCK.sub(lambda m: m.group(1) + EXAMPLES[m.group(2)]() + m.group(3), text)


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = render(text)
    if "--check" in argv:
        if new != text:
            print(f"{DOC} is stale: run python docs/gen_passes.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
