"""Pictures of runs: every training run draws learning_curve.png (the report's panels for one run,
also when the time budget stops it, skipped with a note without matplotlib), and `eval --plots`
draws a confusion matrix by dataset class and a grid of example episodes that agree with the
kept predictions, which leave the evaluation's numbers unchanged."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from PIL import Image

import metafit.training.plots as plots_mod
import metafit.training.curves as report_mod
from conftest import tiny_config, write_image_tree
from metafit import ConfigError
from metafit.cli import main
from metafit.training import Trainer, evaluate_checkpoint, load, load_config, make_config, read_run, train
from metafit.training.evaluate import evaluate_episodes
from metafit.training.plots import OTHER, confusion_counts
from metafit.training.curves import curve_panels
from metafit.training.trainer import RUN_FILES, make_sampler, remove_run_files

GREEN, RED = "tab:green", "tab:red"


def _capture(monkeypatch, module) -> list:
    """Record the figures ``module._save`` writes (and still write them)."""
    figures = []
    original = module._save

    def save(fig, path):
        figures.append(fig)
        return original(fig, path)

    monkeypatch.setattr(module, "_save", save)
    return figures


def _titles(fig) -> list[str]:
    return [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_visible()]


def _png(path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classification run on synthetic classes (the checkpoint of the eval tests)."""
    from conftest import synthetic_classes

    data = synthetic_classes(n_classes=30)
    ids = torch.arange(data.n_classes)
    splits = {"train": data.subset(ids[:18]), "val": data.subset(ids[18:24]), "test": data.subset(ids[24:])}
    out = tmp_path_factory.mktemp("plots") / "run"
    report = train(make_config(tiny_config(out)), splits=splits, test=False)
    return out, splits, report


def test_training_run_draws_its_learning_curve_with_the_report_panels(trained, monkeypatch):
    out, splits, report = trained
    png = out / "learning_curve.png"
    assert report["learning_curve"] == str(png)
    assert _png(png)[0] > 300 and png.stat().st_size > 5000
    # the same panels as `metafit report` draws for this one run: loss, accuracy, validation with its CI
    run = read_run(out)
    expected = [p.title for p in curve_panels([run])]
    assert expected == ["training loss (smoothed): 5-way 1-shot training episodes",
                        "training accuracy (%): 5-way 1-shot training episodes",
                        "validation accuracy (%) (95% CI): folder 5-way 1-shot, 10 fixed episodes"]
    figures = _capture(monkeypatch, report_mod)
    trainer = Trainer(make_config(tiny_config(out)), splits=splits)
    assert trainer.write_learning_curve() == png
    (fig,) = figures
    assert _titles(fig) == expected
    val_ax = [ax for ax in fig.axes if ax.get_visible()][2]
    (line,) = val_ax.get_lines()
    assert list(line.get_ydata()) == pytest.approx([100 * r["accuracy"] for r in run.val])
    assert len(run.val) == 2 and val_ax.collections, "the validation panel has its 95% CI band"
    # --overwrite deletes it with the rest of the run
    assert "learning_curve.png" in RUN_FILES
    copy = out.parent / "copy"
    copy.mkdir()
    (copy / "learning_curve.png").write_bytes(png.read_bytes())
    assert remove_run_files(copy) == ["learning_curve.png"]


def test_regression_run_stopped_by_the_time_budget_plots_mse(tmp_path, monkeypatch):
    figures = _capture(monkeypatch, report_mod)
    cfg = load_config("sinusoid_maml", ["train.meta_steps=1000", "train.max_minutes=0.0005", "train.eval_every=1000",
                                        "train.log_every=1", "eval.val_episodes=5", "train.progress=false",
                                        f"out_dir={tmp_path / 'sin'}"])
    report = train(cfg, test=False)
    assert report["stop"]["reason"] == "max_minutes" and report["steps"] < 1000
    assert report["learning_curve"] == str(tmp_path / "sin" / "learning_curve.png")
    _png(report["learning_curve"])
    (fig,) = figures
    titles = _titles(fig)
    assert [t.split(":")[0] for t in titles] == ["training loss (smoothed)", "training MSE",
                                                 "validation MSE (95% CI)"]
    assert len(fig.axes[2].get_lines()[0].get_ydata()) == 1  # the validation at the budget stop


def test_without_matplotlib_training_skips_the_curve_with_a_note(tmp_path, synthetic_splits, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    cfg = make_config(tiny_config(tmp_path / "run", train={"meta_steps": 2, "eval_every": 2, "log_every": 1}))
    with caplog.at_level(logging.INFO, logger="metafit.training.trainer"):
        result = Trainer(cfg, splits=synthetic_splits).fit()
    assert result.learning_curve is None and not (tmp_path / "run" / "learning_curve.png").exists()
    assert result.steps == 2 and (tmp_path / "run" / "best.safetensors").exists()
    assert any("learning curve not drawn: matplotlib is not installed" in r.getMessage() for r in caplog.records)


def test_keeping_predictions_leaves_the_numbers_unchanged_and_agrees_with_them(trained):
    out, splits, _ = trained
    model = load(out / "best.safetensors")
    sampler = make_sampler(splits["test"], model.run_config, "test", 0)
    episodes = sampler.fixed_episodes(7, 5)
    plain = evaluate_episodes(model, sampler, episodes)
    kept = evaluate_episodes(model, sampler, episodes, keep_predictions=2)
    assert plain.predictions is None and kept.predictions is not None
    assert kept.to_dict(per_episode=True).keys() == plain.to_dict(per_episode=True).keys()
    for key, value in plain.to_dict(per_episode=True).items():
        assert kept.to_dict(per_episode=True)[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    p = kept.predictions
    assert p.n_episodes == 7 and p.n_queries == 7 * 5 * 3 and len(p.episodes) == 2
    # (per-episode accuracies are float32 means: equal up to float32 rounding)
    assert float((p.true == p.predicted).double().mean()) == pytest.approx(plain.mean, abs=1e-6)
    test_names = set(splits["test"].class_names)
    assert set(p.classes) <= test_names
    for i, ep in enumerate(p.episodes):
        assert float(ep.correct.float().mean()) == plain.per_episode[i]
        assert list(ep.class_names) == [splits["test"].class_names[int(c)] for c in episodes[i].classes]
        # the pooled by-class record holds the same queries, in order
        start = i * len(ep.query_y)
        assert [p.classes[int(t)] for t in p.true[start:start + len(ep.query_y)]] == \
            [ep.class_names[int(y)] for y in ep.query_y]
        assert [p.classes[int(t)] for t in p.predicted[start:start + len(ep.query_y)]] == \
            [ep.class_names[int(y)] for y in ep.predicted]
    # confusion by dataset class: all queries counted, the diagonal holds the right ones
    labels, counts = confusion_counts(p)
    assert labels == sorted(p.classes) and int(counts.sum()) == p.n_queries
    assert int(counts.trace()) == int((p.true == p.predicted).sum())
    # with many classes the most confused are kept and the rest pooled, still counting every query
    labels3, counts3 = confusion_counts(p, max_classes=3)
    assert len(labels3) == 4 and labels3[-1] == OTHER and counts3.shape == (4, 4)
    assert int(counts3.sum()) == p.n_queries


def test_eval_plots_draw_confusion_and_episodes(trained, tmp_path, monkeypatch):
    out, splits, _ = trained
    ckpt = out / "best.safetensors"
    figures = _capture(monkeypatch, plots_mod)
    plain = evaluate_checkpoint(ckpt, splits=splits, episodes=6)
    drawn = evaluate_checkpoint(ckpt, splits=splits, episodes=6, plots=tmp_path / "plots")
    assert drawn["plots"] == {"confusion": str(tmp_path / "plots" / "confusion.png"),
                              "episodes": str(tmp_path / "plots" / "episodes.png")}
    for key in set(plain) - {"seconds"}:
        assert drawn[key] == pytest.approx(plain[key], abs=1e-12, nan_ok=True), key
    for path in drawn["plots"].values():
        assert min(_png(path)) > 200
    confusion, grid = figures
    # the confusion matrix: the counts written in its cells sum to the evaluated queries
    ax = confusion.axes[0]
    cells = [int(t.get_text()) for t in ax.texts]
    assert sum(cells) == 6 * 5 * 3
    assert "90 queries of 6 episodes" in ax.get_title()
    assert {t.get_text() for t in ax.get_yticklabels()} <= set(splits["test"].class_names)
    # the grid: every query drawn is framed green when right and red when wrong, as evaluated
    model = load(ckpt)
    sampler = make_sampler(splits["test"], model.run_config, "test", 0)
    eps = sampler.fixed_episodes(6, model.run_config.eval.seed + 1)
    kept = evaluate_episodes(model, sampler, eps, keep_predictions=3).predictions.episodes
    queries = [a for a in grid.axes if a.get_label().startswith("query ")]
    assert len(queries) == 3 * 10  # 3 episodes, 10 of their 15 queries (every class in turn)
    colors = {"tab:green": (0.17254901960784313, 0.6274509803921569, 0.17254901960784313, 1.0),
              "tab:red": (0.8392156862745098, 0.15294117647058825, 0.1568627450980392, 1.0)}
    seen = {True: 0, False: 0}
    for a in queries:
        _, e, i = a.get_label().split()
        ep = kept[int(e)]
        ok = bool(ep.correct[int(i)])
        seen[ok] += 1
        assert tuple(a.spines["left"].get_edgecolor()) == pytest.approx(colors[GREEN if ok else RED])
        assert a.get_title().split("\n")[0] == ep.class_names[int(ep.predicted[int(i)])]
        assert ("(true " in a.get_title()) == (not ok)
    assert sorted({int(a.get_label().split()[2]) // 3 for a in queries if a.get_label().split()[1] == "0"}) == \
        [0, 1, 2, 3, 4]  # every class of the episode shows up among its queries
    supports = [a for a in grid.axes if a.get_label().startswith("support ")]
    assert len(supports) == 3 * 5 and all(a.get_title() in set(kept[0].class_names) | set(kept[1].class_names)
                                          | set(kept[2].class_names) for a in supports)


def test_eval_plots_refuse_a_regression_checkpoint(tmp_path):
    cfg = load_config("sinusoid_maml", ["train.meta_steps=2", "train.eval_every=2", "eval.val_episodes=2",
                                        "train.progress=false", f"out_dir={tmp_path / 'sin'}"])
    report = train(cfg, test=False)
    with pytest.raises(ConfigError, match="--plots must be used with a classification checkpoint"):
        evaluate_checkpoint(report["best_checkpoint"], episodes=2, plots=tmp_path / "plots")
    assert not (tmp_path / "plots").exists()


def test_cli_eval_plots(tmp_path, capsys):
    import yaml

    data = write_image_tree(tmp_path / "data", n_classes=12, per_class=6, size=16, groups=2)
    cfg = tiny_config(tmp_path / "run", data={"root": str(data), "val_fraction": 0.25, "test_fraction": 0.25},
                      train={"meta_steps": 2, "eval_every": 2, "log_every": 1})
    cfg["eval"].update({"n_ways": 3, "val_episodes": 3, "test_episodes": 4})
    cfg["task"]["n_ways"] = 3
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-test"]) == 0
    assert (tmp_path / "run" / "learning_curve.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "best.safetensors"), "--episodes", "4",
                 "--plots", str(tmp_path / "pics")]) == 0
    text = capsys.readouterr().out
    assert f"confusion plot: {tmp_path / 'pics' / 'confusion.png'}" in text
    assert f"episodes plot: {tmp_path / 'pics' / 'episodes.png'}" in text
    _png(tmp_path / "pics" / "confusion.png")
    _png(tmp_path / "pics" / "episodes.png")


def test_figures_are_an_extra_named_where_they_are_needed(tmp_path, monkeypatch, capsys):
    """Without matplotlib (the plots extra) training, quickstart and rl train go on without their
    figures; report and eval --plots refuse with one line naming the extra."""
    from metafit.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["quickstart", "--steps", "4", "--out-dir", str(tmp_path / "qs")]) == 0
    assert 'plot of adapted curves: skipped, matplotlib is not installed (pip install -c constraints.txt -e ".[plots]"' \
        in capsys.readouterr().out
    assert not (tmp_path / "qs" / "adaptation.png").exists() and (tmp_path / "qs" / "best.safetensors").is_file()
    assert main(["report", str(tmp_path / "qs"), "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Report: drawing learning curves needs matplotlib" in err[0] and ".[plots]" in err[0]
