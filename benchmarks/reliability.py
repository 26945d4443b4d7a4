"""The figures of the docs' Reliability section, measured by the tests that guard them: hostile
checkpoints per loader, kills during training and checkpoint writes, the service under an image
attack, and a fuzzing campaign of new random cases over config files, --set values, command lines
and checkpoint/task metadata (the test run uses a fixed seed and 500 cases per target), in a
child process limited to 3 GiB of address space.

    python benchmarks/reliability.py [--examples 5000]

Prints a table and writes benchmarks/results/reliability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
LIMIT = 3 * 2**30


def pytest(args: list[str], env: dict | None = None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *args], cwd=TESTS,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT)))
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=5000, help="fuzzing cases per target")
    p.add_argument("--out", default=str(HERE / "results" / "reliability.json"))
    args = p.parse_args()
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}

    rc, out, secs = pytest(["test_hostile_checkpoints.py", "test_hostile_images.py", "test_bad_input.py"])
    loaders, seen = [], set()
    for m in re.findall(r"\n(.+?): (\d+) inputs, (\d+) refused with a clean one-line error, (\d+) accepted", out):
        name = {"info": "info (RL)", "predict": "predict (task files)"}.get(m[0], m[0]) if m[0] in seen else m[0]
        seen.add(m[0])  # the second info/predict tally runs on RL checkpoints / hostile task files
        loaders.append({"loader": name, "inputs": int(m[1]), "refused": int(m[2]), "accepted": int(m[3])})
    result["hostile_files"] = {"passed": rc == 0, "seconds": secs, "loaders": loaders}

    rc, out, secs = pytest(["test_crash_resume.py"])
    kills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) kills, (\d+) checkpoint loads verified", out)]
    result["crash_resume"] = {"passed": rc == 0, "kills": sum(k for k, _ in kills),
                              "checkpoints_verified": sum(v for _, v in kills), "seconds": secs}

    rc, out, secs = pytest(["test_service_attack.py"])
    m = re.search(r"(\d+)x(\d+) requests \+ attack: ([\d.]+) s, (\d+) errors; server RSS (\d+) MiB before, peak (\d+) "
                  r"MiB, (\d+) MiB after; /health ([\d.]+) ms", out)
    result["service_attack"] = {"passed": rc == 0, **({
        "requests": int(m[1]) * int(m[2]), "errors": int(m[4]), "rss_before_mib": int(m[5]), "peak_rss_mib": int(m[6]),
        "rss_after_mib": int(m[7]), "health_ms": float(m[8])} if m else {})}

    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.jsonl"
        rc, out, secs = pytest(["test_fuzz.py", "-k", "inner"], env={
            "METAFIT_FUZZ_INNER": "1", "METAFIT_FUZZ_RANDOM": "1", "METAFIT_FUZZ_EXAMPLES": str(args.examples),
            "METAFIT_FUZZ_SUMMARY": str(summary)})
        targets = [json.loads(line) for line in summary.read_text().splitlines()] if summary.exists() else []
    result["fuzz"] = {"passed": rc == 0, "seconds": secs, "examples_per_target": args.examples, "targets": targets,
                      "failures": [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]}

    print(f"{'input':<34} {'tried':>7} {'one-line errors':>16} {'accepted':>9} {'other':>6}")
    for t in targets:
        print(f"{'fuzz: ' + t['target']:<34} {t['cases']:>7} {t['clean_errors']:>16} {t['accepted']:>9} "
              f"{t['cases'] - t['clean_errors'] - t['accepted']:>6}")
    for r in loaders:
        print(f"{'hostile file -> ' + r['loader']:<34} {r['inputs']:>7} {r['refused']:>16} {r['accepted']:>9} "
              f"{r['inputs'] - r['refused'] - r['accepted']:>6}")
    c, s = result["crash_resume"], result["service_attack"]
    print(f"kills survived with nothing lost: {c['kills']} ({c['checkpoints_verified']} checkpoint loads verified)")
    if "peak_rss_mib" in s:
        print(f"service under attack: peak RSS {s['peak_rss_mib']} MiB (before {s['rss_before_mib']}, after "
              f"{s['rss_after_mib']}), {s['errors']} errors in {s['requests']} requests, /health {s['health_ms']} ms")
    failed = [k for k in ("hostile_files", "crash_resume", "service_attack", "fuzz") if not result[k]["passed"]]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
