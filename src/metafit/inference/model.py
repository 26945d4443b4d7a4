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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .. import __version__
from ..algorithms import Algorithm
from ..data import ImageFormat
from ..data.cache import atomic_write_bytes, file_digest
from ..data.images import convert_images_polarity
from ..data.store import PolarityUse, check_polarity
from ..errors import CheckpointError, DownloadError, MetafitError, TaskError, short_repr
from ..training.checkpoint import load as load_algorithm
from ..training.checkpoint import save_checkpoint, with_algorithm_overrides
from ..training.config import RunConfig
from .hub import CARD_MARKER, CARD_NAME, REPO_ID, first_line, hub_module, is_hub_error, model_card

if TYPE_CHECKING:
    from .task import AdaptedTask

__all__ = ["Model", "Prediction", "checkpoint_file", "load_model"]

#: the files of a folder written by :meth:`Model.save_pretrained` (Hugging Face layout)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"



@dataclass(frozen=True)
class Prediction:
    """``labels``: the predicted class name of every image (None where the model abstained:
    top probability below ``abstain_below``); ``probabilities`` [N, n_classes] in the order of
    ``class_names`` (temperature-calibrated when the checkpoint holds a temperature); ``polarity``,
    the :class:`~metafit.data.store.PolarityUse` the images were read with (None: vectors). Frozen."""

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
    ``algorithm`` is the underlying :class:`~metafit.algorithms.Algorithm` (tensor interface), put
    in evaluation mode, with the ``run_config`` a checkpoint gave it; ``checkpoint`` is the file it
    came from (None: not from a file), whose digest ties saved tasks to it. Usually made by
    :func:`load_model` (``metafit.load``) or :meth:`from_pretrained`."""

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
        """The run's configuration (:class:`~metafit.training.config.RunConfig`), same as ``config``."""
        return self.config

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return next(iter(self.algorithm.state_dict().values())).device

    def checkpoint_digest(self) -> str | None:
        """The sha256 of the checkpoint file (computed once, then kept), or None without a file."""
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
        """Learn a new task from labelled support ``images`` (paths, PIL images, arrays or tensors)
        and ``labels``, one per image: any strings or integers, mapped to classes in order of first
        appearance (at least 2 classes). Returns the :class:`AdaptedTask`. ``steps`` overrides a
        gradient-based learner's adaptation steps. ``polarity``: ``auto`` (flip images whose border
        shows the opposite polarity to the training images'; models without a polarity convention
        read them as trained), ``as_trained`` or ``flip``; the task remembers it for :meth:`AdaptedTask.predict`."""
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
        from .task import AdaptedTask  # task.py builds on this module

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
        adaptation-only config changes, as in :func:`metafit.load`. ``device``: where the model is
        loaded; ``force_download``: fetch the files again even if cached."""
        local = Path(name_or_path).expanduser()
        if isinstance(name_or_path, os.PathLike) or local.exists():
            return load_model(local, device, algorithm)
        repo_id = str(name_or_path)
        if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith(".safetensors"):
            raise CheckpointError(
                f"Model: name_or_path must be a folder written by save_pretrained or a Hugging Face Hub repo id "
                f"('user/name'); got {short_repr(repo_id)}, which is neither an existing folder nor a repo id. "
                "Check the path."
            )
        hub = hub_module("from_pretrained of a Hub repo id")
        try:
            folder = hub.snapshot_download(
                repo_id, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir), token=token,
                local_files_only=local_files_only, force_download=force_download,
                allow_patterns=[WEIGHTS_NAME, CONFIG_NAME], library_name="metafit", library_version=__version__)
        except Exception as err:
            if not is_hub_error(err):
                raise
            raise DownloadError(
                f"Model: {repo_id!r} must be a local folder or a Hugging Face Hub model repo metafit can download; "
                f"got no such folder, and the Hub answered {type(err).__name__} ({first_line(err)}). Check the "
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
        ``token=`` or ``hf auth login``). ``private``: create the repo private (None: the Hub's
        default); ``commit_message``, ``revision`` (the branch to commit to) and ``create_pr`` (open a
        pull request instead of committing) go to ``HfApi.upload_folder``. Returns the Hub's commit info."""
        hub = hub_module("push_to_hub")
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
                if not is_hub_error(err):
                    raise
                raise DownloadError(
                    f"Model: push_to_hub must reach a Hub repo it may write; got {type(err).__name__} for "
                    f"{short_repr(repo_id)} ({first_line(err)}). Check the repo id, your connection and your token "
                    "(hf auth login, or token=)."
                ) from err




def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               algorithm: dict[str, Any] | None = None) -> Model:
    """A trained :class:`Model` from ``path``, a metafit checkpoint (safetensors; no code is executed)
    or a folder written by :meth:`Model.save_pretrained` (its ``model.safetensors``), on ``device``.
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


