"""Run dmuserd's benchmark scenarios with their anchors, in one run.

Every module in ``bench/scenarios/`` (other than ``__init__``) is a scenario
and provides::

    TITLE = "one line naming what is measured"

    def run(quick: bool) -> dict:
        return {
            "figures": {"dmuserd_4k_randread_iops": 41000, ...},  # our numbers
            "anchors": {"bare_pyfuse3_4k_randread_iops": 43000, ...},  # same run
            "ratios":  {"iops_vs_bare_pyfuse3": 0.95, ...},
            "targets": {"iops_vs_bare_pyfuse3": 0.9, ...},  # ratio >= target
            "units":   {"dmuserd_4k_randread_iops": "IOPS", ...},
            "notes":   "what was run, sizes, anything odd",
        }

A scenario that cannot run here (a tool missing) raises ``Skip("why")``.
``--quick`` asks each scenario for a reduced run (the whole quick set stays
under 60 s) and prints the JSON to stdout. The full run writes
``bench/results/latest.json`` and ``bench/results/latest.md``.
"""

from __future__ import annotations

import argparse
import datetime
import contextlib
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class Skip(Exception):
    """A scenario cannot run on this machine; the message says why."""


def best_seconds(fn, repeat: int) -> float:
    """The shortest wall time of ``repeat`` calls of ``fn()`` (the least disturbed run)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def scenario_names() -> list[str]:
    from bench import scenarios

    return sorted(m.name for m in pkgutil.iter_modules(scenarios.__path__) if not m.name.startswith("_"))


def machine() -> dict:
    import dmuserd

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "dmuserd": dmuserd.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(names: list[str], quick: bool) -> dict:
    report = {"machine": machine(), "quick": quick, "scenarios": {}}
    for name in names:
        module = importlib.import_module(f"bench.scenarios.{name}")
        started = time.monotonic()
        print(f"bench: {name}: {getattr(module, 'TITLE', '')}", file=sys.stderr, flush=True)
        try:
            # stdout carries the JSON report: whatever a scenario prints (an
            # in-process daemon's log lines, say) goes to stderr instead.
            with contextlib.redirect_stdout(sys.stderr):
                result = module.run(quick)
            result["status"] = "ok"
        except Skip as exc:
            result = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one failing scenario must not hide the others
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        result["title"] = getattr(module, "TITLE", name)
        result["seconds"] = round(time.monotonic() - started, 1)
        met = {k: v >= result.get("targets", {}).get(k, float("-inf")) for k, v in result.get("ratios", {}).items()}
        result["targets_met"] = met
        report["scenarios"][name] = result
        print(f"bench: {name}: {result['status']} in {result['seconds']} s", file=sys.stderr, flush=True)
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Measured {report['machine']['date']} on {report['machine']['cpu']} "
        f"({report['machine']['cpus']} CPUs), Python {report['machine']['python']}, "
        f"kernel {report['machine']['kernel']}.",
        "",
        "| scenario | figure | value | unit |",
        "|---|---|---:|---|",
    ]
    for name, result in report["scenarios"].items():
        if result["status"] != "ok":
            lines.append(f"| {name} | {result['status']} | | {result.get('reason', '')} |")
            continue
        units = result.get("units", {})
        for kind in ("figures", "anchors"):
            for key, value in result.get(kind, {}).items():
                lines.append(f"| {name} | {key}{' (anchor)' if kind == 'anchors' else ''} | {_fmt(value)} | {units.get(key, '')} |")
        for key, value in result.get("ratios", {}).items():
            target = result.get("targets", {}).get(key)
            verdict = "" if target is None else (f"target ≥ {target}: " + ("met" if value >= target else "NOT met"))
            lines.append(f"| {name} | {key} | {_fmt(value)} | ratio; {verdict} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run, JSON to stdout")
    parser.add_argument("scenarios", nargs="*", help="scenario names (default: all)")
    args = parser.parse_args(argv)
    names = args.scenarios or scenario_names()
    unknown = set(names) - set(scenario_names())
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; known: {', '.join(scenario_names())}")
    report = run(names, args.quick)
    text = json.dumps(report, indent=2)
    if args.quick:
        print(text)
    else:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "latest.json").write_text(text + "\n")
        (RESULTS / "latest.md").write_text(markdown(report))
        _chart(report, RESULTS / "latest.png")
        print(markdown(report))
    return 0


def _chart(report: dict, path: Path) -> None:
    """Bar chart of every ratio against its target (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed; no chart", file=sys.stderr)
        return
    labels, values, targets = [], [], []
    for name, result in report["scenarios"].items():
        for key, value in result.get("ratios", {}).items():
            labels.append(f"{name}\n{key}")
            values.append(value)
            targets.append(result.get("targets", {}).get(key))
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.4), 4.5))
    bars = ax.bar(range(len(labels)), values, color=["tab:green" if t is None or v >= t else "tab:red" for v, t in zip(values, targets)])
    for i, target in enumerate(targets):
        if target is not None:
            ax.hlines(target, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ratio to anchor (dashed: target)")
    ax.set_title("dmuserd benchmarks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    # Scenarios import Skip from bench.run: under `python -m bench.run` that
    # would be a second module with another Skip, and a skip would count as a failure.
    sys.modules.setdefault("bench.run", sys.modules[__name__])
    raise SystemExit(main())
