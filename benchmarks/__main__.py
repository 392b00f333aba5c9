"""Run the benchmarks: `python -m benchmarks [--smoke] [--out DIR] [NAME...]`
(also `make bench`).

Discovers every `bench_*.py` module of this package (or runs only the NAMEs
given, with or without the `bench_` prefix), runs them one after another in
this process, and writes

    benchmarks/results/latest.json     the machine, the date and every result
    benchmarks/results/latest.md       the same as Markdown tables (for docs/benchmarks.md)
    benchmarks/results/NAME.json       the machine, the date and that benchmark's result
    benchmarks/results/NAME.png        one chart per benchmark (bars, unless it draws its own)

(or the same files under `--out DIR`). Each module exposes
`run(smoke: bool = False) -> dict` returning

    {"name": str, "title": str, "unit": str,
     "rows": [{"label": str, "value": float}, ...],
     "ratios": {str: float},
     "notes": str,
     "skipped": {label: reason}}          # optional: rows that could not run

and may add keys of its own; a module that also defines
`plot(result, path)` draws its chart itself (bench_compile.py: log-log).

A benchmark that raises is recorded with its error and the others still run;
the exit status is 1 when any did. A run of a subset writes latest.json with
that subset only; each NAME.json keeps the last run of that benchmark.

Ray, when a benchmark needs it, is started once, by the first benchmark
that does, and stopped at the end: a local instance of its own, or the
cluster RAY_ADDRESS names.

Smoke mode, `--smoke`, is there so that the suite cannot rot: the runner
calls `run(smoke=True)`, with which each module runs every code path at
tiny sizes and one or two repetitions (its figures mean nothing), and
writes everything into a fresh temporary directory (or `--out DIR`, never
benchmarks/results/). tests/test_benchmarks_smoke.py runs it as part of the
test suite. The `smoke` argument is part of the interface: a module whose
`run()` does not take it fails the smoke run. A module that cannot run
something small enough (a second Ray instance, say) lists those rows under
"skipped" with the reason, as it would for rows it cannot run at all.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import inspect
import json
import os
import pkgutil
import platform
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REQUIRED = {"name": str, "title": str, "unit": str, "rows": list, "ratios": dict, "notes": str}


def discover() -> list[str]:
    """The benchmark modules of this package, by name (`bench_...`)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "ray": _version("ray"),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "pipeline_ir": _version("pipeline-ir"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def check(result: object, module: str) -> dict[str, Any]:
    """`result` if it has the documented shape, else a TypeError naming what is wrong."""
    if not isinstance(result, dict):
        raise TypeError(f"{module}.run() returned {type(result).__name__}, not a dict")
    for key, kind in REQUIRED.items():
        if not isinstance(result.get(key), kind):
            raise TypeError(f"{module}.run(): {key!r} must be a {kind.__name__}, got {result.get(key)!r}")
    for row in result["rows"]:
        if not (isinstance(row, dict) and isinstance(row.get("label"), str) and isinstance(row.get("value"), (int, float))):
            raise TypeError(f"{module}.run(): each row needs a str 'label' and a float 'value', got {row!r}")
    result.setdefault("skipped", {})
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """One horizontal bar chart of the rows, values written on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["label"] for r in rows] + [f"{label} (not run)" for label in result["skipped"]]
    values = [float(r["value"]) for r in rows] + [0.0] * len(result["skipped"])
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.38 * max(1, len(labels))))
    bars = ax.barh(range(len(labels)), values, color=["#4477aa"] * len(rows) + ["#bbbbbb"] * len(result["skipped"]))
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(result["unit"])
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    for bar, value in zip(bars, values):
        if value > 0:
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.3g}", va="center", fontsize=7)
    ratios = textwrap.fill(", ".join(f"{k}: {v:.2f}" for k, v in result["ratios"].items()), 120)
    ax.set_title(textwrap.fill(result["title"], 110) + (f"\n{ratios}" if ratios else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the machine, then one table per benchmark."""
    m = report["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
        f"Python {m['python']}, Ray {m['ray']}, torch {m['torch']}, numpy {m['numpy']}."
        + (" **Smoke run** (tiny sizes): these figures mean nothing." if report.get("smoke") else ""),
    ]
    for result in report["benchmarks"]:
        lines += ["", f"### {result['name']}", ""]
        if "error" in result:
            lines.append(f"Did not run: `{result['error'].strip().splitlines()[-1]}`")
            continue
        lines += [f"{result['title']}", "", f"| | {result['unit']} |", "|---|---:|"]
        lines += [f"| {row['label']} | {row['value']:.4g} |" for row in result["rows"]]
        lines += [f"| {label} | not run: {reason} |" for label, reason in result["skipped"].items()]
        if result["ratios"]:
            lines += ["", "| ratio | |", "|---|---:|"]
            lines += [f"| {key} | {value:.2f} |" for key, value in result["ratios"].items()]
        if result["notes"]:
            lines += ["", f"Notes: {result['notes']}"]
    return "\n".join(lines) + "\n"


def run_one(module_name: str, smoke: bool = False) -> dict[str, Any]:
    """Import and run one benchmark (`run(smoke=True)` in smoke mode); an
    exception becomes an error record."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.{module_name}")
        if smoke:
            if "smoke" not in inspect.signature(module.run).parameters:
                raise TypeError(
                    f"{module_name}.run() takes no `smoke` argument: every benchmark must have a smoke mode, "
                    "run(smoke: bool = False), that runs it at tiny sizes (see benchmarks/__main__.py)"
                )
            result = check(module.run(smoke=True), module_name)
        else:
            result = check(module.run(), module_name)
    except Exception:
        print(f"  FAILED:\n{traceback.format_exc()}", file=sys.stderr)
        return {"name": module_name.removeprefix("bench_"), "error": traceback.format_exc(limit=3), "seconds": round(time.perf_counter() - start, 1)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all): local_overhead, anchors, ...")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few repetitions: checks that every benchmark runs (figures meaningless)")
    parser.add_argument("--out", type=Path, help="write the results here (default: benchmarks/results/, or a new temporary directory with --smoke)")
    args = parser.parse_args(argv)
    available = discover()
    chosen = [n if n.startswith("bench_") else f"bench_{n}" for n in args.names] or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(n.removeprefix('bench_') for n in available)}")

    out = output_dir(args.out, args.smoke)
    if out is None:
        parser.error(f"--smoke never writes into {RESULTS}: its figures are meaningless; give another --out")
    # A Ray of their own unless RAY_ADDRESS names one: ray.init() would
    # otherwise join whatever cluster `ray start` last left on this machine.
    os.environ.setdefault("RAY_ADDRESS", "local")
    report: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "benchmarks": []}
    for name in chosen:
        print(f"== {name}" + (" (smoke)" if args.smoke else ""), flush=True)
        result = run_one(name, args.smoke)
        report["benchmarks"].append(result)
        if "error" in result:
            continue
        for row in result["rows"]:
            print(f"  {row['label']:<48} {row['value']:>12.4g} {result['unit']}")
        for label, reason in result["skipped"].items():
            print(f"  {label:<48} not run: {reason}")
        for key, value in result["ratios"].items():
            print(f"  ratio {key}: {value:.2f}")
        if result["notes"]:
            print(f"  notes: {result['notes']}")
        try:
            chart = getattr(importlib.import_module(f"benchmarks.{name}"), "plot", plot)
            chart(result, out / f"{result['name']}.png")
        except Exception:  # a chart that cannot be drawn fails the run too, after the JSON is kept
            print(f"  CHART FAILED:\n{traceback.format_exc()}", file=sys.stderr)
            result["error"] = "chart: " + traceback.format_exc(limit=3)
        _write(out / f"{result['name']}.json", json.dumps({"machine": report["machine"], "benchmark": result}, indent=2) + "\n")
        print(f"  ({result['seconds']} s)", flush=True)

    _shutdown_ray()
    _write(out / "latest.json", json.dumps(report, indent=2) + "\n")
    _write(out / "latest.md", markdown(report))
    print(f"wrote {out}/latest.json, latest.md and the charts")
    failed = [r["name"] for r in report["benchmarks"] if "error" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def output_dir(out: Path | None, smoke: bool) -> Path | None:
    """Where the results go, created; None for a smoke run aimed at
    benchmarks/results/ (its figures must never replace real ones)."""
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="pipeline_ir-bench-smoke-")) if smoke else RESULTS
    if smoke and out.resolve() == RESULTS.resolve():
        return None
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write(out: Path, text: str) -> None:
    """Replace `out` whole (a reader never sees half a file)."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)


def _shutdown_ray() -> None:
    """Benchmarks share one Ray instance (whoever needs it first starts it);
    it ends with the run."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
