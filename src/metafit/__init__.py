"""metafit: practical meta-learning.

    model = metafit.load("runs/omniglot_protonet_20w1s/best.safetensors")
    task = model.adapt(["a1.png", "a2.png", "b1.png"], ["alpha", "alpha", "beta"])
    print(task.predict(["query.png"]).labels)
    task.save("task.safetensors"); task = metafit.load_task("task.safetensors")
    model.save_pretrained("my-model"); model = metafit.Model.from_pretrained("my-model")  # or "user/repo"
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DataError,
    DownloadError,
    MetafitError,
    TaskError,
    TrainingError,
)
from .types import Task, TaskBatch  # noqa: E402


def load(path, device="cpu", algorithm=None):
    """A trained model from a metafit checkpoint (or a folder written by
    ``model.save_pretrained``), ready to ``adapt`` to labelled images and predict (see
    :class:`metafit.Model`; its ``algorithm`` attribute is the tensor-level
    :class:`~metafit.algorithms.Algorithm`). ``algorithm``: adaptation-only config changes, e.g.
    ``{"finetune_steps": 20}`` to fine-tune a ProtoNet's backbone on each support set. For a
    Hugging Face Hub repo id use ``metafit.Model.from_pretrained``.

    ``path``: the checkpoint file or folder; ``device``: where the weights go (``"cpu"``,
    ``"cuda"``, ...). Returns a :class:`metafit.Model`. This imports the inference and training
    modules on first use (``import metafit`` alone stays light)."""
    from .inference import load_model

    return load_model(path, device, algorithm)


def load_task(path, checkpoint=None, device="cpu"):
    """An adapted task saved with ``task.save(path)`` (see :func:`metafit.inference.load_task`):
    ``path``: the task file; ``checkpoint``: the model it was adapted with (a path or a loaded
    :class:`metafit.Model`; None: the path recorded in the file); ``device``: where a model loaded
    here goes. Returns the :class:`~metafit.inference.AdaptedTask`."""
    from .inference import load_task as _load_task

    return _load_task(path, checkpoint, device)


def __getattr__(name):
    # imported on first use: ``import metafit`` stays light (no training modules)
    if name == "Model":
        from .inference import Model

        return Model
    raise AttributeError(f"module 'metafit' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DownloadError",
    "MetafitError",
    "Model",
    "Task",
    "TaskBatch",
    "TaskError",
    "TrainingError",
    "__version__",
    "load",
    "load_task",
]
