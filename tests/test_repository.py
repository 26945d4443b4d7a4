"""The repository holds code, not output: the few weights kept to re-score headline figures are
exactly those the manifest lists, with matching checksums, and results stay small."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
WEIGHTS = RESULTS / "weights"


def test_kept_weights_are_the_manifest_and_match_its_checksums():
    manifest = json.loads((WEIGHTS / "MANIFEST.json").read_text())
    listed = {Path(f["file"]).name: f for f in manifest["files"]}
    on_disk = {p.name for p in WEIGHTS.iterdir() if p.name != "MANIFEST.json"}
    assert on_disk == set(listed), "weights without a manifest entry (or entries without a file)"
    total = 0
    for name, entry in listed.items():
        data = (WEIGHTS / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert len(data) == entry["bytes"], name
        assert "--iterations 0" in entry["rescore"]["command"] and entry["regenerate"]["steps"], name
        total += len(data)
    assert total == manifest["total_bytes"] <= 3 * 10**6


def test_results_are_small_summaries():
    big = {str(p.relative_to(RESULTS)): p.stat().st_size for p in RESULTS.rglob("*")
           if p.is_file() and p.parent != WEIGHTS and p.stat().st_size > 2**20}
    assert not big, f"results over 1 MiB (thin the curves): {big}"
