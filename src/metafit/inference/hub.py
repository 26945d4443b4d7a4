"""The Hugging Face side of a :class:`~metafit.inference.Model`: what ``save_pretrained`` writes
beside the weights (a model card) and the guarded access to the optional ``huggingface_hub``."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ConfigError

if TYPE_CHECKING:
    from .model import Model

__all__ = ["CARD_MARKER", "CARD_NAME", "HUB_EXTRA", "model_card"]

CARD_NAME = "README.md"
#: the first line after a generated model card's front matter; a README.md without it is the
#: user's own and is never overwritten
CARD_MARKER = "<!-- metafit model card: written by save_pretrained; delete this line to keep your edits -->"
#: what pip installs for the Hugging Face Hub functions (from_pretrained of a repo id, push_to_hub)
HUB_EXTRA = 'pip install "metafit[hub]"'


#: a Hugging Face Hub repo id: ``name`` or ``namespace/name``
REPO_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
#: packages whose exceptions are the Hub's or its HTTP client's (not all of them are OSErrors)
_HUB_ERROR_PACKAGES = frozenset({"huggingface_hub", "httpx", "httpx2", "requests", "urllib3", "hf_xet"})


def hub_module(what: str) -> Any:
    """The ``huggingface_hub`` module, or a one-line :class:`ConfigError` naming the extra."""
    try:
        import huggingface_hub  # noqa: PLC0415 (optional extra)
    except ImportError as err:
        raise ConfigError(
            f"Model: the huggingface_hub package must be installed for {what}; got an import error ({err}). "
            f"Install it with {HUB_EXTRA}, or use a local folder."
        ) from err
    return huggingface_hub


def is_hub_error(err: BaseException) -> bool:
    """Whether ``err`` is a failure of the Hub (not found, unauthorized, offline, invalid id, a
    connection error of its HTTP client), as opposed to a bug to let through."""
    if isinstance(err, (OSError, ValueError)):
        return True
    return any(c.__module__.partition(".")[0] in _HUB_ERROR_PACKAGES for c in type(err).__mro__)


def first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else "no message"
    return text if len(text) <= 200 else text[:196] + " ..."


def _cell(value: Any) -> str:
    """``value`` as text for one Markdown table cell (no line breaks or column separators)."""
    return " ".join(str(value).split()).replace("|", "\\|")[:200]


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for name, value in list(metrics.items())[:20]:
        if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
            what = value.get("metric", "accuracy")
            text = f"{what} {value['mean']:.4f}"
            if isinstance(value.get("ci95"), (int, float)):
                text += f" ± {value['ci95']:.4f}"
            if isinstance(value.get("episodes"), int):
                text += f" over {value['episodes']} episodes"
        elif isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, (int, str, bool)):
            text = str(value)
        else:
            continue
        lines.append(f"- {_cell(name)}: {_cell(text)}")
    return lines


def model_card(model: Model, name: str) -> str:
    """The ``README.md`` of a :meth:`Model.save_pretrained` folder: Hub metadata (library and
    tags), how to use the model, and what it is (algorithm, backbone, data, image format,
    episodes, metrics when the checkpoint holds them)."""
    config, meta = model.config, model.checkpoint_meta
    alg = config.algorithm.name
    backbone = config.backbone.name if config.backbone is not None else "none"
    images = model.image_format is not None
    tags = ["metafit", "meta-learning", "few-shot-learning", *(["image-classification"] if images else []), alg]
    front = ["---", "library_name: metafit", "tags:", *(f"- {json.dumps(t)}" for t in dict.fromkeys(tags)), "---"]
    split = meta.get("split") or {}
    data = config.data.name
    if split.get("classes"):
        data += " (" + ", ".join(f"{k}: {v} classes" for k, v in split["classes"].items()) + ")"
    rows = [("Algorithm", alg), ("Backbone", backbone), ("Data", data),
            ("Input", model.image_format.describe() if images else "vectors"),
            ("Training episodes", f"{config.task.n_ways}-way {config.task.k_shots}-shot" if images
             else f"{config.task.k_shots}-shot"),
            ("Training steps", int(meta.get("step") or 0))]
    if model.temperature != 1.0:
        rows.append(("Calibration temperature", f"{model.temperature:.4g}"))
    rows.append(("metafit version", __version__))
    usage = (["```python", "import metafit", "", f"model = metafit.Model.from_pretrained({json.dumps(name)})",
              'task = model.adapt(["a1.png", "a2.png", "b1.png"], ["alpha", "alpha", "beta"])',
              'print(task.predict(["query.png"]).labels)', "```"] if images else
             ["```python", "import metafit", "", f"model = metafit.Model.from_pretrained({json.dumps(name)})",
              "adapted = model.algorithm.adapt(x_support, y_support, n_ways=1)  # float tensors", "```"])
    metrics = _metric_lines(meta.get("metrics") or {})
    body = [CARD_MARKER, "", f"# {_cell(name)}", "",
            f"A {alg} few-shot model ({backbone} backbone) trained with metafit. Adapt it to new classes from a "
            "few labelled examples, then predict:", "", *usage, "",
            "| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]
    if metrics:
        body += ["## Metrics", "", *metrics, ""]
    body += ["`model.safetensors` is a metafit checkpoint (safetensors with JSON metadata: loading it runs no "
             "code); `config.json` is its run config.", ""]
    return "\n".join(front + body)

