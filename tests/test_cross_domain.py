"""Image polarity (models trained on dark ink on a light background, inverted, like Omniglot)
and evaluating a checkpoint on another dataset (`metafit eval CKPT --data folder:PATH`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import metafit
from conftest import tiny_config, write_image_tree
from metafit import ConfigError
from metafit.cli.main import main
from metafit.data import ImageClasses, ImageFormat
from metafit.training import build_model, evaluate_checkpoint, make_config, save_checkpoint, train


def _checkpoint(tmp_path, invert=True, name="ink"):
    data = {"name": "folder", "image_size": 16, "rotations": False, "channels": 1, "invert": invert}
    cfg = make_config(tiny_config(tmp_path / f"run-{name}", data=data))
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / f"{name}.safetensors", build_model(cfg), cfg, step=1)


def _ink_classes(n_classes, per_class=8, seed=0) -> ImageClasses:
    """Model input of an Omniglot-style model: ink high on a dark (0) page, 16x16."""
    pages, _ = _ink_images(n_classes, per_class, size=16, seed=seed)
    images = torch.from_numpy(255 - np.stack(pages))[:, None]
    return ImageClasses(images, torch.arange(n_classes) * per_class, torch.full((n_classes,), per_class),
                        tuple(f"c{c}" for c in range(n_classes)), torch.zeros(n_classes, dtype=torch.long), ("g",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A grayscale inverted (ink = 1) ProtoNet trained briefly on ink-on-white classes."""
    out = tmp_path_factory.mktemp("trained")
    data = {"name": "folder", "image_size": 16, "rotations": False, "channels": 1, "invert": True}
    cfg = make_config(tiny_config(out / "run", data=data, train={"meta_steps": 40, "eval_every": 20,
                                                                  "save_interval": 20, "log_every": 20,
                                                                  "progress": False, "device": "cpu"},
                                  eval={"n_ways": 3, "k_shots": 1, "n_queries": 3, "val_episodes": 4,
                                        "test_episodes": 4}))
    splits = {"train": _ink_classes(20, seed=1), "val": _ink_classes(5, seed=2), "test": _ink_classes(5, seed=3)}
    report = train(cfg, splits=splits, test=False)
    return report["best_checkpoint"]


def _ink_images(n_classes=5, per_class=4, size=20, seed=0):
    """Dark strokes on a white page (clean 3-pixel margin): per class a pattern, noisy copies."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_classes):
        pattern = rng.random((size - 6, size - 6)) < 0.3
        for _ in range(per_class):
            ink = pattern ^ (rng.random(pattern.shape) < 0.05)
            page = np.full((size, size), 255, np.uint8)
            page[3:-3, 3:-3][ink] = 0
            images.append(page)
            labels.append(f"c{c}")
    return images, labels


def _write_tree(root, images, labels):
    for i, (img, lab) in enumerate(zip(images, labels)):
        (root / lab).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(root / lab / f"img{i:03d}.png")
    return root


@pytest.fixture
def ink(tmp_path):
    images, labels = _ink_images()
    support = [i for i in range(len(images)) if i % 4 == 0]
    query = [i for i in range(len(images)) if i % 4 != 0]
    return images, labels, support, query


def test_auto_reads_an_inverted_set_like_the_original(trained, ink):
    images, labels, s, q = ink
    model = metafit.load(trained)
    assert model.image_format == ImageFormat(16, 1, True) and model.image_format.background == "light"
    inverted = [255 - img for img in images]
    ref = model.adapt([images[i] for i in s], [labels[i] for i in s])
    assert ref.polarity == "auto" and ref.support_polarity.used == "as_trained"
    ref_pred = ref.predict([images[i] for i in q])
    assert ref_pred.polarity.used == "as_trained" and ref_pred.polarity.flipped == 0

    task = model.adapt([inverted[i] for i in s], [labels[i] for i in s])  # auto is the default
    assert task.support_polarity.used == "flip" and task.support_polarity.flipped == len(s)
    pred = task.predict([inverted[i] for i in q])
    assert pred.polarity.used == "flip" and pred.polarity.flipped == len(q)
    assert pred.labels == ref_pred.labels
    ref_logits = ref.logits([images[i] for i in q])
    torch.testing.assert_close(task.logits([inverted[i] for i in q]), ref_logits, atol=1e-4, rtol=1e-4)

    # the same images read as trained are the wrong polarity: the model sees something else
    wrong = model.adapt([inverted[i] for i in s], [labels[i] for i in s], polarity="as_trained")
    wrong_pred = wrong.predict([inverted[i] for i in q])
    assert wrong_pred.polarity.used == "as_trained" and wrong_pred.labels != ref_pred.labels
    assert not torch.allclose(wrong.logits([inverted[i] for i in q]), ref_logits, atol=0, rtol=0.05)


def test_auto_never_flips_images_that_match_the_training_polarity(tmp_path, ink):
    images, _, _, _ = ink
    model = metafit.load(_checkpoint(tmp_path))
    as_trained = model.images(images, polarity="as_trained")
    x, used = model.images_polarity(images, "auto")
    assert used.flipped == 0 and used.used == "as_trained"
    torch.testing.assert_close(x, as_trained, atol=0, rtol=0)
    # a mixed set: only the inverted ones are flipped, back to exactly the as-trained input
    mixed = [255 - img if i % 3 == 0 else img for i, img in enumerate(images)]
    x, used = model.images_polarity(mixed, "auto")
    assert used.used == "mixed" and used.flipped == len(range(0, len(images), 3))
    torch.testing.assert_close(x, as_trained, atol=1e-6, rtol=0)
    # already converted model input (dark background after inversion) is left alone too
    x, used = model.images_polarity(as_trained, "auto")
    assert used.flipped == 0
    torch.testing.assert_close(x, as_trained, atol=0, rtol=0)


def test_models_without_a_polarity_convention_are_never_flipped_by_auto(tmp_path, ink):
    images, _, _, _ = ink
    model = metafit.load(_checkpoint(tmp_path, invert=False, name="plain"))
    assert model.image_format.background is None
    for imgs in (images, [255 - img for img in images]):
        x, used = model.images_polarity(imgs, "auto")
        assert used.flipped == 0
        torch.testing.assert_close(x, model.images(imgs, polarity="as_trained"), atol=0, rtol=0)


def test_explicit_polarity_overrides_and_is_remembered(tmp_path, ink):
    images, labels, s, q = ink
    model = metafit.load(_checkpoint(tmp_path))
    inverted = [255 - img for img in images]
    ref = model.adapt([images[i] for i in s], [labels[i] for i in s])
    ref_pred, ref_logits = ref.predict([images[i] for i in q]), ref.logits([images[i] for i in q])
    task = model.adapt([inverted[i] for i in s], [labels[i] for i in s], polarity="flip")
    assert task.polarity == "flip" and task.support_polarity.used == "flip"
    pred = task.predict([inverted[i] for i in q])  # the task's own polarity: flip
    assert pred.polarity.requested == "flip" and pred.labels == ref_pred.labels
    # per call: original queries read as trained give the same answers as well
    same = task.predict([images[i] for i in q], polarity="as_trained")
    assert same.labels == ref_pred.labels and same.polarity.used == "as_trained"
    torch.testing.assert_close(task.logits([images[i] for i in q], polarity="as_trained"), ref_logits,
                               atol=1e-4, rtol=1e-4)
    # flip forced on matching images: they become the wrong polarity
    forced = task.predict([images[i] for i in q], polarity="flip")
    assert forced.polarity.used == "flip" and forced.labels != ref_pred.labels
    # a saved task keeps its polarity
    path = task.save(tmp_path / "task.safetensors")
    again = metafit.load_task(path)
    assert again.polarity == "flip"
    torch.testing.assert_close(again.predict([inverted[i] for i in q]).probabilities, pred.probabilities)
    with pytest.raises(ConfigError, match=r"^Adapt: polarity must be one of 'auto', 'as_trained', 'flip'; got "
                                          r"'invert'\. ") as err:
        model.adapt(images[:2], ["a", "b"], polarity="invert")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^Predict: polarity must be one of"):
        task.predict(images[:1], polarity="up")


def test_cli_adapt_and_predict_report_the_polarity(tmp_path, ink, capsys):
    images, labels, s, q = ink
    ckpt = _checkpoint(tmp_path)
    inverted = [255 - img for img in images]
    support = _write_tree(tmp_path / "support", [inverted[i] for i in s], [labels[i] for i in s])
    queries = _write_tree(tmp_path / "queries", [inverted[i] for i in q], [labels[i] for i in q])
    assert main(["adapt", str(ckpt), "--support", str(support), "--out", str(tmp_path / "t.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "polarity flipped (other polarity) (requested auto" in out and "predictions use polarity auto" in out
    assert main(["predict", str(tmp_path / "t.safetensors"), "--images", str(queries),
                 "--out", str(tmp_path / "p.json")]) == 0
    captured = capsys.readouterr()
    assert "images: polarity flipped" in captured.out and not captured.err  # --out: the notes go with the summary
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["polarity"]["used"] == "flip" and report["polarity"]["flipped"] == len(q)
    labels_auto = [r["label"] for r in report["predictions"]]
    # explicit override on the command line: read as trained, nothing flipped
    assert main(["predict", str(ckpt), "--support", str(support), "--images", str(queries), "--polarity",
                 "as_trained", "--out", str(tmp_path / "p2.json")]) == 0
    out = capsys.readouterr().out
    assert "support: polarity as trained (requested as_trained" in out and "images: polarity as trained" in out
    assert json.loads((tmp_path / "p2.json").read_text())["polarity"]["flipped"] == 0
    assert main(["predict", str(tmp_path / "t.safetensors"), "--images", str(queries), "--polarity", "bad"]) != 0
    assert len(labels_auto) == len(q)
    capsys.readouterr()
    # CSV on stdout: the note goes to stderr, after the rows
    assert main(["predict", str(tmp_path / "t.safetensors"), "--images", str(queries)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("file,label,probability,top_k") and "images: polarity flipped" in captured.err


def _split_tree(root):
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        write_image_tree(root / split, n_classes=4 if split == "test" else 3, per_class=4, size=20, seed=seed)
    return root


def test_eval_on_another_folder_every_class_a_test_class(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    tree = write_image_tree(tmp_path / "other", n_classes=5, per_class=4, size=20)
    assert main(["eval", str(ckpt), "--data", f"folder:{tree}", "--ways", "3", "--episodes", "20",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert f"data: folder:{tree} (5 test classes, every class a test class" in out
    assert "test 3-way 1-shot" in out and "images read as grayscale 16x16, inverted" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"]["classes"] == 5 and report["data"]["images"] == 20 and report["episodes"] == 20
    assert report["data"]["polarity"]["requested"] == "auto" and report["rotations"] is False

    split = _split_tree(tmp_path / "split")
    res = evaluate_checkpoint(ckpt, data=f"folder:{split}", n_ways=3, episodes=20)
    assert res["data"]["classes"] == 4 and res["data"]["split"] == "its test/ folder"
    assert res["data"]["root"] == str(split / "test")
    res = evaluate_checkpoint(ckpt, data=f"folder:{split}", n_ways=3, episodes=5, split="val")
    assert res["data"]["classes"] == 3


def test_eval_on_another_folder_applies_auto_polarity(tmp_path, trained, monkeypatch):
    ckpt = trained
    images, labels = _ink_images(n_classes=4, per_class=4, seed=7)
    a = _write_tree(tmp_path / "a", images, labels)
    b = _write_tree(tmp_path / "b", [255 - img for img in images], labels)
    ra = evaluate_checkpoint(ckpt, data=f"folder:{a}", n_ways=3, episodes=20)
    rb = evaluate_checkpoint(ckpt, data=f"folder:{b}", n_ways=3, episodes=20)
    assert ra["data"]["polarity"]["flipped"] == 0 and rb["data"]["polarity"]["flipped"] == 16
    assert rb["mean"] == pytest.approx(ra["mean"]) and rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert ra["mean"] > 0.6  # well above chance (1/3): the model learned the ink
    rc = evaluate_checkpoint(ckpt, data=f"folder:{b}", n_ways=3, episodes=20, polarity="as_trained")
    assert rc["data"]["polarity"]["flipped"] == 0 and rc["loss"] > ra["loss"] * 1.05
    assert rc["mean"] < ra["mean"] - 0.1  # the wrong polarity costs accuracy
    # trees too large for memory are decoded on demand: each image's polarity is decided as it is read
    monkeypatch.setattr("metafit.data.source.memory_budget_bytes", lambda gb: 0)
    lazy = evaluate_checkpoint(ckpt, data=f"folder:{b}", n_ways=3, episodes=20)
    assert lazy["data"]["polarity"]["used"] == "per image on read"
    assert lazy["loss"] == pytest.approx(ra["loss"], rel=1e-5)


def test_eval_data_errors_are_one_line(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    tree = write_image_tree(tmp_path / "other", n_classes=4, per_class=3, size=20)
    cases = [
        (["--data", "nosuch:/x"], "error: Eval: data must name a known image source; got 'nosuch:/x'."),
        (["--data", "folder"], "error: Eval: data 'folder' must give its folder as folder:PATH"),
        (["--data", f"folder:{tmp_path / 'missing'}"], "error: Eval: data must name a folder of class folders"),
        (["--data", f"folder:{tree}", "--ways", "5"], "error: Eval: --ways must be at most the 4 test classes"),
        (["--data", f"folder:{tree}", "--split", "val"], "error: Eval: split must be 'test' for"),
    ]
    for extra, start in cases:
        assert main(["eval", str(ckpt), "--episodes", "2", *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1, err
    with pytest.raises(ConfigError, match=r"^Eval: data must be given alone"):
        evaluate_checkpoint(ckpt, data=f"folder:{tree}", data_root=str(tree))


def test_service_takes_and_reports_the_polarity(tmp_path, ink):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from test_serve import _files, serving

    images, labels, s, q = ink
    inverted = [255 - img for img in images]
    support = _write_tree(tmp_path / "support", [inverted[i] for i in s], [labels[i] for i in s])
    files = sorted(support.rglob("*.png"))
    names = [f.parent.name for f in files]
    with serving(_checkpoint(tmp_path)) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/tasks", files=_files(files), data={"labels": names})
        assert r.status_code == 201 and r.json()["polarity"]["used"] == "flip"
        task_id = r.json()["task_id"]
        r = c.post(f"/tasks/{task_id}/predict", files=_files(files[:2]))
        assert r.json()["polarity"]["requested"] == "auto" and r.json()["polarity"]["flipped"] == 2
        r = c.post(f"/tasks/{task_id}/predict", files=_files(files[:2]), data={"polarity": "as_trained"})
        assert r.json()["polarity"]["used"] == "as_trained"
        r = c.post("/tasks", files=_files(files), data={"labels": names, "polarity": "as_trained"})
        assert r.json()["polarity"]["flipped"] == 0
        r = c.post("/tasks", files=_files(files), data={"labels": names, "polarity": "sideways"})
        assert r.status_code == 400 and r.json()["error"].startswith("Serve: polarity must be one of")
