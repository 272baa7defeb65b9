"""`python -m bench [--quick] [--only NAME] [--save-baseline FILE] [--compare FILE] [--json FILE]`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio

from bench.cases import CASES, CaseResult

TOLERANCE = 1.5
"""--compare fails when a time-like figure is this many times its baseline (noise on 2 shared cores)."""


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}


def table(results: list[CaseResult]) -> str:
    lines = [f"{'case':<32} {'figure':<28} {'value':>12}  {'target':<10} met"]
    for r in results:
        for f in r.figures:
            met = "" if f.met is None else ("yes" if f.met else "MISSED")
            lines.append(f"{r.case:<32} {f.name:<28} {f.value:>10.3f} {f.unit:<2} {f.target:<10} {met}")
    return "\n".join(lines)


def compare(results: list[CaseResult], baseline: dict[str, Any]) -> int:
    old = {(c["case"], f["name"]): f["value"] for c in baseline["results"] for f in c["figures"]}
    failures = 0
    for r in results:
        for f in r.figures:
            before = old.get((r.case, f.name))
            if not before:
                continue
            ratio = f.value / before
            worse = ratio > TOLERANCE if f.unit in ("ms", "µs", "s") else False
            failures += worse
            print(f"{r.case:<32} {f.name:<28} {ratio:6.2f}x baseline{'  REGRESSION' if worse else ''}")
    return 1 if failures else 0


async def run(names: list[str], quick: bool) -> list[CaseResult]:
    return [await CASES[name](quick) for name in names]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repetitions: a smoke run")
    p.add_argument("--only", action="append", choices=sorted(CASES), help="run only this case (repeatable)")
    p.add_argument("--save-baseline", type=Path, help="write the figures here as the baseline")
    p.add_argument("--compare", type=Path, help="print ratios to this baseline; exit 1 past the tolerance")
    p.add_argument("--json", type=Path, default=Path(".bench/last.json"), help="where to write the figures")
    args = p.parse_args()
    # ping is the 2025-11-25 floor the figures compare against; the SDK warns that 2026-07-28 dropped it.
    warnings.filterwarnings("ignore", message="ping is removed")
    results = anyio.run(run, args.only or list(CASES), args.quick)
    print(table(results))
    record = {"machine": machine(), "quick": args.quick, "results": [asdict(r) for r in results]}
    for path in filter(None, [args.json, args.save_baseline]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    if args.compare:
        return compare(results, json.loads(args.compare.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
