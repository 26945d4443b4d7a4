"""Crash and resume: a training process killed with SIGKILL at several points (inside checkpoint
writes, right after a log row) leaves only loadable checkpoints; the next start removes the temp
files of the interrupted writes; resuming from what is left ends with the uninterrupted run's
weights bit for bit and its metrics log row for row (wall-clock columns excepted).

The kills are real: a small wrapper runs ``metafit train`` (or ``metafit rl train``) in a
subprocess with a hook that, at the chosen point, writes half of a checkpoint's bytes into the
real temp file of :func:`metafit.data.cache.atomic_write_bytes` (fsync'd), tells the test, and
waits; the test then sends SIGKILL. No timing decides where a kill lands.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import metafit
from metafit.training.checkpoint import read_checkpoint
from metafit.training.rl_run import load_rl

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")

#: wall-clock columns: the only ones allowed to differ between a resumed and an uninterrupted run
TIMING_COLUMNS = {"step_s", "elapsed_s", "data_s", "augment_s", "forward_s", "backward_s", "optimizer_s", "seconds"}

WRAPPER = r'''
"""Run the metafit CLI; with STALL=<kind>:<n>, stop at that point until killed:
  last:<n> / best:<n> / step:<n>  inside the n-th write (in this process) of last.safetensors,
                                  best.safetensors or a step-*.safetensors, half of its bytes in the temp file;
  log:<s>                         right after the training row of step <s> is in metrics.jsonl."""
import io
import os
import sys
import time

import metafit.training.checkpoint as ck
import metafit.training.metrics_log as ml
from metafit.cli.main import main

kind, _, n = os.environ.get("STALL", "").partition(":")
signal_file = os.environ.get("STALL_SIGNAL", "")
counts = {}


def stall(what):
    with open(signal_file + ".part", "w") as f:
        f.write(what)
    os.replace(signal_file + ".part", signal_file)
    time.sleep(600)


real_write = ck.atomic_write_bytes


def hooked_write(path, writer):
    name = path.name
    key = "last" if name == "last.safetensors" else "best" if name == "best.safetensors" else \
        "step" if name.startswith("step-") else "other"
    counts[key] = counts.get(key, 0) + 1
    if key == kind and counts[key] == int(n):
        def half(f):
            buf = io.BytesIO()
            writer(buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            stall(f"inside the write of {name} ({len(data) // 2} of {len(data)} bytes written)")
        return real_write(path, half)
    return real_write(path, writer)


ck.atomic_write_bytes = hooked_write

real_log = ml.MetricsLog.write


def hooked_log(self, row):
    real_log(self, row)
    if kind == "log" and row.get("split") == "train" and row.get("step") == int(n):
        stall(f"after the training row of step {n}")


ml.MetricsLog.write = hooked_log
sys.exit(main(sys.argv[1:]))
'''


def _temp_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.tmp")} if folder.is_dir() else set()


class Harness:
    def __init__(self, tmp_path: Path, argv: list[str]) -> None:
        self.script = tmp_path / "wrapper.py"
        self.script.write_text(WRAPPER)
        self.argv = argv
        self.tmp_path = tmp_path
        self.kills = 0

    def run(self, out: Path, *extra: str, stall: str | None = None) -> None:
        """Run to the end (``stall`` None), or until the stall point, then SIGKILL the process."""
        signal_file = self.tmp_path / f"stalled-{self.kills}"
        env = {**os.environ, "STALL": stall or "", "STALL_SIGNAL": str(signal_file), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, str(self.script), *self.argv, "--out-dir", str(out), *extra],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if stall is None:
            output, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, output
            return
        deadline = time.monotonic() + 300  # a safety net for a hung process, not an assertion on speed
        while not signal_file.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before reaching stall point {stall}: {proc.stdout.read()}")
            assert time.monotonic() < deadline, f"stall point {stall} not reached"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        self.kills += 1
        self.last_stall = signal_file.read_text()


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_COLUMNS}
            for line in path.read_text().splitlines()]


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def _same_tensors(a: Path, b: Path) -> None:
    (_, ta), (_, tb) = read_checkpoint(a), read_checkpoint(b)
    assert set(ta) == set(tb), (a.name, set(ta) ^ set(tb))
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (a.name, k)


def _verify_loadable(folder: Path, rl: bool = False) -> int:
    """Every checkpoint in ``folder`` reads and builds its model; returns how many."""
    n = 0
    for path in sorted(folder.glob("*.safetensors")):
        meta, _ = read_checkpoint(path)
        if rl:
            load_rl(path)
        else:
            metafit.load(path)
        if path.name == "last.safetensors":
            assert "train_state" in meta
        n += 1
    return n


SINUSOID = ["train", "sinusoid_maml", "--no-test",
            "--set", "train.meta_steps=12", "--set", "train.log_every=2", "--set", "train.eval_every=4",
            "--set", "train.save_interval=3", "--set", "eval.val_episodes=4", "--set", "train.meta_batch_size=2",
            "--set", "backbone.hidden=[16,16]", "--set", "train.num_threads=1", "--set", "train.progress=false",
            "--set", "train.tensorboard=false"]


def test_supervised_run_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    h = Harness(tmp_path, SINUSOID)
    reference, run = tmp_path / "reference", tmp_path / "killed"
    h.run(reference)
    # (stall point, how the next process starts): save_interval 3 and log_every 2 leave the
    # running averages of a training row half-way at every resumable checkpoint
    plan = [
        ("step:1", None),     # inside step-0000003, before any last.safetensors: the user starts afresh (--overwrite)
        ("log:4", "overwrite"),  # after row 4 (last at step 3): rows 4.. are replayed on resume
        ("best:1", "resume"),  # inside best.safetensors at step 4: its temp file is left
        ("last:2", "resume"),  # inside last.safetensors at step 9 (last stays at 6)
        ("log:10", "resume"),  # after row 10 (last at 9)
        ("last:2", "resume"),  # inside the final write of last.safetensors (step 12 already saved)
    ]
    left: set[str] = set()
    verified = 0
    for stall, start in plan:
        h.run(run, *{"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(start, []), stall=stall)
        survived = left & _temp_files(run)
        assert not survived, f"temp files of an earlier kill survived a start: {survived}"
        left = _temp_files(run)
        if stall.split(":")[0] in ("last", "best", "step"):  # the kill landed inside the write
            assert left and "inside the write" in h.last_stall, (stall, h.last_stall, left)
            assert all((run / name).stat().st_size > 0 for name in left)
        verified += _verify_loadable(run)
    h.run(run, "--resume")
    assert not _temp_files(run), _temp_files(run)
    verified += _verify_loadable(run)
    assert h.kills == len(plan) and verified >= 15
    print(f"\n{h.kills} kills, {verified} checkpoint loads verified between them")

    # bit for bit: weights, optimizer and random states of every checkpoint
    names = sorted(p.name for p in reference.glob("*.safetensors"))
    assert names == sorted(p.name for p in run.glob("*.safetensors"))
    assert {"best.safetensors", "last.safetensors", "step-0000012.safetensors"} <= set(names)
    for name in names:
        _same_tensors(reference / name, run / name)
    # row for row, wall-clock columns excepted
    ref_rows, run_rows = _rows(reference / "metrics.jsonl"), _rows(run / "metrics.jsonl")
    assert [r["step"] for r in ref_rows if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert run_rows == ref_rows
    assert _csv_rows(run / "metrics.csv") == _csv_rows(reference / "metrics.csv")


RL = ["rl", "train", "rl2_bandit_k5_n10", "--no-test",
      "--set", "train.iterations=6", "--set", "train.eval_every=3", "--set", "train.save_interval=2",
      "--set", "train.eval_tasks=8", "--set", "train.max_minutes=null", "--set", "train.num_threads=1",
      "--set", "learner.hidden_size=8", "--set", "learner.meta_batch_size=6", "--set", "learner.n_episodes=4",
      "--set", "train.progress=false", "--set", "train.tensorboard=false"]


def test_rl_run_killed_inside_writes_resumes_to_the_uninterrupted_result(tmp_path):
    h = Harness(tmp_path, RL)
    reference, run = tmp_path / "reference", tmp_path / "killed"
    h.run(reference)
    # inside step-0000004 (last at 2; rows 3-4 and the validation at 3 are replayed), then inside
    # last.safetensors at iteration 6 (last stays at 4)
    left: set[str] = set()
    verified = 0
    for stall, start in [("step:2", None), ("last:2", "resume")]:
        h.run(run, *(["--resume"] if start else []), stall=stall)
        assert not (left & _temp_files(run))
        left = _temp_files(run)
        assert left and "inside the write" in h.last_stall
        verified += _verify_loadable(run, rl=True)
    h.run(run, "--resume")
    assert not _temp_files(run)
    verified += _verify_loadable(run, rl=True)
    assert verified >= 8
    print(f"\n{h.kills} kills, {verified} checkpoint loads verified between them")
    for name in ("last.safetensors", "best.safetensors", "step-0000006.safetensors"):
        _same_tensors(reference / name, run / name)
    ref_rows, run_rows = _rows(reference / "metrics.jsonl"), _rows(run / "metrics.jsonl")
    assert [r["iteration"] for r in ref_rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert run_rows == ref_rows
