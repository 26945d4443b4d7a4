"""metafit.sklearn.FewShotClassifier: a trained model as a scikit-learn classifier (fit adapts it
to the support set), with scikit-learn's own estimator checks where they apply."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.model_selection import StratifiedKFold, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer  # noqa: E402
from sklearn.utils.estimator_checks import check_estimator  # noqa: E402

import metafit  # noqa: E402
from conftest import synthetic_classes, tiny_config  # noqa: E402
from metafit import CheckpointError, ConfigError, DataError, MetafitError, TaskError  # noqa: E402
from metafit.sklearn import FewShotClassifier  # noqa: E402
from metafit.training import build_model, make_config, save_checkpoint, train  # noqa: E402

SIZE = 16  # tiny_config's image size


def _save(path, seed=0, **alg):
    cfg = make_config(tiny_config(path.parent / f"run{seed}", algorithm={"name": "protonet", **alg}))
    torch.manual_seed(seed)
    return save_checkpoint(path, build_model(cfg), cfg, step=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(_save(tmp_path_factory.mktemp("sk") / "protonet.safetensors"))


@pytest.fixture(scope="module")
def data():
    """Three learnable classes of 16x16 uint8 images [N, H, W]: 4 support and 6 query images each."""
    d = synthetic_classes(n_classes=3, per_class=10, size=SIZE, seed=3, noise=0.1)
    images = d.images[:, 0].numpy()  # [30, 16, 16] uint8
    cls = np.repeat(np.arange(3), 10)
    support = np.concatenate([np.arange(c * 10, c * 10 + 4) for c in range(3)])
    query = np.setdiff1d(np.arange(30), support)
    return images, cls, support, query


NAMES = np.array(["zebra", "apple", "mango"])  # first appearance order != sorted order


def test_fit_predict_proba_follow_sorted_classes(ckpt, data):
    images, cls, s, q = data
    y = NAMES[cls]
    clf = FewShotClassifier(ckpt)
    assert clf.fit(images[s], y[s]) is clf
    assert list(clf.classes_) == ["apple", "mango", "zebra"]
    proba = clf.predict_proba(images[q])
    assert proba.shape == (len(q), 3) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    pred = clf.predict(images[q])
    assert pred.dtype == clf.classes_.dtype and pred.shape == (len(q),)
    np.testing.assert_array_equal(pred, clf.classes_[proba.argmax(1)])
    # the same numbers as metafit's own API, whose columns are in order of first appearance
    ref = metafit.load(ckpt).adapt(list(images[s]), list(y[s])).predict(list(images[q]))
    by_name = dict(zip(ref.class_names, ref.probabilities.double().numpy().T))
    np.testing.assert_allclose(proba, np.stack([by_name[c] for c in clf.classes_], 1), atol=1e-6)
    assert list(pred) == ref.labels
    assert clf.score(images[q], y[q]) == np.mean(pred == y[q])
    assert not hasattr(clf, "n_features_in_")  # images, not rows
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(images[q])), proba, atol=1e-9)


@pytest.mark.parametrize("labels", [np.array([30, -2, 7]), np.array([3.0, 1.0, 2.0]), np.array([True, False, True])])
def test_integer_float_and_bool_labels(ckpt, data, labels):
    images, cls, s, q = data
    if labels.dtype == bool:  # two classes
        s, q = s[cls[s] < 2], q[cls[q] < 2]
    y = labels[cls]
    clf = FewShotClassifier(ckpt).fit(images[s], y[s])
    np.testing.assert_array_equal(clf.classes_, np.unique(y))
    pred = clf.predict(images[q])
    assert pred.dtype == y.dtype
    # the names do not change what the model predicts: the same classes as with labels 0, 1, 2
    by_index = FewShotClassifier(ckpt).fit(images[s], cls[s])
    np.testing.assert_array_equal(pred, labels[by_index.predict(images[q])])
    order = np.argsort(labels[by_index.classes_])  # classes_ sorted by name
    np.testing.assert_allclose(clf.predict_proba(images[q]), by_index.predict_proba(images[q])[:, order], atol=1e-6)


def test_every_input_layout_gives_the_same_predictions(ckpt, data, tmp_path):
    images, cls, s, q = data
    y = NAMES[cls]
    ref = FewShotClassifier(ckpt).fit(images[s], y[s]).predict_proba(images[q])
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im, "L").save(paths[-1])
    paths = np.array(paths, dtype=object)
    layouts = {
        "floats": images / 255.0,
        "hwc": images[..., None],
        "chw": images[:, None],
        "rgb": np.repeat(images[..., None], 3, axis=-1),
        "flat": images.reshape(len(images), -1),
        "paths": paths,
        "pil": np.array([Image.fromarray(im, "L") for im in images] + [None], dtype=object)[:-1],
    }
    for name, X in layouts.items():
        clf = FewShotClassifier(ckpt).fit(X[s], y[s])
        np.testing.assert_allclose(clf.predict_proba(X[q]), ref, atol=1e-5, err_msg=name)
        assert hasattr(clf, "n_features_in_") == (name == "flat"), name
    flat = FewShotClassifier(ckpt).fit(layouts["flat"][s], y[s])
    assert flat.n_features_in_ == SIZE * SIZE
    # larger images are resized like the model's training images
    big = np.kron(images, np.ones((1, 2, 2), dtype=np.uint8))  # [N, 32, 32]
    assert FewShotClassifier(ckpt).fit(big[s], y[s]).predict_proba(big[q]).shape == (len(q), 3)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """ProtoNet meta-trained for 30 steps (~3 s) on other synthetic classes."""
    data = synthetic_classes(n_classes=30, seed=0)
    ids = torch.arange(30)
    splits = {"train": data.subset(ids[:18]), "val": data.subset(ids[18:24]), "test": data.subset(ids[24:])}
    cfg = make_config(tiny_config(tmp_path_factory.mktemp("trained"), algorithm={"name": "protonet"},
                                  train={"meta_steps": 30, "eval_every": 30, "save_interval": 30}))
    return train(cfg, splits=splits)["best_checkpoint"]


def test_a_meta_trained_model_classifies_new_classes(trained_ckpt, data):
    images, cls, s, q = data
    y = NAMES[cls]
    assert FewShotClassifier(trained_ckpt).fit(images[s], y[s]).score(images[q], y[q]) >= 0.8  # chance: 1/3


def _rows_to_images(X):
    return np.asarray(X).reshape(len(X), SIZE, SIZE)


def test_pipeline_and_cross_val_score_on_the_support_set(ckpt, data):
    images, cls, s, q = data
    flat = images.reshape(len(images), -1) / 255.0
    y = NAMES[cls]
    pipe = make_pipeline(FunctionTransformer(_rows_to_images), FewShotClassifier(ckpt))
    pipe.fit(flat[s], y[s])
    direct = FewShotClassifier(ckpt).fit(images[s], y[s])
    np.testing.assert_allclose(pipe.predict_proba(flat[q]), direct.predict_proba(images[q]), atol=1e-5)
    assert pipe.score(flat[q], y[q]) == direct.score(images[q], y[q])
    assert list(pipe.classes_) == ["apple", "mango", "zebra"]
    cv = StratifiedKFold(2, shuffle=True, random_state=0)
    scores = cross_val_score(FewShotClassifier(ckpt), images, y, cv=cv)
    by_hand = [FewShotClassifier(ckpt).fit(images[a], y[a]).score(images[b], y[b]) for a, b in cv.split(images, y)]
    np.testing.assert_allclose(scores, by_hand)
    np.testing.assert_allclose(cross_val_score(pipe, flat, y, cv=cv), by_hand, atol=1e-9)


def test_params_clone_and_the_cached_model(ckpt, data):
    images, cls, s, _ = data
    clf = FewShotClassifier(ckpt, steps=None, device="cpu")
    assert clf.get_params() == {"checkpoint": ckpt, "algorithm": None, "steps": None, "device": "cpu"}
    clf.fit(images[s], cls[s])
    model = clf.task_.model
    clf.fit(images[s[::-1]], cls[s[::-1]])
    assert clf.task_.model is model  # loaded once, reused by a second fit
    twin = clone(clf)
    assert twin.get_params() == clf.get_params() and not hasattr(twin, "classes_")
    with pytest.raises(NotFittedError):
        twin.predict(images)
    assert clf.set_params(algorithm={"finetune_steps": 2, "finetune_lr": 0.01}) is clf
    clf.fit(images[s], cls[s])
    assert clf.task_.model is not model  # a changed parameter reloads
    assert clf.task_.model.config.algorithm.finetune_steps == 2
    assert clf.task_.adapted.params is not None  # the backbone was fine-tuned on the support set


def test_pickles_without_the_model_and_checks_the_checkpoint(ckpt, data, tmp_path):
    images, cls, s, q = data
    y = NAMES[cls]
    clf = FewShotClassifier(ckpt).fit(images[s], y[s])
    want = clf.predict_proba(images[q])
    blob = pickle.dumps(clf)
    assert len(blob) < 20_000  # prototypes and labels, not the network
    again = pickle.loads(blob)
    assert "_model" not in vars(again) and "_task" not in vars(again)
    np.testing.assert_allclose(again.predict_proba(images[q]), want, atol=1e-6)
    np.testing.assert_array_equal(again.classes_, clf.classes_)
    pickle.loads(pickle.dumps(FewShotClassifier(ckpt)))  # unfitted too
    # a fitted estimator refuses a checkpoint whose contents changed since fit
    path = tmp_path / "own.safetensors"
    _save(path)
    mine = pickle.dumps(FewShotClassifier(str(path)).fit(images[s], y[s]))
    _save(path, seed=1)
    with pytest.raises(CheckpointError, match=r"^FewShotClassifier: checkpoint must be the file this estimator was fitted"):
        pickle.loads(mine).predict(images[q])


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text and text.count("; got ") >= 1
    return text


def test_errors_are_one_line(ckpt, data):
    images, cls, s, q = data
    y = NAMES[cls]
    clf = FewShotClassifier(ckpt)
    with pytest.raises(NotFittedError):
        clf.predict(images[q])
    cases = [
        (images[s][:, None, None], y[s], DataError, r"X must be a non-empty batch of images .* got shape \(12, 1, 1, 16, 16\)"),
        (images[s].reshape(12, -1)[:, :100], y[s], DataError, r"X as rows \[N, features\] must have 256 features.* got 100"),
        (images[s], y[s][:-1], DataError, "y must give one label per image in X; got 11 labels for 12 images"),
        (images[s], np.full(12, "a"), TaskError, r"y must hold at least 2 classes; got 1 class \(\['a'\]\)"),
        (images[s], np.linspace(0, 1, 12), DataError, "y must hold discrete class labels; got continuous"),
        (images[s], None, DataError, "y must give one label per support image; got None"),
        (images[s] * 1.0, y[s], DataError, r"must hold float values in \[0, 1\].* Divide 0-255 values by 255"),
        (np.array([["a"] * 256] * 12), y[s], DataError, "X must hold numeric pixel values"),
    ]
    for X, yy, kind, msg in cases:
        with pytest.raises(kind, match=msg) as err:
            clf.fit(X, yy)
        assert _one_line(err).startswith(("FewShotClassifier: ", "Images: "))
    clf.fit(images[s].reshape(12, -1), y[s])
    with pytest.raises(DataError, match=r"X as rows \[N, features\] must have 256 features.* got 1024"):
        clf.predict(np.repeat(images[q].reshape(len(q), -1), 4, axis=1))  # a 32x32 row is no 16x16 row
    for params, kind, msg in [({"checkpoint": None}, ConfigError, "checkpoint must be the path"),
                              ({"steps": 0}, ConfigError, "steps must be a positive integer"),
                              ({"steps": 3}, TaskError, "steps only apply to gradient-based learners"),
                              ({"algorithm": "fast"}, ConfigError, "algorithm must be a dict")]:
        with pytest.raises(kind, match=msg) as err:
            FewShotClassifier(**{"checkpoint": ckpt, **params}).fit(images[s], y[s])
        _one_line(err)


def test_missing_scikit_learn_names_the_install(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import sklearn...` fail
    monkeypatch.delitem(sys.modules, "metafit.sklearn")
    with pytest.raises(MetafitError, match=r"scikit-learn must be installed.* Run pip install scikit-learn\.$"):
        importlib.import_module("metafit.sklearn")


def test_import_metafit_does_not_import_sklearn():
    code = "import sys, metafit; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- scikit-learn's estimator checks -----------------------------------------------------------

_NOT_IMAGES = ("fits/predicts on arbitrary tabular data (make_blobs, random arrays of 1-10 columns of any "
               "sign), which is no batch of images of the model's size: a one-line DataError")
_WORDING = ("expects scikit-learn's own error text; the estimator raises metafit's one-line DataError "
            "(a ValueError) naming the image shape or pixel values it needs")

#: the checks that cannot apply to the bare estimator, and why (each must fail: the list stays exact)
INAPPLICABLE_CHECKS = {
    **{name: _NOT_IMAGES for name in (
        "check_classifier_data_not_an_array", "check_classifiers_classes", "check_classifiers_train",
        "check_dict_unchanged", "check_dont_overwrite_parameters", "check_estimators_dtypes",
        "check_estimators_fit_returns_self", "check_estimators_overwrite_params", "check_estimators_pickle",
        "check_f_contiguous_array_estimator", "check_fit2d_predict1d", "check_fit_check_is_fitted",
        "check_fit_idempotent", "check_fit_score_takes_y", "check_methods_sample_order_invariance",
        "check_methods_subset_invariance", "check_n_features_in", "check_n_features_in_after_fitting",
        "check_pipeline_consistency", "check_readonly_memmap_input", "check_supervised_y_2d")},
    **{name: _WORDING for name in (
        "check_dtype_object", "check_estimators_empty_data_messages", "check_estimators_nan_inf",
        "check_fit2d_1feature", "check_positive_only_tag_during_fit")},
}

#: the checks the image-making pipeline cannot pass: Pipeline's own behaviour, not the estimator's
PIPELINE_INAPPLICABLE_CHECKS = {
    "check_estimators_overwrite_params": "Pipeline's steps parameter holds the estimators it fits",
    "check_dont_overwrite_parameters": "Pipeline's steps parameter holds the estimators it fits",
}

#: skipped by scikit-learn itself in this environment
_SKIPS_ALLOWED = {"check_array_api_input", "check_classifier_data_not_an_array"}

#: checks that must have run and passed on the bare estimator (API and label checks)
_MUST_PASS = {"check_estimator_cloneable", "check_estimator_repr", "check_no_attributes_set_in_init",
              "check_parameters_default_constructible", "check_get_params_invariance", "check_set_params",
              "check_mixin_order", "check_estimators_unfitted", "check_do_not_raise_errors_in_init_or_set_params",
              "check_classifiers_one_label", "check_classifiers_regression_target", "check_requires_y_none",
              "check_supervised_y_no_nan"}


def tabular_rows_to_images(X):
    """Any tabular rows -> 16x16 images in [0, 1] (a logistic squash, the row tiled over the pixels)."""
    pixels = 1.0 / (1.0 + np.exp(-np.asarray(X, dtype=np.float64)))
    reps = -(-SIZE * SIZE // pixels.shape[1])
    return np.tile(pixels, (1, reps))[:, :SIZE * SIZE].reshape(-1, SIZE, SIZE)


def _run_checks(estimator, expected):
    results = check_estimator(estimator, expected_failed_checks=expected, on_fail=None, on_skip=None)
    status: dict[str, set] = {}
    for r in results:
        status.setdefault(r["check_name"], set()).add(r["status"])
    failed = {n: s for n, s in status.items() if "failed" in s}
    assert not failed, failed
    not_failing = {n for n in expected if status.get(n) != {"xfail"}}
    assert not not_failing, f"listed as inapplicable but did not fail: {not_failing}"
    skipped = {n for n, s in status.items() if "skipped" in s}
    assert skipped <= _SKIPS_ALLOWED, skipped
    return {n for n, s in status.items() if s == {"passed"}}


@pytest.mark.filterwarnings("ignore")
def test_sklearn_estimator_checks_on_the_bare_estimator(ckpt):
    passed = _run_checks(FewShotClassifier(ckpt), INAPPLICABLE_CHECKS)
    assert _MUST_PASS <= passed, _MUST_PASS - passed


@pytest.mark.filterwarnings("ignore")
def test_sklearn_estimator_checks_through_an_image_making_pipeline(ckpt):
    pipe = make_pipeline(FunctionTransformer(tabular_rows_to_images, validate=True), FewShotClassifier(ckpt))
    passed = _run_checks(pipe, PIPELINE_INAPPLICABLE_CHECKS)
    # the data checks the bare estimator cannot run pass here, on scikit-learn's own data
    assert set(INAPPLICABLE_CHECKS) - set(PIPELINE_INAPPLICABLE_CHECKS) - _SKIPS_ALLOWED <= passed
