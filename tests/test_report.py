"""metafit report: the table matches report.json, curves are a real PNG, damaged or unfinished
run folders are read tolerantly, and mistakes give one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from conftest import tiny_config, write_image_tree
from metafit import DataError
from metafit.cli import main
from metafit.tools import report_runs
from metafit.training import load_config, make_config, read_run, train

FAST = ["train.eval_every=10", "train.log_every=2", "eval.val_episodes=10", "eval.test_episodes=12",
        "train.progress=false", "train.num_threads=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short sinusoid runs (different lengths and step sizes) and a small image classification run."""
    root = tmp_path_factory.mktemp("runs")
    a = train(load_config("sinusoid_maml", FAST + ["train.meta_steps=30", f"out_dir={root / 'maml-a'}"]))
    b = train(load_config("sinusoid_maml", FAST + ["train.meta_steps=40", "train.meta_lr=0.003",
                                                   f"out_dir={root / 'maml-b'}"]))
    data = write_image_tree(root / "images", n_classes=12, per_class=6, size=16, groups=2)
    cfg = tiny_config(root / "proto", data={"root": str(data), "val_fraction": 0.25, "test_fraction": 0.25},
                      train={"meta_steps": 12, "eval_every": 4, "log_every": 2})
    cfg["eval"].update({"n_ways": 3, "val_episodes": 6, "test_episodes": 8})
    cfg["task"]["n_ways"] = 4
    c = train(make_config(cfg))
    return {"maml-a": (root / "maml-a", a), "maml-b": (root / "maml-b", b), "proto": (root / "proto", c)}


def _row(table: str, run: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == run:
            return cells
    raise AssertionError(f"{run} not in\n{table}")


def test_two_runs_table_matches_report_json(runs, tmp_path):
    dirs = [runs["maml-a"][0], runs["maml-b"][0]]
    result = report_runs(dirs, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert result["table"] in md and "![learning curves](curves.png)" in md
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert header == ["run", "algorithm", "task", "steps", "train min", "best val", "best step", "test"]
    for name in ("maml-a", "maml-b"):
        report = runs[name][1]
        cells = _row(result["table"], name)
        val, test = report["val"], report["test"]
        assert cells[1:5] == ["maml (mlp)", "sinusoid 5-shot", str(report["steps"]),
                              f"{report['train_seconds'] / 60:.2f}"]
        assert cells[5] == f"MSE {val['mean']:.4f} ± {val['ci95']:.4f}"
        assert cells[6] == str(report["best_step"])
        assert cells[7] == f"MSE {test['mean']:.4f} ± {test['ci95']:.4f} (12 tasks)"
        summary = next(s for s in result["runs"] if s["run"] == name)
        assert summary["finished"] and summary["best_val"]["mean"] == val["mean"]
    assert _row(result["table"], "maml-a")[3] == "30" and _row(result["table"], "maml-b")[3] == "40"
    with Image.open(result["curves"]) as img:
        img.load()
        assert img.format == "PNG" and img.size[0] > 800


def test_classification_and_regression_runs_get_separate_panels(runs, tmp_path):
    one = report_runs([runs["maml-a"][0]], tmp_path / "one")
    mixed = report_runs([runs["proto"][0], runs["maml-a"][0]], tmp_path / "mixed")
    _, report = runs["proto"]
    cells = _row(mixed["table"], "proto")
    assert cells[1:3] == ["protonet (conv4)", "folder 3-way 1-shot (trained 4-way 1-shot)"]
    assert cells[5] == f"{100 * report['val']['mean']:.2f}% ± {100 * report['val']['ci95']:.2f}%"
    assert cells[7] == f"{100 * report['test']['mean']:.2f}% ± {100 * report['test']['ci95']:.2f}% (8 episodes)"
    with Image.open(one["curves"]) as a, Image.open(mixed["curves"]) as b:
        assert b.size[1] > 1.6 * a.size[1]  # a second row of panels for the second metric


def test_unfinished_and_damaged_runs_are_read_tolerantly(runs, tmp_path):
    path, report = runs["maml-b"]
    crashed = tmp_path / "crashed"
    shutil.copytree(path, crashed)
    (crashed / "report.json").unlink()
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    extra = [json.dumps({"step": 7, "split": "monitor", "event": "loss_spike", "action": "skip"}),
             json.dumps({"event": "note", "text": "rows without a split are ignored"}),
             "[1, 2]"]
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:3] + extra + lines[3:]) + '\n{"step": 42, "split": "tr')
    run = read_run(crashed)
    assert run.skipped_lines == 1 and not run.finished and run.metric == "mse"
    assert [r["step"] for r in run.val] == [10, 20, 30, 40]
    result = report_runs([crashed], tmp_path / "rep")
    cells = _row(result["table"], "crashed (unfinished)")
    # without report.json the best validation row gives the same answer as the trainer's report
    assert cells[5] == f"MSE {report['val']['mean']:.4f} ± {report['val']['ci95']:.4f}"
    assert cells[6] == str(report["best_step"]) and cells[3] == "40" and cells[7] == "-"
    assert any("1 damaged line" in n for n in result["notes"]) and any("no report.json" in n for n in result["notes"])

    # a crash and a resume: rows logged after the last checkpoint are repeated; the resumed ones win
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    rows = [{"step": s, "split": "train", "loss": 1.0, "mse": 1.0} for s in (2, 4, 6)]
    rows += [{"step": 4, "split": "val", "loss": 9.0, "mse": 9.0, "ci95": 1.0}]
    rows += [{"step": s, "split": "train", "loss": 0.5, "mse": 0.5} for s in (4, 6, 8)]
    rows += [{"step": 4, "split": "val", "loss": 3.0, "mse": 3.0, "ci95": 1.0}]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = read_run(resumed)
    assert [(r["step"], r["loss"]) for r in run.train] == [(2, 1.0), (4, 0.5), (6, 0.5), (8, 0.5)]
    assert [(r["step"], r["mse"]) for r in run.val] == [(4, 3.0)] and run.last_step == 8
    assert report_runs([resumed, crashed], tmp_path / "rep2")["runs"][0]["best_val"]["mean"] == 3.0


def test_missing_metrics_is_an_error_naming_the_folder(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"^Report: '.*empty' must be a run folder with metrics.jsonl; got a folder "
                                        r"without it\. Pass the out_dir of a `metafit train` run"):
        report_runs([empty])
    parent = runs["maml-a"][0].parent
    with pytest.raises(DataError, match=r"It holds 3 run folder\(s\) \(maml-a, maml-b, proto\): pass them instead"):
        report_runs([parent])
    with pytest.raises(DataError, match=r"^Report: run folder '.*nowhere' must exist; got a missing path\."):
        report_runs([tmp_path / "nowhere"])


def test_cli_report(runs, tmp_path, capsys):
    a, b = runs["maml-a"][0], runs["maml-b"][0]
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "r"), "--metric", "loss"]) == 0
    text = capsys.readouterr().out
    assert "| maml-a " in text and "| maml-b " in text and f"curves: {tmp_path / 'r' / 'curves.png'}" in text
    with Image.open(tmp_path / "r" / "curves.png") as img:
        assert img.format == "PNG"
    assert main(["report", str(a)]) == 0  # default folder: beside the runs
    assert (a.parent / "report" / "report.md").is_file()
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Report: ") and "must be a run folder with metrics.jsonl" in err
    assert err.count("\n") == 1


def test_algorithm_label_names_the_variant():
    from metafit.tools.report import _algorithm_label

    assert _algorithm_label({"name": "maml", "first_order": True}) == "maml, first order"
    assert _algorithm_label({"name": "maml", "first_order": False}) == "maml"
    assert _algorithm_label({"name": "transfer", "head": "finetune"}) == "transfer, finetune head"


@pytest.fixture(scope="module")
def class_runs(tmp_path_factory):
    """Image classification runs on one folder dataset: two ProtoNet runs trained on 4-way episodes
    (validated 3-way and 2-way) and a transfer run trained on supervised mini-batches (validated 3-way)."""
    root = tmp_path_factory.mktemp("class_runs")
    data = write_image_tree(root / "images", n_classes=12, per_class=6, size=16, groups=2)
    runs = {}
    for name, alg, eval_ways in (("proto-3way", {"name": "protonet"}, 3), ("proto-2way", {"name": "protonet"}, 2),
                                 ("transfer", {"name": "transfer", "batch_size": 8, "head": "centroid"}, 3)):
        cfg = tiny_config(root / "runs" / name, data={"root": str(data), "val_fraction": 0.25, "test_fraction": 0.25},
                          algorithm=alg, train={"meta_steps": 8, "eval_every": 4, "log_every": 2, "num_threads": 1})
        cfg["eval"].update({"n_ways": eval_ways, "val_episodes": 6, "test_episodes": 6})
        cfg["task"]["n_ways"] = 4
        train(make_config(cfg), test=False)
        runs[name] = root / "runs" / name
    return runs


def test_curves_never_overlay_metrics_of_different_meaning(class_runs, tmp_path, monkeypatch):
    import metafit.training.curves as report_module

    figures = []
    monkeypatch.setattr(report_module, "_save", lambda fig, path: figures.append(fig) or path)
    names = ["proto-3way", "transfer", "proto-2way"]
    result = report_runs([class_runs[n] for n in names], tmp_path / "rep")
    n_base = json.loads((class_runs["transfer"] / "config.json").read_text())["algorithm"]["n_base_classes"]
    panels = {p["title"]: p["runs"] for p in result["panels"]}
    # training accuracy: 4-way episode accuracy and supervised accuracy over all base classes apart
    assert panels["training accuracy (%): 4-way 1-shot training episodes"] == ["proto-3way", "proto-2way"]
    assert panels[f"training accuracy (%): supervised over {n_base} classes (mini-batches)"] == ["transfer"]
    assert panels[f"training loss (smoothed): supervised over {n_base} classes (mini-batches)"] == ["transfer"]
    # validation: the same fixed 3-way episodes share a panel, the 2-way ones do not
    assert panels["validation accuracy (%) (95% CI): folder 3-way 1-shot, 6 fixed episodes"] == ["proto-3way",
                                                                                                "transfer"]
    assert panels["validation accuracy (%) (95% CI): folder 2-way 1-shot, 6 fixed episodes"] == ["proto-2way"]
    assert len(panels) == 6
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "- validation accuracy (%) (95% CI): folder 3-way 1-shot, 6 fixed episodes: proto-3way, transfer" in md

    # the figure: one panel each, labelled, x = training time from the logs' elapsed_s
    (fig,) = figures
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [" ".join(ax.get_title().split()) for ax in axes] == [p["title"] for p in result["panels"]]
    for ax, panel in zip(axes, result["panels"]):
        assert ax.get_xlabel() == "training time (s, validation included)"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == panel["runs"]
    val_3way = axes[[p["title"] for p in result["panels"]].index(
        "validation accuracy (%) (95% CI): folder 3-way 1-shot, 6 fixed episodes")]
    run = read_run(class_runs["transfer"])
    line = next(ln for ln in val_3way.get_lines() if ln.get_label() == "transfer")
    assert list(line.get_xdata()) == pytest.approx([r["elapsed_s"] for r in run.val])
    assert list(line.get_ydata()) == pytest.approx([100 * r["accuracy"] for r in run.val])

    # images seen: a ProtoNet step is one 4-way episode of 1 + 3 images per class, a transfer step 8 images
    figures.clear()
    report_runs([class_runs["proto-3way"], class_runs["transfer"]], tmp_path / "rep2", x="images")
    lines = {ln.get_label(): ln for ax in figures[0].axes for ln in ax.get_lines()
             if ax.get_title().startswith("validation")}
    proto, transfer = read_run(class_runs["proto-3way"]), read_run(class_runs["transfer"])
    assert list(lines["proto-3way"].get_xdata()) == [r["step"] * 16 for r in proto.val]
    assert list(lines["transfer"].get_xdata()) == [r["step"] * 8 for r in transfer.val]
    assert figures[0].axes[0].get_xlabel() == "training images seen"


def test_cli_report_lists_the_panels(class_runs, tmp_path, capsys):
    dirs = [str(class_runs["proto-3way"]), str(class_runs["transfer"])]
    assert main(["report", *dirs, "--out", str(tmp_path / "r"), "--x", "images", "--metric", "loss"]) == 0
    text = capsys.readouterr().out
    assert "  training loss (smoothed): 4-way 1-shot training episodes: proto-3way\n" in text
    assert "  validation loss: folder 3-way 1-shot, 6 fixed episodes: proto-3way, transfer\n" in text
    assert main(["report", *dirs, "--x", "steps"]) == 1
    assert "argument --x: invalid choice: 'steps'" in capsys.readouterr().err
