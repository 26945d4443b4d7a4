"""A scikit-learn estimator around a trained metafit model: ``fit`` adapts it to a support set.

    from metafit.sklearn import FewShotClassifier

    clf = FewShotClassifier("runs/omniglot_protonet_20w1s/best.safetensors")
    clf.fit(X_support, y_support)          # adapts the model: no training, a few seconds at most
    clf.predict(X_query)                   # labels, of y's dtype, from clf.classes_
    clf.predict_proba(X_query)             # [N, n_classes], columns in clf.classes_ order
    cross_val_score(clf, X_support, y_support, cv=StratifiedKFold(2))

``X`` is a batch of images as numpy arrays (or anything ``np.asarray`` takes): ``[N, H, W]``,
``[N, H, W, C]`` or ``[N, C, H, W]`` of any size (resized like the model's training images), or
``[N, features]``: each row one image of the model's size flattened row-major in numpy's image
layout, ``H x W`` (grayscale) or ``H x W x C`` (``features`` = size * size * channels, or size *
size for a grayscale image given to a colour model); ``n_features_in_`` is set only for such rows.
Values are uint8 / integers in 0-255, or floats in [0, 1]. A list (or 1-D object array) of image
paths or PIL images works too. Images are converted exactly as :meth:`metafit.inference.Model.adapt`
converts them, so ``clf.predict(X)`` equals ``metafit.load(ckpt).adapt(list(X_s), y_s).predict(list(X))``.

Labels may be any values ``numpy.unique`` can sort (strings, integers, floats, ...); ``classes_``
is that sorted array, as everywhere in scikit-learn. The checkpoint is loaded on the first ``fit``
and cached (again only when ``checkpoint``, ``algorithm`` or ``device`` change); it is not part of
the pickled state: an unpickled estimator reloads it on first use and checks (sha256) that it is the
file it was fitted with. The mixin order is ``ClassifierMixin, BaseEstimator`` as scikit-learn requires.

scikit-learn's estimator checks (``sklearn.utils.estimator_checks.check_estimator``)
-----------------------------------------------------------------------------------
tests/test_sklearn.py runs them twice, each time with the checks that cannot apply passed as
``expected_failed_checks`` (and asserted to fail, so the lists stay exact):

1. On the bare estimator. Pass: the API checks (clone, repr, tags, ``get_params``/``set_params``,
   ``__init__`` only stores parameters, default-constructible, mixin order, no errors in
   ``__init__``/``set_params``, ``NotFittedError`` before ``fit``), and the label checks (one
   class, a regression target, NaN/inf in y, y None). Cannot apply, because each fits or predicts
   on arbitrary tabular data (``make_blobs`` and random arrays of 1-10 columns of any sign), which
   is not a batch of images of the model's size (``X`` must be images, or rows of size * size
   [* channels] pixels in 0-255 / [0, 1]; anything else is a one-line DataError):
   check_classifier_data_not_an_array, check_classifiers_classes, check_classifiers_train,
   check_dict_unchanged, check_dont_overwrite_parameters, check_estimators_dtypes,
   check_estimators_fit_returns_self, check_estimators_overwrite_params, check_estimators_pickle,
   check_f_contiguous_array_estimator, check_fit2d_predict1d, check_fit_check_is_fitted,
   check_fit_idempotent, check_fit_score_takes_y, check_methods_sample_order_invariance,
   check_methods_subset_invariance, check_n_features_in, check_n_features_in_after_fitting,
   check_pipeline_consistency, check_readonly_memmap_input, check_supervised_y_2d; and, because
   they also expect scikit-learn's own wording where metafit raises its one-line DataError
   (a ValueError): check_dtype_object, check_estimators_empty_data_messages,
   check_estimators_nan_inf, check_fit2d_1feature, check_positive_only_tag_during_fit.
2. On ``make_pipeline(FunctionTransformer(<tabular row -> 16 x 16 image>, validate=True),
   FewShotClassifier(ckpt))``, so that every check above runs ``fit``/``predict``/
   ``predict_proba``/pickling on scikit-learn's own data through this estimator: all pass except
   check_estimators_overwrite_params and check_dont_overwrite_parameters, which Pipeline itself
   fails (its ``steps`` parameter holds the estimators it fits).

The sample-weight checks are not generated (``fit`` takes no ``sample_weight``: a support image is
one example; repeat it to weigh it more), check_array_api_input is skipped without
``SCIPY_ARRAY_API``, and pandas checks without pandas. Feature names (``feature_names_in_``) are
not kept: pixels have none.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from .errors import CheckpointError, ConfigError, DataError, MetafitError, TaskError, short_repr

try:
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.utils.multiclass import type_of_target
    from sklearn.utils.validation import assert_all_finite, check_is_fitted, column_or_1d
except ImportError as err:  # scikit-learn is in the test extra only
    raise MetafitError(
        f"FewShotClassifier: scikit-learn must be installed to use metafit.sklearn; got {err}. "
        "Run pip install scikit-learn."
    ) from err

__all__ = ["FewShotClassifier"]

_OWNER = "FewShotClassifier"

def _adapted_to(adapted: Any, device: Any) -> Any:
    """``adapted`` (an :class:`~metafit.algorithms.Adapted` dataclass) with its tensors on ``device``."""
    import torch

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().to(device)
        if isinstance(v, dict):
            return {k: move(t) for k, t in v.items()}
        return v

    return dataclasses.replace(adapted, **{f.name: move(getattr(adapted, f.name))
                                           for f in dataclasses.fields(adapted)})


class FewShotClassifier(ClassifierMixin, BaseEstimator):
    """A trained metafit model as a scikit-learn classifier: :meth:`fit` adapts it to the support
    set (see the module docstring for the shapes of ``X``).

    Parameters
    ----------
    checkpoint : str or path
        A metafit model checkpoint (``metafit.load`` reads it on the first ``fit``).
    algorithm : dict or None
        Adaptation-only overrides, e.g. ``{"finetune_steps": 20}`` (as ``metafit.load(..., algorithm=)``).
    steps : int or None
        Adaptation steps of a gradient-based learner (MAML, ...); None: the checkpoint's.
    device : str
        Torch device of the model, e.g. ``"cpu"`` or ``"cuda"``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The sorted labels seen in ``fit``; ``predict_proba`` columns follow this order.
    n_features_in_ : int
        Only when ``X`` was given as flattened rows ``[N, features]``.
    task_ : metafit AdaptedTask
        The adapted model (its class names are indices into ``classes_``).
    """

    def __init__(self, checkpoint=None, algorithm=None, steps=None, device="cpu"):
        self.checkpoint = checkpoint
        self.algorithm = algorithm
        self.steps = steps
        self.device = device

    # -- scikit-learn metadata ----------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True  # images [N, H, W] and [N, H, W, C] / [N, C, H, W]
        tags.input_tags.positive_only = True  # pixel values
        tags.classifier_tags.poor_score = True  # adapted from a few examples, not a tabular learner
        tags.classifier_tags.multi_label = False
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"X_types": ["2darray", "3darray"], "poor_score": True, "requires_positive_X": True}

    # -- the model ------------------------------------------------------------------------------
    def _params_key(self) -> tuple:
        return (os.fspath(self.checkpoint) if isinstance(self.checkpoint, (str, os.PathLike)) else None,
                repr(self.algorithm), str(self.device))

    def _load(self):
        """The loaded :class:`~metafit.inference.Model`, cached per (checkpoint, algorithm, device)."""
        key = self._params_key()
        if getattr(self, "_model", None) is not None and self._model_key == key:
            return self._model
        if key[0] is None:
            raise ConfigError(
                f"{_OWNER}: checkpoint must be the path of a metafit model checkpoint; got "
                f"{short_repr(self.checkpoint)}. Pass FewShotClassifier('runs/<run>/best.safetensors')."
            )
        if self.algorithm is not None and not isinstance(self.algorithm, dict):
            raise ConfigError(
                f"{_OWNER}: algorithm must be a dict of adaptation overrides or None; got "
                f"{short_repr(self.algorithm)}. Pass e.g. algorithm={{'finetune_steps': 20}}."
            )
        from .inference import load_model

        model = load_model(self.checkpoint, self.device, self.algorithm)
        if model.image_format is None or model.config.data.task_kind != "classification":
            raise TaskError(
                f"{_OWNER}: checkpoint must be an image classification model; got a "
                f"{model.config.data.task_kind} model on {'vectors' if model.image_format is None else 'images'} "
                f"({str(key[0])!r}). Use a checkpoint trained on image classification tasks."
            )
        self._model, self._model_key = model, key
        return model

    def _steps(self) -> int | None:
        s = self.steps
        if s is None:
            return None
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ConfigError(
                f"{_OWNER}: steps must be a positive integer or None; got {short_repr(s)}. "
                "Pass e.g. steps=10, or None for the checkpoint's own."
            )
        return int(s)

    @property
    def task_(self):
        """The :class:`~metafit.inference.AdaptedTask` (rebuilt after unpickling)."""
        task = self.__dict__.get("_task")
        if task is None:
            check_is_fitted(self, "classes_")
            from .inference import AdaptedTask

            model = self._load()
            if self._sha256 and model.checkpoint_digest() not in (None, self._sha256):
                raise CheckpointError(
                    f"{_OWNER}: checkpoint must be the file this estimator was fitted with; got "
                    f"{str(model.checkpoint)!r}, whose contents differ. Fit again, or point checkpoint at that file."
                )
            task = AdaptedTask(model, _adapted_to(self._adapted, model.device), self._task_names)
            self._task = task
        return task

    # -- pickling: the loaded model stays out; the adapted state goes in (on the CPU) ------------
    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: self keeps its model
        for key in ("_model", "_model_key", "_task"):
            state.pop(key, None)
        if state.get("_adapted") is not None:
            state["_adapted"] = _adapted_to(state["_adapted"], "cpu")
        return state

    # -- input ----------------------------------------------------------------------------------
    def _images(self, X: Any, what: str) -> tuple[list, int | None]:
        """``X`` as a list of single images for the model, and its feature count for flat rows."""
        model = self._load()
        fmt = model.image_format
        if isinstance(X, (list, tuple)) or (isinstance(X, np.ndarray) and X.dtype == object and X.ndim == 1):
            items = list(X)
            if items and all(not isinstance(i, (list, tuple, np.ndarray)) for i in items) \
                    and not all(isinstance(i, (int, float, np.number)) for i in items):
                return items, None  # paths or PIL images
        try:
            arr = np.asarray(X)
        except (TypeError, ValueError) as err:
            raise DataError(
                f"{_OWNER}: {what} must be an array of images; got {type(X).__name__} that numpy cannot "
                f"read ({' '.join(str(err).split())[:120]}). Pass an array [N, H, W(, C)] or [N, features]."
            ) from err
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise DataError(
                f"{_OWNER}: {what} must hold numeric pixel values (uint8 0-255 or floats in [0, 1]); got dtype "
                f"{arr.dtype} (e.g. {short_repr(arr.flat[0] if arr.size else None)}). Convert the images to numbers."
            )
        if arr.ndim not in (2, 3, 4) or arr.shape[0] == 0 or 0 in arr.shape:
            raise DataError(
                f"{_OWNER}: {what} must be a non-empty batch of images [N, H, W], [N, H, W, C], [N, C, H, W] or "
                f"flattened images [N, features]; got shape {arr.shape}. Reshape it (a single image: X[None])."
            )
        n_features = None
        if arr.ndim == 2:
            n_features, s, c = arr.shape[1], fmt.size, fmt.channels
            if n_features == s * s:
                arr = arr.reshape(-1, s, s)
            elif n_features == s * s * c:
                arr = arr.reshape(-1, s, s, c)
            else:
                want = f"{s * s}" if c == 1 else f"{s * s * c} (or {s * s} for grayscale)"
                raise DataError(
                    f"{_OWNER}: {what} as rows [N, features] must have {want} features, one flattened "
                    f"{s}x{s}{'' if c == 1 else f'x{c}'} image per row; got {n_features}. Pass images "
                    f"[N, H, W(, C)] of any size, or rows of the model's size {s}x{s}."
                )
        return list(arr), n_features

    def _check_features(self, n_features: int | None) -> None:
        fitted = getattr(self, "n_features_in_", None)
        if fitted is not None and n_features is not None and n_features != fitted:
            raise DataError(
                f"{_OWNER}: X must have {fitted} features per row, as in fit; got {n_features} "
                f"(X has {n_features} features, but {_OWNER} is expecting {fitted} features as input). "
                "Pass rows laid out like the support set's."
            )

    @staticmethod
    def _targets(y: Any) -> np.ndarray:
        if y is None:
            raise DataError(f"{_OWNER}: y must give one label per support image; got None (it requires y to be "
                            "passed, but the target y is None). Pass fit(X, y).")
        try:
            y = column_or_1d(np.asarray(y), warn=True)
            if np.issubdtype(y.dtype, np.number):
                assert_all_finite(y, input_name="y")
            kind = type_of_target(y)
        except ValueError as err:
            raise DataError(
                f"{_OWNER}: y must be a 1-D array of class labels; got {short_repr(y)} "
                f"({' '.join(str(err).split())[:160]}). Pass one label per support image."
            ) from err
        if kind not in ("binary", "multiclass"):
            raise DataError(
                f"{_OWNER}: y must hold discrete class labels; got {kind} values "
                f"(Unknown label type: {kind!r}), e.g. {short_repr(y[:3].tolist())}. "
                "Pass class names or ids, not a regression target."
            )
        return y

    # -- the estimator --------------------------------------------------------------------------
    def fit(self, X, y):
        """Adapt the model to the support set ``X`` (images) with labels ``y``; returns self."""
        y = self._targets(y)  # labels first: their errors do not depend on the model or X
        try:
            classes, index = np.unique(y, return_inverse=True)
        except TypeError as err:
            raise DataError(
                f"{_OWNER}: y must hold labels of one sortable kind; got {short_repr(y.tolist())} "
                f"({err}). Use all strings or all numbers."
            ) from err
        if len(classes) < 2:
            raise TaskError(
                f"{_OWNER}: y must hold at least 2 classes; got {len(classes)} class{'' if len(classes) == 1 else 'es'} "
                f"({short_repr(classes.tolist())}). "
                "Add support images of another class."
            )
        steps = self._steps()
        images, n_features = self._images(X, "X")
        if len(y) != len(images):
            raise DataError(
                f"{_OWNER}: y must give one label per image in X; got {len(y)} labels for {len(images)} images. "
                "Pass as many labels as images."
            )
        model = self._load()
        task = model.adapt(images, index.reshape(-1).tolist(), steps=steps)
        for key in ("_task", "n_features_in_"):
            self.__dict__.pop(key, None)
        self.classes_ = classes
        if n_features is not None:
            self.n_features_in_ = n_features
        self._adapted = task.adapted
        self._task_names = task.class_names  # indices into classes_, in order of first appearance
        self._order = np.asarray(task.class_names, dtype=np.intp)
        self._sha256 = model.checkpoint_digest()
        self._task = task
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities [N, n_classes] of the images ``X`` (shapes as for :meth:`fit`), columns
        in ``classes_`` order (float64)."""
        check_is_fitted(self, "classes_")
        images, n_features = self._images(X, "X")
        self._check_features(n_features)
        p = self.task_.predict(images).probabilities.double().numpy()
        out = np.empty_like(p)
        out[:, self._order] = p  # task column j is class self._order[j]
        return out

    def predict_log_proba(self, X) -> np.ndarray:
        """The natural log of :meth:`predict_proba` of ``X`` (``-inf`` where a probability is 0)."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """The most probable label of every image of ``X``, an array of ``classes_``'s dtype."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]
