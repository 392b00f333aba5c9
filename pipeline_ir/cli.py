"""The command line: `python -m pipeline_ir dump MODULE:ATTR` (also the
console script `pipeline-ir`).

`dump` imports MODULE, takes ATTR (a pipeline node, a tuple of nodes, or a
CompiledPipeline), compiles it if needed, and prints its graph as text,
JSON or Graphviz. Nothing is deployed. A bad target exits with status 2 and
one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from pipeline_ir.builder import PipelineNode
from pipeline_ir.compile import CompiledPipeline, compile
from pipeline_ir.errors import PipelineError
from pipeline_ir.ir.graph import Graph


class TargetError(Exception):
    """The MODULE:ATTR target cannot be dumped; the message says why."""


def _import(module: str) -> object:
    if module.endswith(".py"):
        if not os.path.isfile(module):
            raise TargetError(f"no such file: {module}")
        spec = importlib.util.spec_from_file_location("__pipeline_ir_target__", module)
        if spec is None or spec.loader is None:
            raise TargetError(f"cannot load {module}")
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            raise TargetError(f"running {module} raised {type(e).__name__}: {e}") from e
        return mod
    # Like `python -m`: modules in the current directory are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise TargetError(f"cannot import module {module!r}: {e}") from e
    except Exception as e:
        raise TargetError(f"importing {module!r} raised {type(e).__name__}: {e}") from e


def load_graph(target: str, raw: bool) -> Graph:
    """The graph named by `MODULE:ATTR` (before passes when `raw`)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise TargetError(f"target {target!r} must be MODULE:ATTR, e.g. my_pipelines:ensemble")
    obj: object = _import(module)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"{module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, CompiledPipeline):
        return obj.source_graph if raw else obj.graph
    if isinstance(obj, PipelineNode) or (
        isinstance(obj, (tuple, list)) and obj and all(isinstance(o, PipelineNode) for o in obj)
    ):
        compiled = compile(obj, optimize=not raw)
        return compiled.source_graph if raw else compiled.graph
    raise TargetError(
        f"{target} is a {type(obj).__name__}, not a pipeline node or CompiledPipeline; "
        "name the node returned by calling a step, or the result of pipeline.compile()"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pipeline-ir` and `python -m pipeline_ir`."""
    parser = argparse.ArgumentParser(prog="pipeline-ir", description="Inspect pipeline_ir pipelines.")
    commands = parser.add_subparsers(dest="command", required=True)
    dump = commands.add_parser("dump", help="print a pipeline's graph")
    dump.add_argument("target", help="MODULE:ATTR naming a pipeline node or a compiled pipeline (MODULE may be a .py path)")
    dump.add_argument("--raw", action="store_true", help="the graph as traced, before optimization passes")
    dump.add_argument("--format", choices=("text", "json", "dot"), default="text")
    args = parser.parse_args(argv)
    try:
        graph = load_graph(args.target, args.raw)
    except (TargetError, PipelineError, TypeError, ValueError, ImportError, SyntaxError) as e:
        print(f"pipeline-ir: error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(graph.to_json().decode())
    elif args.format == "dot":
        print(graph.to_dot())
    else:
        print(graph.dump())
    return 0
