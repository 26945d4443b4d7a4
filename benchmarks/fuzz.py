"""The longer fuzzing campaign behind the docs' Reliability table: the targets of tests/test_fuzz.py
(config files, --set values, command lines, checkpoint and task metadata) with new random cases
each run (the test run uses a fixed seed and 500 cases per target), in a child process limited
to 3 GiB of address space.

    python benchmarks/fuzz.py [--examples 5000]

Prints a table and writes benchmarks/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=5000, help="cases per target")
    p.add_argument("--out", default=str(HERE / "results" / "fuzz.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.jsonl"
        env = {**os.environ, "METAFIT_FUZZ_INNER": "1", "METAFIT_FUZZ_RANDOM": "1",
               "METAFIT_FUZZ_EXAMPLES": str(args.examples), "METAFIT_FUZZ_SUMMARY": str(summary)}
        limit = 3 * 2**30
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fuzz.py", "-k", "inner"],
                              cwd=TESTS, env=env, capture_output=True, text=True,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in summary.read_text().splitlines()] if summary.exists() else []
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    print(f"{'target':<16} {'cases':>7} {'accepted':>9} {'one-line errors':>16} {'other':>6}")
    for r in rows:
        print(f"{r['target']:<16} {r['cases']:>7} {r['accepted']:>9} {r['clean_errors']:>16} "
              f"{r['cases'] - r['accepted'] - r['clean_errors']:>6}")
    print(f"{len(failures)} failing targets, {seconds:.0f} s" + "".join(f"\n  {f}" for f in failures))
    if failures:
        print(proc.stdout[-4000:])
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "examples_per_target": args.examples, "seconds": seconds,
              "memory_limit_bytes": limit, "targets": rows, "failures": failures}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(1 if failures or proc.returncode else 0)


if __name__ == "__main__":
    main()
