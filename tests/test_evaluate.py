"""Evaluation: confidence intervals, fixed episodes, and Lake's one-shot runs format."""

from __future__ import annotations

import math
import zipfile

import pytest
import torch

from conftest import tiny_config
from metafit import DataError
from metafit.data import load_runs
from metafit.training import build_model, evaluate_runs, make_config, save_checkpoint
from metafit.training.evaluate import summarize


def test_mean_and_95_percent_interval():
    accs = [0.5, 0.7, 0.9, 0.6, 0.8]
    r = summarize(accs, [1.0] * 5)
    mean = sum(accs) / 5
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / 4)
    assert r.mean == pytest.approx(mean) and r.std == pytest.approx(sd)
    assert r.ci95 == pytest.approx(1.96 * sd / math.sqrt(5))
    assert r.episodes == 5 and "per_episode" not in r.to_dict()


def _make_runs(omniglot_dir, root, n_runs=3, ways=20, same_image=True, prefix=True):
    """Lake's runs layout built from background images exactly as the official all_runs.zip lays it
    out: runNN/{training,test}/, class_labels.txt with lines 'runNN/test/itemXX.png
    runNN/training/classYY.png' (relative to the folder of the runs); ``prefix=False`` writes the
    paths relative to the run folder instead."""
    with zipfile.ZipFile(omniglot_dir / "images_background.zip") as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        by_char = {}
        for n in names:
            by_char.setdefault(n.rsplit("/", 1)[0], []).append(n)
        chars = sorted(by_char)
        for r in range(n_runs):
            run = root / f"run{r + 1:02d}"
            (run / "training").mkdir(parents=True)
            (run / "test").mkdir()
            lines = []
            for c in range(ways):
                files = by_char[chars[r * ways + c]]
                (run / "training" / f"class{c + 1:02d}.png").write_bytes(z.read(files[0]))
                q = (c * 7) % ways  # queries in a different order from the classes
                src = files[0] if same_image else files[1]
                (run / "test" / f"item{q + 1:02d}.png").write_bytes(z.read(by_char[chars[r * ways + c]][0] if same_image else src))
                pre = f"{run.name}/" if prefix else ""
                lines.append(f"{pre}test/item{q + 1:02d}.png {pre}training/class{c + 1:02d}.png")
            (run / "class_labels.txt").write_text("\n".join(sorted(lines)) + "\n")
    return root


@pytest.fixture
def checkpoint(tmp_path):
    cfg = make_config(tiny_config(tmp_path, data={"name": "omniglot", "image_size": 28}))
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "m.safetensors", build_model(cfg).eval(), cfg, step=0)


def test_runs_format_pairs_queries_with_their_class(omniglot_dir, tmp_path, checkpoint):
    runs = _make_runs(omniglot_dir, tmp_path / "runs")
    tasks = load_runs(runs)
    assert len(tasks) == 3
    name, task = tasks[0]
    assert name == "run01" and task.n_ways == 20
    assert task.support_x.shape == (20, 1, 28, 28) and task.query_x.shape == (20, 1, 28, 28)
    # each query is the very image of its class here, so the label must point at that image
    for i in range(20):
        assert torch.equal(task.query_x[i], task.support_x[task.query_y[i]])
    report = evaluate_runs(checkpoint, runs)
    assert report["mean"] == 1.0 and report["error_rate"] == 0.0 and set(report["per_run"]) == {"run01", "run02", "run03"}


def test_runs_paths_relative_to_the_run_folder_read_the_same(omniglot_dir, tmp_path):
    official = load_runs(_make_runs(omniglot_dir, tmp_path / "a", n_runs=1))
    plain = load_runs(_make_runs(omniglot_dir, tmp_path / "b", n_runs=1, prefix=False))
    (_, t1), (_, t2) = official[0], plain[0]
    assert torch.equal(t1.support_x, t2.support_x) and torch.equal(t1.query_y, t2.query_y)
    assert "run01/test/item01.png" in (tmp_path / "a" / "run01" / "class_labels.txt").read_text()


def test_runs_with_other_drawers_give_a_valid_report(omniglot_dir, tmp_path, checkpoint):
    runs = _make_runs(omniglot_dir, tmp_path / "runs", n_runs=2, same_image=False)
    report = evaluate_runs(checkpoint, runs)
    assert 0.0 <= report["mean"] <= 1.0 and report["episodes"] == 2


def test_runs_errors(tmp_path):
    with pytest.raises(DataError, match="must contain runNN/ folders"):
        load_runs(tmp_path)
    (tmp_path / "run01").mkdir()
    with pytest.raises(DataError, match="must contain class_labels.txt"):
        load_runs(tmp_path)
    (tmp_path / "run01" / "class_labels.txt").write_text("only-one-column\n")
    with pytest.raises(DataError, match="line 1 .* must be 'test/<file> training/<file>'"):
        load_runs(tmp_path)
    (tmp_path / "run01" / "class_labels.txt").write_text("run01/test/item01.png run01/training/class01.png\n")
    with pytest.raises(DataError, match="line 1 .* must name an existing image .*run01/test/item01.png"):
        load_runs(tmp_path)


def test_eval_of_the_val_split_reproduces_the_score_stored_in_best(tmp_path, synthetic_splits):
    from metafit.training import Trainer, evaluate_checkpoint, read_checkpoint

    cfg = make_config(tiny_config(tmp_path / "run", train={"meta_steps": 4, "eval_every": 2}))
    result = Trainer(cfg, splits=synthetic_splits).fit()
    stored = read_checkpoint(result.checkpoint)[0]["metrics"]["val"]
    res = evaluate_checkpoint(result.checkpoint, split="val", splits=synthetic_splits)
    assert res["episodes"] == cfg.eval.val_episodes != cfg.eval.test_episodes
    assert res["mean"] == stored["mean"]
