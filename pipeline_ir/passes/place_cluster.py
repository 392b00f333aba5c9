"""`Cluster`: what the `place` pass knows of a Ray cluster, as plain data.

A snapshot of the alive nodes, each with its total and available CPUs,
GPUs, memory and custom resources. The Ray backend takes it at deploy
(`backends/ray_runtime.cluster_snapshot()`); tests and docs build one by
hand (`Cluster.single(cpus=4)`). Nothing here imports Ray, and nothing
here decides: the pass does (place.py).
"""

from __future__ import annotations

import msgspec


class Resources(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Amounts of Ray's resources (logical units, memory in bytes)."""

    cpu: float = 0.0
    gpu: float = 0.0
    memory: float = 0.0
    # Custom resources ("TPU", user labels given as resources), by name.
    custom: tuple[tuple[str, float], ...] = ()

    def text(self) -> str:
        """`CPU=4, GPU=1`: the CPUs and GPUs (what placements ask for)."""
        return f"CPU={self.cpu:g}, GPU={self.gpu:g}"


class ClusterNode(msgspec.Struct, frozen=True, kw_only=True):
    """One alive node: Ray's node id, and what it has in all and free now."""

    id: str
    total: Resources
    available: Resources
    address: str = ""

    @property
    def name(self) -> str:
        """How records and errors call the node: its address (else its id)."""
        return self.address or self.id[:8]


class Cluster(msgspec.Struct, frozen=True, kw_only=True):
    """The alive nodes of a Ray cluster at one moment.

    `available` is what Ray reported free when the snapshot was taken
    (other pipelines' replicas and running tasks hold the rest);
    `available_known` is False when the backend could not read it, and it
    then equals `total`.
    """

    nodes: tuple[ClusterNode, ...]
    available_known: bool = True

    @staticmethod
    def single(cpus: float, gpus: float = 0.0, memory: float = 0.0) -> Cluster:
        """A one-node cluster with everything free (tests, docs)."""
        res = Resources(cpu=cpus, gpu=gpus, memory=memory)
        return Cluster(nodes=(ClusterNode(id="0" * 56, total=res, available=res, address="node0"),))

    def total(self) -> Resources:
        """The CPUs and GPUs of all nodes together."""
        return Resources(cpu=sum(n.total.cpu for n in self.nodes), gpu=sum(n.total.gpu for n in self.nodes))

    def free(self) -> Resources:
        """The CPUs and GPUs free on all nodes together."""
        return Resources(cpu=sum(n.available.cpu for n in self.nodes), gpu=sum(n.available.gpu for n in self.nodes))

    def text(self) -> str:
        """`2 nodes, CPU=6, GPU=1 in all (CPU=4, GPU=1 free)`."""
        count = f"{len(self.nodes)} node{'' if len(self.nodes) == 1 else 's'}"
        return f"{count}, {self.total().text()} in all ({self.free().text()} free)"
