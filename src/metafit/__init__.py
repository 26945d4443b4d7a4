"""metafit: practical meta-learning.

    model = metafit.load("runs/omniglot/best.safetensors")
    adapted = model.adapt(support_x, support_y, n_ways)
    logits = model.predict(adapted, query_x)
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


def load(path, device="cpu"):
    """Load a trained model from a metafit checkpoint (see :func:`metafit.training.load`)."""
    from .training.checkpoint import load as _load

    return _load(path, device)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DownloadError",
    "MetafitError",
    "Task",
    "TaskBatch",
    "TaskError",
    "TrainingError",
    "__version__",
    "load",
]
