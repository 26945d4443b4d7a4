"""The user API: put a trained model to work.

:class:`Model` (from :func:`load_model`, or ``metafit.load``) adapts to a user's labelled images
and returns an :class:`AdaptedTask`, which predicts (:class:`Prediction`), saves itself
(:func:`load_task` reloads it) and exports to ONNX (:func:`export_onnx`). The CLI's
``predict``/``export`` and the HTTP service call exactly these. This room sits above
``training`` (checkpoints, configs) and below ``cli`` and ``serve``.
"""

from __future__ import annotations

from .export import export_onnx, read_onnx_metadata
from .model import Model, Prediction, checkpoint_file, load_model
from .task import AdaptedTask, is_task_file, load_task

__all__ = ["AdaptedTask", "Model", "Prediction", "checkpoint_file", "export_onnx", "is_task_file", "load_model",
           "load_task", "read_onnx_metadata"]
