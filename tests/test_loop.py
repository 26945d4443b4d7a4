"""The one training loop (metafit.training.loop), driven by a trivial learner kind defined here:
budget and stop reasons, the cadence of rows, validations and checkpoints, best / every / last
checkpoints, exact resume, the divergence guard, and a third checkpoint kind plugging in."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import Field

from metafit import CheckpointError, TrainingError
from metafit.training.checkpoint import join_optimizer_state, read_checkpoint, split_optimizer_state
from metafit.training.checkpoint_meta import CHECKPOINT_KINDS, OpenMetaModel
from metafit.training.loop import Loop, LoopSettings, StepReport, Validation, stop_line
from metafit.training.monitor import MonitorConfig


class ToyMeta(OpenMetaModel):
    """What a toy checkpoint holds beyond the envelope."""

    toy: str = Field(min_length=1)
    config: dict
    step: int = Field(ge=0)


class ToyRun:
    """Fits a 2-vector to a noisy target with SGD + momentum; the noise comes from its own stream
    and from torch's global one (which the loop checkpoints)."""

    kind, owner, step_key, csv, progress_desc = "toy", "Toy", "step", True, "toy"
    guard_advice = "Lower the toy's learning rate"

    def __init__(self, lr: float = 0.1, bad_calls: dict[int, float] | None = None, crash_at: int = 0) -> None:
        self.lr, self.bad_calls, self.calls, self.crash_at = lr, bad_calls or {}, 0, crash_at
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.opt = torch.optim.SGD([self.w], lr=lr, momentum=0.9)
        self.gen = torch.Generator().manual_seed(0)
        self.target = torch.tensor([1.0, -2.0])
        self.applied = []

    def files(self):
        return {"config.json": {"lr": self.lr}}

    def step(self, step):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt  # the process dies here: what it wrote so far stays
        x = self.target + 0.1 * torch.randn(2, generator=self.gen) + 0.01 * torch.randn(2)
        self.opt.zero_grad()
        loss = ((self.w - x) ** 2).sum() * self.bad_calls.get(self.calls, 1.0)
        loss.backward()
        value = float(loss.detach())
        return StepReport({"loss": value}, value, float(self.w.grad.norm()), pending=True)

    def finish(self, action):
        if action == "apply":
            self.opt.step()
            self.applied.append(self.calls)
        else:
            self.opt.zero_grad()

    def train_row(self, means, window, seconds):
        return {"loss": means["loss"] if means else None, "steps_in_row": window.steps, "elapsed_s": seconds}

    def postfix(self, row, best):
        return None

    def validate(self, step, seconds):
        score = -float((self.w.detach() - self.target).abs().sum())
        return Validation(score, {"score": score, "elapsed_s": seconds}, {"val": score}, kept=score)

    def keep(self, validation):
        self.best = validation.kept

    def metrics(self, best_step, seconds):
        return {"best_step": best_step}

    def checkpoint(self):
        return {"model.w": self.w.detach()}, {"toy": "w", "config": {"lr": self.lr}}

    def state(self):
        sd = self.opt.state_dict()
        tensors, scalars = split_optimizer_state(sd)
        return {**tensors, "rng.toy": self.gen.get_state()}, {"param_groups": sd["param_groups"],
                                                             "scalars": scalars}, {"calls": self.calls}

    def restore(self, meta, tensors, path, everything):
        opt = meta["train_state"]["optimizer"]
        with torch.no_grad():
            self.w.copy_(tensors["model.w"])
        self.opt.load_state_dict(join_optimizer_state(tensors, opt["scalars"], opt["param_groups"]))
        if everything:
            self.gen.set_state(tensors["rng.toy"])
            self.calls = meta["train_state"]["run"]["calls"]

    def close(self):
        pass


@pytest.fixture(autouse=True)
def _toy_kind(monkeypatch):
    """The toy learner kind's checkpoint schema, registered the way a new kind is: one line."""
    monkeypatch.setitem(CHECKPOINT_KINDS, "toy", ToyMeta)


def _settings(**kw):
    s = {"steps": 12, "eval_every": 4, "save_interval": 6, "log_every": 3, "progress": False, "tensorboard": False}
    s.update(kw)
    return LoopSettings(**s)


def _loop(tmp_path, name="run", run=None, monitor=None, **kw):
    torch.manual_seed(1)
    return Loop(run or ToyRun(), _settings(**kw), tmp_path / name, monitor=monitor)


def _rows(folder, split=None):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def test_cadence_of_rows_validations_and_best_every_last_checkpoints(tmp_path):
    loop = _loop(tmp_path)
    last = loop.fit()
    out = tmp_path / "run"
    assert last == out / "last.safetensors" and loop.step == 12
    assert {p.name for p in out.glob("*.safetensors")} == {
        "best.safetensors", "last.safetensors", "step-0000006.safetensors", "step-0000012.safetensors"}
    assert json.loads((out / "config.json").read_text()) == {"lr": 0.1}
    train = _rows(out, "train")
    assert [r["step"] for r in train] == [3, 6, 9, 12] and all(r["steps_in_row"] == 3 for r in train)
    val = _rows(out, "val")
    assert [r["step"] for r in val] == [4, 8, 12]
    best = max(val, key=lambda r: r["score"])
    assert loop.best_step == best["step"] and loop.best_score == pytest.approx(best["score"])
    meta, tensors = read_checkpoint(out / "best.safetensors")
    assert meta["kind"] == "toy" and meta["toy"] == "w" and meta["step"] == best["step"]
    assert "train_state" not in meta and meta["metrics"] == {"val": pytest.approx(best["score"])}
    meta, tensors = read_checkpoint(out / "last.safetensors")
    ts = meta["train_state"]
    assert ts["best_step"] == loop.best_step and ts["run"] == {"calls": 12} and "rng.torch" in tensors
    assert meta["metrics"] == {"best_step": loop.best_step}
    assert loop.stop == {"reason": "meta_steps", "step": 12, "meta_steps": 12, "max_minutes": None}
    assert stop_line(loop.stop) == "training ran all 12 steps (train.meta_steps)"


def test_the_time_budget_stops_validates_and_says_why(tmp_path):
    loop = _loop(tmp_path, steps=10_000, eval_every=10_000, max_minutes=1e-9, steps_field="iterations")
    loop.fit()
    assert 1 <= loop.step < 10_000
    assert loop.stop == {"reason": "max_minutes", "step": loop.step, "iterations": 10_000, "max_minutes": 1e-9}
    stop = _rows(tmp_path / "run", "stop")
    assert stop == [{**stop[0], "step": loop.step, "event": "max_minutes"}]
    assert [r["step"] for r in _rows(tmp_path / "run", "val")] == [loop.step]  # validated where it stopped
    assert "ended training at step" in stop_line(loop.stop) and "train.iterations" in stop_line(loop.stop)


def test_resume_continues_bit_for_bit_and_row_for_row(tmp_path):
    cadence = {"log_every": 4, "eval_every": 3, "save_interval": 6}
    straight = _loop(tmp_path, "straight", **cadence)
    straight.fit()
    with pytest.raises(KeyboardInterrupt):  # killed during step 8: last.safetensors is at step 6, rows up to 6
        _loop(tmp_path, "halves", run=ToyRun(crash_at=8), **cadence).fit()
    meta, _ = read_checkpoint(tmp_path / "halves" / "last.safetensors")
    assert meta["step"] == 6 and meta["train_state"]["window"]["steps"] == 2  # half a row in the window
    resumed = _loop(tmp_path, "halves", **cadence)
    torch.manual_seed(123)  # whatever the global stream is now, the checkpoint's is restored
    resumed.fit(resume=True)
    for name in ("last.safetensors", "best.safetensors", "step-0000006.safetensors", "step-0000012.safetensors"):
        (_, a), (_, b) = read_checkpoint(tmp_path / "straight" / name), read_checkpoint(tmp_path / "halves" / name)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)

    def rows(name):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _rows(tmp_path / name)]

    assert rows("halves") == rows("straight") and [r["step"] for r in _rows(tmp_path / "halves", "train")] == [4, 8, 12]
    assert (resumed.best_step, resumed.best_score) == (straight.best_step, straight.best_score)


def test_resume_is_refused_without_a_checkpoint_or_for_another_kind(tmp_path):
    with pytest.raises(CheckpointError, match=r"^Toy: resume needs an existing checkpoint; got no file"):
        _loop(tmp_path).fit(resume=True)
    _loop(tmp_path).fit()
    with pytest.raises(CheckpointError, match="only model weights"):
        _loop(tmp_path, "other").resume(tmp_path / "run" / "best.safetensors")
    run = ToyRun()
    run.kind = "few-shot"
    with pytest.raises(CheckpointError, match=r"resume needs a few-shot checkpoint; got a checkpoint of kind 'toy'"):
        Loop(run, _settings(), tmp_path / "run").fit(resume=True)


def test_a_second_fit_continues_the_same_run(tmp_path):
    loop = _loop(tmp_path, steps=6)
    loop.fit()
    loop.settings = _settings(steps=12)
    loop.fit()
    assert loop.step == 12 and [r["step"] for r in _rows(tmp_path / "run", "train")] == [3, 6, 9, 12]


def test_a_nan_loss_stops_with_the_last_good_checkpoint_kept(tmp_path):
    loop = _loop(tmp_path, run=ToyRun(bad_calls={8: math.nan}), monitor=MonitorConfig())
    with pytest.raises(TrainingError, match=r"^Toy: the loss must be finite; got nan at step 8\. Training stopped and "
                                            r"the last good checkpoint is .*last\.safetensors\. Lower the toy's"):
        loop.fit()
    meta, _ = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["step"] == 6
    assert _rows(tmp_path / "run", "monitor")[0]["event"] == "nonfinite_loss"


def test_the_skip_policy_drops_flagged_updates_and_counts_them(tmp_path):
    run = ToyRun(bad_calls={5: math.nan, 9: math.inf})
    loop = _loop(tmp_path, run=run, monitor=MonitorConfig(policy="skip"))
    loop.fit()
    assert loop.step == 12 and 5 not in run.applied and 9 not in run.applied and len(run.applied) == 10
    assert loop.guard.events["skipped"] == 2 and all(torch.isfinite(run.w.detach()))
    train = _rows(tmp_path / "run", "train")
    assert [r["steps_in_row"] for r in train] == [3, 3, 3, 3]  # skipped steps count as steps, not in the loss
    meta, _ = read_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["train_state"]["events"]["skipped"] == 2


def test_a_third_kinds_checkpoint_is_checked_by_its_own_schema(tmp_path):
    _loop(tmp_path).fit()
    from metafit.training.checkpoint import write_checkpoint

    meta, tensors = read_checkpoint(tmp_path / "run" / "best.safetensors")
    write_checkpoint(tmp_path / "bad.safetensors", tensors, {**meta, "toy": ""})
    with pytest.raises(CheckpointError, match=r"^Checkpoint: toy in the metadata of .* must be valid"):
        read_checkpoint(tmp_path / "bad.safetensors")
    write_checkpoint(tmp_path / "odd.safetensors", tensors, {**meta, "kind": "chess"})
    with pytest.raises(CheckpointError, match=r"kind in the metadata of .* must be one of \[.*'toy'\]; got 'chess'"):
        read_checkpoint(tmp_path / "odd.safetensors")
    import metafit

    with pytest.raises(CheckpointError, match="must be a few-shot checkpoint here; got one of kind 'toy'"):
        metafit.load(tmp_path / "run" / "best.safetensors")
