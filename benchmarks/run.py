"""Run every benchmark, print the figures and update BENCHMARKS.md.

Usage: ``python -m benchmarks.run [NAME ...]`` where NAME is a module suffix (``general_points``,
``virl``, ...). Each module's section of BENCHMARKS.md is replaced; other text there is kept.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import pkgutil
import re
from pathlib import Path

import benchmarks
from amft_vlm.run.jobs import machine_description
from benchmarks.common import Measurement

REPORT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
log = logging.getLogger(__name__)


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def format_table(measurements: list[Measurement]) -> str:
    """A markdown table of the measurements; the ratio is always 'times better than the baseline'."""
    rows = ["| benchmark | value | baseline (same run) | times better | target | met |", "|---|---|---|---|---|---|"]
    for m in measurements:
        baseline = f"{m.baseline_name}: {_number(m.baseline_value)} {m.unit}" if m.baseline_name else ""
        ratio = f"{m.ratio:,.1f}x" if m.ratio is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[m.met]
        rows.append(f"| {m.name} | {_number(m.value)} {m.unit} | {baseline} | {ratio} | {m.target or ''} | {met} |")
    return "\n".join(rows)


def update_report(section: str, body: str) -> None:
    """Replace (or append) the marked section ``section`` of BENCHMARKS.md with ``body``."""
    start, end = f"<!-- bench:{section} start -->", f"<!-- bench:{section} end -->"
    block = f"{start}\n{body}\n{end}"
    text = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n\nWritten by `make bench`; each section is replaced when its benchmark runs again.\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = REPORT.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(REPORT)


def available() -> list[str]:
    """Names of the benchmark modules (``bench_<name>.py``)."""
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> None:
    """Run the named benchmarks (all by default) and record them in BENCHMARKS.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [name.replace("-", "_") for name in args.names] or available()  # meta-signal == meta_signal
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {available()}")
    today = datetime.date.today().isoformat()
    machine = machine_description()
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        log.info("running benchmark %s ...", name)
        result = module.run()  # Measurements for the standard table, or a finished markdown section
        table = result if isinstance(result, str) else format_table(result)
        print(f"\n## {name}\n{table}\n")
        if not args.no_write:
            title = (module.__doc__ or name).strip().splitlines()[0]
            update_report(name, f"## {title}\n\n{today}, {machine}.\n\n{table}")


if __name__ == "__main__":
    main()
