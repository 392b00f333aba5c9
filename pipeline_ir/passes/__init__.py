"""Optimization passes: each a pure function Graph -> PassResult.

`default_passes()` is the order compile() runs them in (docs/passes.md
says why). `place` is not among them: it needs the Ray cluster (a
`Cluster` snapshot), so deploy runs it (`CompiledPipeline.place`).
"""

from __future__ import annotations

from pipeline_ir.passes.colocate import colocate
from pipeline_ir.passes.colocate_actors import colocate_actors
from pipeline_ir.passes.eliminate_common import eliminate_common
from pipeline_ir.passes.eliminate_dead import eliminate_dead
from pipeline_ir.passes.force_backend import force_backend
from pipeline_ir.passes.fuse_local import fuse_local
from pipeline_ir.passes.fuse_tasks import fuse_tasks
from pipeline_ir.passes.manager import Pass, PassRecord, PassResult, explain, run_passes
from pipeline_ir.passes.place import place
from pipeline_ir.passes.place_cluster import Cluster, ClusterNode, Resources
from pipeline_ir.passes.use_channels import use_channels


def default_passes() -> list[Pass]:
    """The passes compile() runs when optimize=True, in order.

    Clean-up first, so fusion sees the fewest nodes and merged nodes are
    not hidden inside fused bodies (which eliminate_common does not enter);
    then the three fusion passes (they group disjoint modes, so their
    order among themselves does not matter); colocate last, because it
    labels exactly the tensor edges fusion left between processes.
    """
    return [eliminate_dead, eliminate_common, fuse_local, fuse_tasks, colocate_actors, colocate]


__all__ = [
    "Pass",
    "PassRecord",
    "PassResult",
    "Cluster",
    "ClusterNode",
    "Resources",
    "colocate",
    "colocate_actors",
    "default_passes",
    "eliminate_common",
    "eliminate_dead",
    "explain",
    "force_backend",
    "fuse_local",
    "fuse_tasks",
    "place",
    "run_passes",
    "use_channels",
]
