"""Colocation on a real 3-node Ray cluster (`ray.cluster_utils.Cluster`):
run as a script, in its own process (one Ray per process), by
tests/test_colocation_cluster.py. Prints one JSON line of what it saw.

The cluster: a head with 1 CPU, a GPU node (2 CPUs, 1 logical GPU) and a
CPU node (2 CPUs). The pipeline `prep -> Model -> Filler -> post` passes
numpy arrays along, so the colocate pass gives all four one label; each
step appends the id of the node it ran on to the array.

1. Busy node: the GPU replica holds 1 CPU and the GPU, the Filler replica
   (preferring the label's node) the other CPU: the GPU node has no CPU
   left, and the tasks preferring it must run elsewhere at once.
2. Node loss: the GPU node is removed and a new one (3 CPUs, 1 GPU)
   joins; once the replicas are replaced, the label points at the new
   node, and the tasks run there again (it has a CPU free).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

import pipeline_ir as pipeline


def _node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _stamp(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.frombuffer(("," + _node()).encode(), dtype=np.uint8)])


@pipeline.step(execution_mode="tasks")
def prep(x: int) -> np.ndarray:
    return np.frombuffer(_node().encode(), dtype=np.uint8)


@pipeline.step(execution_mode="actors", num_gpus=1)
class Model:
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _stamp(x)


# fuse=False: a replica of its own that holds the GPU node's other CPU (a
# small CPU step would otherwise be folded into Model's actor).
@pipeline.step(execution_mode="actors", num_cpus=1, fuse=False)
class Filler:
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return _stamp(x)


@pipeline.step(execution_mode="tasks")
def post(x: np.ndarray) -> list[str]:
    return bytes(_stamp(x)).decode().split(",")


def _call_until_it_works(p: Any, seconds: float) -> list[str]:
    """Calls fail while the lost node's replicas are being replaced."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return p.call(1, timeout=20)  # type: ignore[no-any-return]
        except (pipeline.StepError, pipeline.PipelineTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    gpu = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out: dict[str, Any] = {"gpu_node": gpu.node_id}
    try:
        compiled = pipeline.compile(post(Filler()(Model()(prep(pipeline.INPUT)))))
        out["dump"] = compiled.graph.dump()
        with compiled.deploy() as p:
            out["explain"] = p.compiled.explain()
            start = time.monotonic()
            out["busy"] = p.call(1, timeout=30)
            out["busy_first_call_s"] = time.monotonic() - start
            launcher = p._program.closers[0].__self__
            label = compiled.graph.step("Model").placement.colocate
            cluster.remove_node(gpu)
            new = cluster.add_node(num_cpus=3, num_gpus=1)
            cluster.wait_for_nodes()
            out["new_node"] = new.node_id
            _call_until_it_works(p, 60)
            # The replacements are up once a call went through: the label follows them.
            out["label_node"] = launcher.colocation.node(label)
            out["after_loss"] = p.call(1, timeout=30)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
