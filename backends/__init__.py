"""Lowering of the IR to running code: local, Ray tasks, Ray actors.

Imported as `pipeline_ir.backends`. Backends only lower and run what the IR
says; every decision (placement, fusion, resources) is made by a pass and is
visible in the graph. Ray is imported only by the Ray backends, and only
when a graph has a remote node.
"""
