"""Putting a model to work: adapt to labelled images of any kind, predict, save and reload tasks,
and the `metafit adapt` / `metafit predict` commands."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import metafit
from conftest import tiny_config, write_image_tree
from metafit import CheckpointError, DataError, TaskError
from metafit.cli.main import main
from metafit.data import ImageFormat, list_labelled_images
from metafit.training import build_model, make_config, read_checkpoint, save_checkpoint


def _checkpoint(tmp_path, name="protonet", **alg):
    cfg = make_config(tiny_config(tmp_path / "run", algorithm={"name": name, **alg}))
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / f"{name}.safetensors", build_model(cfg), cfg, step=1)


@pytest.fixture
def support_tree(tmp_path):
    return write_image_tree(tmp_path / "support", n_classes=5, per_class=1, size=20)


def test_adapt_on_files_with_names_predicts_names(tmp_path, support_tree):
    ckpt = _checkpoint(tmp_path)
    model = metafit.load(ckpt)
    assert model.image_format == ImageFormat(16, 1, False)
    assert read_checkpoint(ckpt)[0]["image_format"] == {"size": 16, "channels": 1, "invert": False, "fit": "squash"}
    files, labels = list_labelled_images(support_tree)
    names = [f"kind-{lab}" for lab in labels]
    task = model.adapt(files, names)
    assert task.class_names == tuple(dict.fromkeys(names))
    pred = task.predict(files)
    assert pred.labels == names  # one shot: every support image is its own class prototype
    assert pred.probabilities.shape == (5, 5)
    torch.testing.assert_close(pred.probabilities.sum(-1), torch.ones(5))
    top = pred.top_k(2)
    assert len(top) == 5 and top[0][0][0] == names[0] and top[0][0][1] >= top[0][1][1]


def test_every_input_kind_converts_the_same_way(tmp_path):
    fmt = ImageFormat(16, 1, True)
    rgb = (np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb, "RGB").save(path)
    ref = fmt.convert(path)
    assert ref.shape == (1, 1, 16, 16) and 0.0 <= float(ref.min()) and float(ref.max()) <= 1.0
    for item in (Image.open(path), rgb, rgb.astype(np.float32) / 255.0, torch.from_numpy(rgb)):
        torch.testing.assert_close(fmt.convert([item]), ref, atol=1 / 255 + 1e-6, rtol=0)
    # ink polarity: a white page with nothing on it is all zeros for an Omniglot-style model
    white = Image.new("L", (50, 50), 255)
    assert float(fmt.convert(white).abs().max()) == 0.0
    assert float(ImageFormat(16, 1, False).convert(white).min()) == 1.0
    # an already converted batch passes through untouched
    batch = torch.rand(3, 1, 16, 16)
    assert torch.equal(fmt.convert(batch), batch)


def test_bad_input_names_the_problem(tmp_path, support_tree):
    model = metafit.load(_checkpoint(tmp_path))
    files, labels = list_labelled_images(support_tree)
    with pytest.raises(TaskError, match="one label per support image"):
        model.adapt(files, labels[:-1])
    with pytest.raises(TaskError, match="at least 2 classes"):
        model.adapt(files[:2], ["a", "a"])
    with pytest.raises(TaskError, match="strings or integers"):
        model.adapt(files[:2], [1.5, 2.5])
    with pytest.raises(TaskError, match="steps only apply"):
        model.adapt(files, labels, steps=3)
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(DataError, match="readable image"):
        model.adapt([not_image, files[0]], ["a", "b"])
    with pytest.raises(DataError, match="file path, PIL image"):
        model.adapt([{"x": 1}, files[0]], ["a", "b"])
    with pytest.raises(DataError, match="existing image file"):
        model.adapt([tmp_path / "missing.png", files[0]], ["a", "b"])


@pytest.mark.parametrize("name,alg", [("protonet", {}), ("maml", {"eval_inner_steps": 2}),
                                      ("transfer", {"n_base_classes": 6, "head": "finetune", "finetune_steps": 2}),
                                      ("svm", {}), ("ridge", {})])
def test_saved_tasks_predict_the_same_without_the_support_set(tmp_path, support_tree, name, alg):
    ckpt = _checkpoint(tmp_path, name, **alg)
    files, labels = list_labelled_images(support_tree)
    task = metafit.load(ckpt).adapt(files, labels)
    before = task.predict(files)
    path = task.save(tmp_path / "task.safetensors")
    again = metafit.load_task(path)
    assert again.class_names == task.class_names
    after = again.predict(files)
    torch.testing.assert_close(after.probabilities, before.probabilities, atol=1e-6, rtol=0)
    assert after.labels == before.labels


def test_a_task_refuses_another_checkpoint(tmp_path, support_tree):
    ckpt = _checkpoint(tmp_path)
    files, labels = list_labelled_images(support_tree)
    path = metafit.load(ckpt).adapt(files, labels).save(tmp_path / "task.safetensors")
    cfg = make_config(tiny_config(tmp_path / "other"))
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other.safetensors", build_model(cfg), cfg, step=1)
    with pytest.raises(CheckpointError, match="checkpoint it was adapted with"):
        metafit.load_task(path, other)
    with pytest.raises(CheckpointError, match="without metafit task metadata"):
        metafit.load_task(ckpt)
    with pytest.raises(CheckpointError, match="saved task file"):
        metafit.load_task(tmp_path / "nope.safetensors")
    ckpt.unlink()
    with pytest.raises(CheckpointError, match="must be available"):
        metafit.load_task(path)


def test_cli_adapt_then_predict(tmp_path, support_tree, capsys):
    ckpt = _checkpoint(tmp_path)
    task = tmp_path / "task.safetensors"
    assert main(["adapt", str(ckpt), "--support", str(support_tree), "--out", str(task)]) == 0
    assert "adapted protonet to 5 classes from 5 images" in capsys.readouterr().out
    out_csv = tmp_path / "p.csv"
    assert main(["predict", str(task), "--images", str(support_tree), "--out", str(out_csv), "--top-k", "2"]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 5 and all(r["label"] == r["file"].split("/")[-2] for r in rows)
    assert len(rows[0]["top_k"].split(";")) == 2
    out_json = tmp_path / "p.json"
    one = next(support_tree.rglob("*.png"))
    assert main(["predict", str(ckpt), "--support", str(support_tree), "--images", str(one),
                 "--out", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert data["classes"] == sorted(data["classes"]) and data["predictions"][0]["label"] == one.parent.name
    capsys.readouterr()
    assert main(["predict", str(ckpt), "--images", str(one)]) == 1
    assert "needs --support" in capsys.readouterr().err
    assert main(["predict", str(task), "--support", str(support_tree), "--images", str(one)]) == 1
    assert main(["adapt", str(ckpt), "--support", str(tmp_path / "none"), "--out", str(task)]) == 1
    assert "one sub-folder per class" in capsys.readouterr().err
