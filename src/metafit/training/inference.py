"""Put a trained model to work: adapt it to a user's labelled examples, predict, and keep the
adapted task for later.

    model = metafit.load("runs/omniglot_protonet_20w1s/best.safetensors")
    task = model.adapt(["a1.png", "a2.png", "b1.png"], ["alpha", "alpha", "beta"])
    result = task.predict(["query.png"])        # result.labels, result.probabilities
    task.save("my_task.safetensors")            # reuse later without the support set
    task = metafit.load_task("my_task.safetensors")

Images are converted the way the model's training images were (:class:`ImageFormat`, derived
from the data section of the checkpoint's config). Labels may be any strings or integers; they
are mapped to the model's classes in order of first appearance and reported back as
``task.class_names``.

Polarity: ``model.adapt(..., polarity="auto")`` (the default) detects, per image, whether the
images have the training images' polarity (models trained on dark ink on a light background,
inverted, like Omniglot: judged from each image's border) and flips those that do not; images
that already match are never flipped, and models without a polarity convention read images as
trained. ``"as_trained"`` converts exactly as the training images, ``"flip"`` inverts them all.
The task remembers its polarity for :meth:`AdaptedTask.predict` (``task.polarity``), reports
what its support set used (``task.support_polarity``), and every :class:`Prediction` carries
what its images used (``prediction.polarity``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import __version__
from ..algorithms import Adapted, Algorithm
from ..data import ImageFormat
from ..data.images import convert_images_polarity
from ..data.store import PolarityUse, check_polarity
from ..data.cache import atomic_write_bytes, file_digest
from ..errors import CheckpointError, ConfigError, DownloadError, MetafitError, TaskError, short_repr
from ..validation import load_json
from .checkpoint import OpenMetaModel, validate_meta, with_algorithm_overrides
from .checkpoint import load as load_algorithm
from .checkpoint import save_checkpoint
from .config import RunConfig

__all__ = ["AdaptedTask", "Model", "Prediction", "checkpoint_file", "is_task_file", "load_model", "load_task",
           "model_card"]

TASK_FORMAT = "metafit-task"
TASK_FORMAT_VERSION = 1

#: the files of a folder written by :meth:`Model.save_pretrained` (Hugging Face layout)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
#: the first line after a generated model card's front matter; a README.md without it is the
#: user's own and is never overwritten
CARD_MARKER = "<!-- metafit model card: written by save_pretrained; delete this line to keep your edits -->"
#: what pip installs for the Hugging Face Hub functions (from_pretrained of a repo id, push_to_hub)
HUB_EXTRA = 'pip install "metafit[hub]"'


class TaskMeta(OpenMetaModel):
    """The metadata of a saved task (:meth:`AdaptedTask.save`), validated before anything is
    built from it (the tensors are checked against the model in :func:`load_task`)."""

    format: Literal["metafit-task"]
    format_version: Literal[1]
    metafit_version: str | None = Field(None, max_length=100)
    algorithm: str = Field(min_length=1, max_length=100)
    adapted_type: str = Field(min_length=1, max_length=100)
    values: dict[str, bool | int | float | str | None] = Field(default_factory=dict, max_length=100)
    dict_fields: list[str] = Field(default_factory=list, max_length=100)
    class_names: list[str | int] = Field(min_length=2, max_length=100_000)
    checkpoint: str | None = Field(None, max_length=4096)
    checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    polarity: Literal["auto", "as_trained", "flip"] = "auto"  # absent in task files of older versions


@dataclass(frozen=True)
class Prediction:
    """``labels``: the predicted class name of every image (None where the model abstained:
    top probability below ``abstain_below``); ``probabilities`` [N, n_classes] in the order of
    ``class_names`` (temperature-calibrated when the checkpoint holds a temperature)."""

    labels: list
    probabilities: torch.Tensor
    class_names: tuple
    abstain_below: float | None = None
    #: the polarity the images were read with (None: vectors)
    polarity: PolarityUse | None = None

    def top_k(self, k: int = 3) -> list[list[tuple[Any, float]]]:
        """The ``k`` most probable (class name, probability) pairs of every image."""
        k = max(1, min(int(k), len(self.class_names)))
        p, idx = self.probabilities.topk(k, dim=-1)
        return [[(self.class_names[j], float(q)) for q, j in zip(pr.tolist(), ix.tolist())]
                for pr, ix in zip(p, idx)]


def _label_key(label: Any) -> Any:
    if isinstance(label, torch.Tensor) or hasattr(label, "item"):
        label = label.item()
    if not isinstance(label, (str, int)) or isinstance(label, bool):
        raise TaskError(
            f"Adapt: labels must be strings or integers; got {label!r} ({type(label).__name__}). "
            "Pass one class name or id per support image."
        )
    return label


class Model:
    """A trained model ready for new tasks: :meth:`adapt` on labelled examples, then predict.
    ``algorithm`` is the underlying :class:`~metafit.algorithms.Algorithm` (tensor interface)."""

    def __init__(self, algorithm: Algorithm, checkpoint: str | os.PathLike | None = None) -> None:
        self.algorithm = algorithm.eval()
        self.config: RunConfig = algorithm.run_config
        self.checkpoint = None if checkpoint is None else Path(checkpoint).resolve()
        self.checkpoint_meta: dict = getattr(algorithm, "checkpoint_meta", {})
        # validated by metafit.load against the config (older checkpoints: derived from the config)
        recorded = self.checkpoint_meta.get("image_format")
        self.image_format: ImageFormat | None = (ImageFormat(**recorded) if recorded
                                                 else self.config.data.image_format())
        calibration = self.checkpoint_meta.get("calibration") or {}  # validated: a positive finite number
        #: softmax temperature fitted on validation episodes (1.0: uncalibrated)
        self.temperature: float = float(calibration.get("temperature", 1.0))
        self._digest: str | None = None

    @property
    def run_config(self) -> RunConfig:
        return self.config

    @property
    def device(self) -> torch.device:
        return next(iter(self.algorithm.state_dict().values())).device

    def checkpoint_digest(self) -> str | None:
        if self._digest is None and self.checkpoint is not None:
            self._digest = file_digest(self.checkpoint)
        return self._digest

    def images(self, images: Any, polarity: str = "auto") -> torch.Tensor:
        """Model-ready tensor of ``images`` (see :mod:`metafit.data.images`), read with ``polarity``."""
        return self.images_polarity(images, polarity)[0]

    def images_polarity(self, images: Any, polarity: str = "auto") -> tuple[torch.Tensor, PolarityUse]:
        """:meth:`images` and the polarity used (:class:`~metafit.data.store.PolarityUse`)."""
        check_polarity(polarity, "Adapt", "Pass polarity='auto' (detect from each image's border), 'as_trained' "
                       "or 'flip'.")
        if self.image_format is None:
            raise TaskError(
                f"Adapt: this {self.config.data.task_kind} model takes vectors, not images; got images. "
                "Use model.algorithm.adapt(x, y, n_ways=1) with float tensors."
            )
        x, used = convert_images_polarity(self.image_format, images, polarity)
        return x.to(self.device), used

    def adapt(self, images: Any, labels: Sequence[Any], steps: int | None = None,
              polarity: str = "auto") -> "AdaptedTask":
        """Learn a new task from labelled support images (paths, PIL images, arrays or tensors)
        and arbitrary label names. ``steps`` overrides a gradient-based learner's adaptation steps.
        ``polarity``: ``auto`` (flip images whose border shows the opposite polarity to the
        training images'; models without a polarity convention read them as trained),
        ``as_trained`` or ``flip``; the task remembers it for :meth:`AdaptedTask.predict`."""
        x, used = self.images_polarity(images, polarity)
        if isinstance(labels, torch.Tensor):
            labels = labels.tolist()
        keys = [_label_key(v) for v in labels]
        if len(keys) != x.shape[0]:
            raise TaskError(
                f"Adapt: labels must give one label per support image; got {len(keys)} labels for "
                f"{x.shape[0]} images. Pass as many labels as images."
            )
        names = tuple(dict.fromkeys(keys))
        if len(names) < 2:
            raise TaskError(
                f"Adapt: a task needs at least 2 classes; got {len(names)} ({list(names)}). "
                "Add support images of another class."
            )
        index = {n: i for i, n in enumerate(names)}
        y = torch.tensor([index[k] for k in keys], device=x.device)
        kwargs = {} if steps is None else {"steps": int(steps)}
        with torch.no_grad():
            try:
                adapted = self.algorithm.adapt(x, y, len(names), **kwargs)
            except TypeError as err:
                if kwargs and "steps" in str(err):
                    raise TaskError(
                        f"Adapt: steps only apply to gradient-based learners; got steps={steps} for "
                        f"{self.config.algorithm.name!r}. Drop steps."
                    ) from err
                raise
        return AdaptedTask(self, adapted, names, polarity, used)

    def __repr__(self) -> str:
        fmt = self.image_format.describe() if self.image_format else "vectors"
        return f"Model({self.config.algorithm.name}, {fmt}, checkpoint={str(self.checkpoint)!r})"

    # -- Hugging Face style folders and the Hub ---------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *, repo_id: str | None = None) -> Path:
        """Write the model to ``directory`` the Hugging Face way: ``model.safetensors`` (a metafit
        checkpoint: ``metafit.load`` reads it, or the folder), ``config.json`` (the run config and
        metafit version, for people and the Hub; loading reads the checkpoint's own copy) and a
        ``README.md`` model card (kept if the folder has a README.md metafit did not write).
        Each file is written atomically; returns the folder. Resume state (optimizer, RNG) is not
        copied; calibration, metrics and split are. ``repo_id`` only names the repo in the card."""
        directory = Path(directory)
        meta = dict(self.checkpoint_meta)
        kept = {k: v for k, v in meta.items()
                if k not in ("format", "format_version", "metafit_version", "algorithm", "config", "step",
                             "metrics", "image_format", "train_state")}
        try:
            if directory.exists() and not directory.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(directory))
            weights = save_checkpoint(directory / WEIGHTS_NAME, self.algorithm, self.config,
                                      step=int(meta.get("step") or 0), metrics=meta.get("metrics") or {},
                                      extra_meta=kept)
            config = self.pretrained_config()
            text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
            atomic_write_bytes(directory / CONFIG_NAME, lambda f: f.write(text.encode("utf-8")))
            card_path = directory / CARD_NAME
            if not card_path.exists() or CARD_MARKER in card_path.read_text(encoding="utf-8", errors="replace"):
                card = model_card(self, repo_id or directory.resolve().name)
                atomic_write_bytes(card_path, lambda f: f.write(card.encode("utf-8")))
        except OSError as err:
            raise CheckpointError(
                f"Save: directory must be a folder metafit can write; got {str(directory)!r} "
                f"({err.strerror or err}). Pass another folder."
            ) from err
        if self.checkpoint == weights.resolve():  # rewritten in place: its digest is recomputed when asked
            self._digest = None
        return directory

    def pretrained_config(self) -> dict[str, Any]:
        """The content of ``config.json`` in a :meth:`save_pretrained` folder."""
        meta = self.checkpoint_meta
        return {
            "library_name": "metafit",
            "metafit_version": __version__,
            "algorithm": self.config.algorithm.name,
            "backbone": self.config.backbone.name if self.config.backbone is not None else None,
            "image_format": self.image_format.to_dict() if self.image_format is not None else None,
            "step": int(meta.get("step") or 0),
            "weights": WEIGHTS_NAME,
            "config": self.config.to_dict(),
        }

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu", *,
                        revision: str | None = None, algorithm: dict[str, Any] | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool = False, force_download: bool = False) -> "Model":
        """A model from a :meth:`save_pretrained` folder (or a checkpoint file), else from the
        Hugging Face Hub repo ``name_or_path`` (``"user/name"``; needs ``pip install
        "metafit[hub]"``): ``model.safetensors`` and ``config.json`` are downloaded into the Hub
        cache (``cache_dir``; ``revision``: a branch, tag or commit; ``token`` for private repos;
        offline: ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` uses the cache only). Only
        safetensors and JSON are read: loading a stranger's model runs no code. ``algorithm``:
        adaptation-only config changes, as in :func:`metafit.load`."""
        local = Path(name_or_path).expanduser()
        if isinstance(name_or_path, os.PathLike) or local.exists():
            return load_model(local, device, algorithm)
        repo_id = str(name_or_path)
        if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith(".safetensors"):
            raise CheckpointError(
                f"Model: name_or_path must be a folder written by save_pretrained or a Hugging Face Hub repo id "
                f"('user/name'); got {short_repr(repo_id)}, which is neither an existing folder nor a repo id. "
                "Check the path."
            )
        hub = _hub("from_pretrained of a Hub repo id")
        try:
            folder = hub.snapshot_download(
                repo_id, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir), token=token,
                local_files_only=local_files_only, force_download=force_download,
                allow_patterns=[WEIGHTS_NAME, CONFIG_NAME], library_name="metafit", library_version=__version__)
        except Exception as err:
            if not _is_hub_error(err):
                raise
            raise DownloadError(
                f"Model: {repo_id!r} must be a local folder or a Hugging Face Hub model repo metafit can download; "
                f"got no such folder, and the Hub answered {type(err).__name__} ({_first_line(err)}). Check the "
                "path or repo id and revision, your connection (offline: only cached repos load), or pass token= "
                "for a private repo."
            ) from err
        weights = Path(folder) / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(
                f"Model: Hub repo {repo_id!r} must hold {WEIGHTS_NAME} (a folder written by save_pretrained); got "
                f"none at revision {revision or 'main'}. Pass the repo of a metafit model."
            )
        return load_model(weights, device, algorithm)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str = "Upload metafit model", revision: str | None = None,
                    create_pr: bool = False) -> Any:
        """Upload the model as :meth:`save_pretrained` writes it to the Hugging Face Hub repo
        ``repo_id`` (created if absent; needs ``pip install "metafit[hub]"`` and a token:
        ``token=`` or ``hf auth login``). Returns the Hub's commit info."""
        hub = _hub("push_to_hub")
        with tempfile.TemporaryDirectory(prefix="metafit-push-") as tmp:
            try:
                api = hub.HfApi()
                url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
                full_id = getattr(url, "repo_id", None) or repo_id  # "name" becomes "user/name"
                self.save_pretrained(tmp, repo_id=full_id)
                return api.upload_folder(repo_id=full_id, folder_path=tmp, commit_message=commit_message,
                                         token=token, revision=revision, create_pr=create_pr, repo_type="model")
            except MetafitError:
                raise
            except Exception as err:
                if not _is_hub_error(err):
                    raise
                raise DownloadError(
                    f"Model: push_to_hub must reach a Hub repo it may write; got {type(err).__name__} for "
                    f"{short_repr(repo_id)} ({_first_line(err)}). Check the repo id, your connection and your token "
                    "(hf auth login, or token=)."
                ) from err


class AdaptedTask:
    """A model adapted to one task: predicts its classes; :meth:`save` keeps it for later."""

    def __init__(self, model: Model, adapted: Adapted, class_names: tuple, polarity: str = "auto",
                 support_polarity: PolarityUse | None = None) -> None:
        self.model = model
        self.adapted = adapted
        self.class_names = tuple(class_names)
        #: the polarity queries are read with unless predict is told otherwise (the one adapt used)
        self.polarity = check_polarity(polarity, "Task")
        #: what the support set was read with (None: a loaded task, or vectors)
        self.support_polarity = support_polarity

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def logits(self, images: Any, polarity: str | None = None) -> torch.Tensor:
        return self._logits(images, polarity)[0]

    def _logits(self, images: Any, polarity: str | None) -> tuple[torch.Tensor, PolarityUse]:
        x, used = self.model.images_polarity(images, self.polarity if polarity is None else polarity)
        with torch.no_grad():
            logits = self.model.algorithm.predict(self.adapted, x).float()
        if logits.shape[-1] != self.n_classes:  # a loaded task whose class names do not fit its tensors
            raise TaskError(
                f"Predict: the adapted task must score each of its {self.n_classes} classes; got {logits.shape[-1]} "
                "scores per image. The task file is damaged or was edited; adapt again."
            )
        return logits, used

    def predict(self, images: Any, batch_size: int = 256, progress: Callable[[int], Any] | None = None,
                abstain_below: float | None = None, polarity: str | None = None) -> Prediction:
        """Class names and probabilities of ``images``, converted and run ``batch_size`` at a time;
        with ``abstain_below`` in (0, 1], images whose top probability is lower get label None.
        ``polarity`` (``auto``, ``as_trained``, ``flip``) defaults to the one the task was adapted
        with; ``prediction.polarity`` says what was used."""
        check_polarity(self.polarity if polarity is None else polarity, "Predict",
                       "Pass polarity='auto', 'as_trained' or 'flip' (or None: the task's own).")
        if abstain_below is not None and not 0.0 < abstain_below <= 1.0:
            raise TaskError(
                f"Predict: abstain_below must be a probability in (0, 1]; got {abstain_below!r}. "
                "Pass e.g. 0.5, or None to always answer."
            )
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple)):
            chunks = [images]
        else:
            chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        probs, used = [], None
        for chunk in chunks:
            logits, u = self._logits(chunk, polarity)
            used = u if used is None else used.merge(u)
            probs.append(torch.softmax(logits / self.model.temperature, dim=-1).cpu())
            if progress is not None:
                progress(len(chunk) if isinstance(chunk, (list, tuple)) else 1)
        p = torch.cat(probs)
        top, idx = p.max(-1)
        labels = [None if abstain_below is not None and float(q) < abstain_below else self.class_names[i]
                  for q, i in zip(top.tolist(), idx.tolist())]
        return Prediction(labels, p, self.class_names, abstain_below, used)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the adapted task (tensors in safetensors, names and the checkpoint it belongs to
        as JSON metadata); atomic. Loading needs the same checkpoint (its digest is checked)."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        dicts: list[str] = []
        for f in fields(self.adapted):
            v = getattr(self.adapted, f.name)
            if isinstance(v, torch.Tensor):
                tensors[f"adapted.{f.name}"] = v.detach().cpu().contiguous().clone()
            elif isinstance(v, dict):
                dicts.append(f.name)
                for k, t in v.items():
                    tensors[f"adapted.{f.name}.{k}"] = t.detach().cpu().contiguous().clone()
            else:
                values[f.name] = v
        meta = {
            "format": TASK_FORMAT, "format_version": TASK_FORMAT_VERSION, "metafit_version": __version__,
            "algorithm": self.model.config.algorithm.name, "adapted_type": type(self.adapted).__name__,
            "values": values, "dict_fields": dicts, "class_names": list(self.class_names),
            "checkpoint": str(self.model.checkpoint) if self.model.checkpoint else None,
            "checkpoint_sha256": self.model.checkpoint_digest(), "polarity": self.polarity,
        }
        blob = st_save(tensors, metadata={"metafit_task": json.dumps(meta)})
        atomic_write_bytes(path, lambda f: f.write(blob))
        return path

    def __repr__(self) -> str:
        return (f"AdaptedTask({self.model.config.algorithm.name}, classes={list(self.class_names)}, "
                f"polarity={self.polarity!r})")


def _adapted_types() -> dict[str, type]:
    """The :class:`Adapted` dataclasses by name (not the marker base itself)."""
    out, todo = {}, list(Adapted.__subclasses__())
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo += cls.__subclasses__()
    return out


def _task_raw(path: Path) -> str | None:
    """The raw JSON text of a task file's metadata (None: not a task file); safetensors checks the
    header, nothing is parsed here."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("metafit_task")
    return raw if isinstance(raw, str) else None


def is_task_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a task saved by :meth:`AdaptedTask.save` (not a model checkpoint)."""
    try:
        return Path(path).is_file() and _task_raw(Path(path)) is not None
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               algorithm: dict[str, Any] | None = None) -> Model:
    """A trained :class:`Model` from a metafit checkpoint (safetensors; no code is executed) or
    a folder written by :meth:`Model.save_pretrained` (its ``model.safetensors``).
    ``algorithm`` changes adaptation-only fields, e.g. ``{"finetune_steps": 20, "finetune_lr":
    0.01}`` (ProtoNet's fine-tuning at adaptation) or ``{"head": "centroid"}`` (transfer)."""
    path = checkpoint_file(path)
    return Model(with_algorithm_overrides(load_algorithm(path, device), algorithm), path)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path``, or the ``model.safetensors`` of a :meth:`Model.save_pretrained` folder; a
    folder without one is refused."""
    path = Path(path)
    if not path.is_dir():
        return path
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(
            f"Checkpoint: folder {str(path)!r} must hold {WEIGHTS_NAME} (written by model.save_pretrained); got a "
            "folder without it. Pass a folder written by save_pretrained, or a .safetensors checkpoint."
        )
    return weights


#: a Hugging Face Hub repo id: ``name`` or ``namespace/name``
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
#: packages whose exceptions are the Hub's or its HTTP client's (not all of them are OSErrors)
_HUB_ERROR_PACKAGES = frozenset({"huggingface_hub", "httpx", "httpx2", "requests", "urllib3", "hf_xet"})


def _hub(what: str) -> Any:
    """The ``huggingface_hub`` module, or a one-line :class:`ConfigError` naming the extra."""
    try:
        import huggingface_hub  # noqa: PLC0415 (optional extra)
    except ImportError as err:
        raise ConfigError(
            f"Model: the huggingface_hub package must be installed for {what}; got an import error ({err}). "
            f"Install it with {HUB_EXTRA}, or use a local folder."
        ) from err
    return huggingface_hub


def _is_hub_error(err: BaseException) -> bool:
    """Whether ``err`` is a failure of the Hub (not found, unauthorized, offline, invalid id, a
    connection error of its HTTP client), as opposed to a bug to let through."""
    if isinstance(err, (OSError, ValueError)):
        return True
    return any(c.__module__.partition(".")[0] in _HUB_ERROR_PACKAGES for c in type(err).__mro__)


def _first_line(err: BaseException) -> str:
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


def load_task(path: str | os.PathLike, checkpoint: str | os.PathLike | Model | None = None,
              device: str | torch.device = "cpu") -> AdaptedTask:
    """An :class:`AdaptedTask` saved by :meth:`AdaptedTask.save`. The model comes from
    ``checkpoint`` (a path or a loaded :class:`Model`), else from the path recorded in the file;
    either way it must be the checkpoint the task was adapted with (sha256 checked)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Task: {str(path)!r} must be a saved task file; got no file there. Check the path.")
    try:
        blob = path.read_bytes()
        tensors = st_load(blob)  # checks the header's size, JSON, dtypes, shapes and offsets
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as err:
        raise CheckpointError(
            f"Task: {str(path)!r} must be a task file written by task.save(); got an unreadable file "
            f"({' '.join(str(err).split())[:200]}). Adapt again and save."
        ) from err
    n = int.from_bytes(blob[:8], "little")
    header = load_json(blob[8:8 + n], f"Task: the header of {str(path)!r}", CheckpointError)
    raw = (header.get("__metadata__") or {}).get("metafit_task") if isinstance(header, dict) else None
    meta = load_json(raw, f"Task: the metadata of {str(path)!r}", CheckpointError) if isinstance(raw, str) else None
    if not isinstance(meta, dict) or meta.get("format") != TASK_FORMAT:
        raise CheckpointError(
            f"Task: {str(path)!r} must be a task file written by task.save(); got a safetensors file without "
            "metafit task metadata. Pass a saved task (a model checkpoint goes to metafit.load)."
        )
    task_meta: TaskMeta = validate_meta(TaskMeta, meta, f"the metadata of {str(path)!r}",
                                        "The file is damaged or was edited; adapt again and save.", owner="Task")
    if isinstance(checkpoint, Model):
        model = checkpoint
    else:
        source = checkpoint or meta.get("checkpoint")
        if not source or not (Path(source).is_file() or Path(source).is_dir()):
            raise CheckpointError(
                f"Task: the model checkpoint of {str(path)!r} must be available; got {str(source)!r}, which does "
                "not exist. Pass checkpoint=PATH (the file the task was adapted with)."
            )
        model = load_model(source, device)
    want = meta.get("checkpoint_sha256")
    if want and model.checkpoint_digest() not in (None, want):
        raise CheckpointError(
            f"Task: {str(path)!r} must be used with the checkpoint it was adapted with; got {str(model.checkpoint)!r} "
            "whose contents differ. Pass that checkpoint, or adapt again with this one."
        )
    if meta.get("algorithm") != model.config.algorithm.name:
        raise CheckpointError(
            f"Task: {str(path)!r} must be used with a {meta.get('algorithm')} model; got a "
            f"{model.config.algorithm.name} model. Pass the checkpoint the task was adapted with."
        )
    cls = _adapted_types().get(meta["adapted_type"])
    if cls is None:
        raise CheckpointError(
            f"Task: {str(path)!r} must hold a known adapted state; got type {short_repr(meta['adapted_type'])}. "
            "Use the metafit version that wrote it."
        )
    kwargs = _adapted_fields(cls, task_meta, tensors, model, path)
    try:
        adapted = cls(**kwargs)
    except TypeError as err:
        raise CheckpointError(
            f"Task: {str(path)!r} must hold every field of {cls.__name__}; got {sorted(kwargs)} ({err}). "
            "The file is damaged or from another version; adapt again."
        ) from err
    return AdaptedTask(model, adapted, tuple(task_meta.class_names), task_meta.polarity)


def _adapted_fields(cls: type, meta: TaskMeta, tensors: dict[str, torch.Tensor], model: Model,
                    path: Path) -> dict[str, Any]:
    """The keyword arguments of ``cls`` (an :class:`Adapted` dataclass) from a task file: every
    value of the field's declared type, every tensor of the model's dtype (a state entry's own,
    for fast weights named like one), every file entry used; a CheckpointError otherwise."""
    where, fix = f"{str(path)!r}", "The file is damaged or was edited; adapt again and save."
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    state = dict(model.algorithm.state_dict())
    for key, value in list(state.items()):  # fast weights are named inside a submodule (blocks.0.weight)
        for i, ch in enumerate(key):
            if ch == ".":
                state.setdefault(key[i + 1:], value)
    float_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    kwargs: dict[str, Any] = {}
    for name, value in meta.values.items():
        if name not in names:
            raise CheckpointError(f"Task: values in {where} must be fields of {cls.__name__} "
                                  f"({', '.join(sorted(names))}); got {short_repr(name)}. {fix}")
        try:
            kwargs[name] = TypeAdapter(hints[name], config=_ANY_TYPE).validate_python(value, strict=True)
        except ValidationError:
            raise CheckpointError(f"Task: values.{name} in {where} must be of type {hints[name]}; got "
                                  f"{short_repr(value)}. {fix}") from None
    dev = model.device
    used = set()
    for f in fields(cls):
        if f.name in meta.dict_fields:
            prefix = f"adapted.{f.name}."
            entries = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            used.update(prefix + k for k in entries)
            kwargs[f.name] = {k: _adapted_tensor(f"{prefix}{k}", v, state.get(k, None), float_dtype, where, fix).to(dev)
                              for k, v in entries.items()}
        elif f"adapted.{f.name}" in tensors:
            used.add(f"adapted.{f.name}")
            kwargs[f.name] = _adapted_tensor(f"adapted.{f.name}", tensors[f"adapted.{f.name}"], None, float_dtype,
                                             where, fix).to(dev)
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"Task: the tensors of {where} must all be fields of {cls.__name__}; got "
                              f"{short_repr(unused)}. {fix}")
    return kwargs


_ANY_TYPE = ConfigDict(arbitrary_types_allowed=True)  # fields may be tensors (only None is stored as a value)


def _adapted_tensor(name: str, value: torch.Tensor, like: torch.Tensor | None, float_dtype: torch.dtype,
                    where: str, fix: str) -> torch.Tensor:
    want = like.dtype if like is not None else float_dtype
    if value.dtype != want:
        raise CheckpointError(f"Task: tensor {name!r} of {where} must be {want} (the model's dtype); got "
                              f"{value.dtype}. {fix}")
    return value
