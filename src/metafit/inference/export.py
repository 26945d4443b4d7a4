"""Export an adapted task as one ONNX graph: the backbone and the task's adapted state (prototypes,
a solved or fitted head, fast weights) baked in as constants.

    task = metafit.load("best.safetensors").adapt(files, labels)      # or metafit.load_task(...)
    export_onnx(task, "task.onnx")

The graph takes ``images``: float32 ``[N, C, H, W]`` in [0, 1] (dynamic batch axis ``N``), the
images converted exactly as :meth:`Model.images` converts them (see the ``metafit.preprocessing``
metadata entry); input normalisation (mean/std) is inside the graph when the model has it. It
returns ``logits`` ``[N, n_classes]`` (what ``task.logits`` returns) and ``probabilities``
``[N, n_classes]`` = softmax(logits / T) with the checkpoint's calibrated temperature T (1.0 when
uncalibrated; what ``task.predict`` returns), classes in the order of ``metafit.class_names``.

The exporter is torch's ``torch.export``-based one (``torch.onnx.export(..., dynamo=True)``, which
needs ``onnxscript``): the TorchScript-based exporter is deprecated and cannot trace
``torch.func.functional_call``, which MAML, ANIL, Meta-SGD, Reptile and fine-tuned tasks predict
with. Everything runs offline.

Models whose BatchNorm always normalises with the statistics of the current batch (MAML-family
``bn_mode: transductive``, the default) keep doing so in the graph: an image's scores depend on
the other images of the batch, as in PyTorch (``metafit.batch_statistics`` is ``true``); feed a
task's query images together, as ``task.predict`` does.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import __version__
from ..algorithms.common import batchnorm_layers
from ..data.cache import atomic_write_bytes
from ..errors import ConfigError, ExportError, MetafitError, TaskError, short_repr
from ..nn.normalize import has_input_normalization

if TYPE_CHECKING:
    from .model import AdaptedTask

__all__ = ["ExportError", "INPUT_NAME", "OUTPUT_NAMES", "export_onnx", "export_spec", "read_onnx_metadata"]

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
#: the lowest opset the torch.export-based exporter writes natively (lower ones go through a lossy converter)
MIN_OPSET = 18
INSTALL_HINT = 'Run pip install "metafit[onnx]" (onnx, onnxscript and onnxruntime).'
#: metadata entries stored as plain text (every other entry is JSON)
TEXT_KEYS = ("version", "algorithm", "preprocessing", "checkpoint_sha256")
#: the packages whose loggers (torch gives many of them their own handlers) print the exporter's log lines
_LOG_ROOTS = ("torch", "onnxscript", "onnx_ir")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _TaskGraph(nn.Module):
    """``images -> (logits, softmax(logits / temperature))`` of one adapted task; the adapted
    tensors are plain attributes, so the exporter bakes them into the graph as constants."""

    def __init__(self, algorithm: nn.Module, adapted: Any, temperature: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.adapted = adapted
        self.temperature = float(temperature)
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.algorithm.predict(self.adapted, images.to(self.dtype)).float()
        return logits, torch.softmax(logits / self.temperature, dim=-1)


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ExportError(
            f"Export: the package {name} must be installed to export ONNX; got {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}. {INSTALL_HINT}"
        ) from err


def _require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``; the exporter also needs onnxscript. A one-line ExportError naming
    the extra when one is missing."""
    onnx, _, ort = (_import(name) for name in ("onnx", "onnxscript", "onnxruntime"))
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise ExportError(
            f"Export: torch must have the torch.export-based ONNX exporter (torch >= 2.6); got torch "
            f"{torch.__version__}. Upgrade torch."
        )
    return onnx, ort


def _normalization(backbone: nn.Module) -> dict[str, Any]:
    if has_input_normalization(backbone):
        return {"in_graph": True, "mean": [round(float(v), 8) for v in backbone.input_mean.flatten()],
                "std": [round(float(v), 8) for v in backbone.input_std.flatten()]}
    if getattr(backbone, "normalizes_input", False):
        return {"in_graph": True, "mean": None, "std": None, "note": "the backbone applies its own statistics"}
    return {"in_graph": False}


def _batch_statistics(algorithm: nn.Module) -> bool:
    """Whether some BatchNorm normalises with the current batch at prediction (no running
    statistics, or left in training mode)."""
    return any(bn.training or bn.running_mean is None for _, bn in batchnorm_layers(algorithm))


def _preprocessing_text(fmt: Any, norm: dict[str, Any]) -> str:
    mode = "grayscale (L)" if fmt.channels == 1 else "RGB"
    fit = ("resize the shorter side to {s} and take the centre {s}x{s} square" if fmt.fit == "crop"
           else "resize to {s}x{s} whatever the aspect ratio").format(s=fmt.size)
    steps = [f"decode the image and convert it to {mode}", f"{fit} (Lanczos) into uint8 pixels"]
    if fmt.invert:
        steps.append("invert intensities (255 - value)")
    steps.append(f"divide by 255 into float32 [N, {fmt.channels}, {fmt.size}, {fmt.size}] (values in [0, 1])")
    if norm["in_graph"]:
        steps.append("do not normalise: the graph subtracts the mean and divides by the std itself")
    return "; ".join(steps)


def export_spec(task: "AdaptedTask") -> dict[str, Any]:
    """What an export of ``task`` takes and returns: input spec, preprocessing, outputs, classes
    (the values written to the ONNX metadata, before JSON encoding)."""
    model = task.model
    fmt = model.image_format
    if fmt is None:
        raise TaskError(
            f"Export: the task must belong to an image model; got a {model.config.data.task_kind} model that takes "
            "vectors. Export image classification tasks (adapt a model trained on images)."
        )
    norm = _normalization(model.algorithm.backbone)
    return {
        "version": __version__,
        "algorithm": model.config.algorithm.name,
        "class_names": list(task.class_names),
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", fmt.channels, fmt.size, fmt.size],
                  "range": [0.0, 1.0]},
        "outputs": {"logits": ["N", task.n_classes], "probabilities": ["N", task.n_classes]},
        "image_format": fmt.to_dict(),
        "normalization": norm,
        "preprocessing": _preprocessing_text(fmt, norm),
        "temperature": float(model.temperature),
        "batch_statistics": _batch_statistics(model.algorithm),
        "checkpoint_sha256": model.checkpoint_digest(),
    }


def _metadata_props(spec: dict[str, Any]) -> dict[str, str]:
    return {f"metafit.{k}": v if k in TEXT_KEYS else json.dumps(v) for k, v in spec.items() if v is not None}


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metafit.*`` metadata of the graph exported to ``path`` (keys without the prefix), as a
    dict, JSON-decoded except the text entries (:data:`TEXT_KEYS`); the weights are not loaded."""
    onnx = _import("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        if prop.key.startswith("metafit."):
            key = prop.key[len("metafit."):]
            out[key] = prop.value if key in TEXT_KEYS else json.loads(prop.value)
    return out


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints, warnings and log lines below ERROR (torch logs
    through its own handlers; errors still raise)."""
    names = [""] + [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _LOG_ROOTS]
    handlers = {h for name in names for h in getattr(logging.getLogger(name), "handlers", [])}
    if logging.lastResort is not None:
        handlers.add(logging.lastResort)
    quiet = _BelowError()
    for h in handlers:
        h.addFilter(quiet)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):  # torch.export prints the failing graph to stderr
            warnings.simplefilter("ignore")
            yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def _check_opset(opset: int | None, onnx: Any) -> int | None:
    if opset is None:
        return None
    top = int(onnx.defs.onnx_opset_version())
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ConfigError(
            f"Export: opset must be an integer in {MIN_OPSET}..{top}; got {short_repr(opset)}. Leave it out for "
            "the exporter's default, or pick one your runtime supports."
        )
    return opset


def _reason(err: BaseException) -> str:
    """The first line of the innermost cause of ``err`` (the tracer's own words, not the
    exporter's wrapper), without terminal colour codes."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    return f"{type(err).__name__}: {(lines[0] if lines else '')[:300]}"


def export_onnx(task: "AdaptedTask", path: str | os.PathLike, opset: int | None = None,
                verify: bool = True) -> Path:
    """Write ``task`` as one ONNX graph to ``path`` (atomically) and return the path.

    Input ``images`` float32 ``[N, C, H, W]`` in [0, 1], ``N`` dynamic; outputs ``logits`` and
    ``probabilities`` (temperature-calibrated softmax), both ``[N, n_classes]``. The metadata
    (``metafit.class_names``, ``metafit.image_format``, ``metafit.normalization``,
    ``metafit.preprocessing``, ``metafit.input``, ``metafit.temperature``, ``metafit.version``, ...;
    see :func:`read_onnx_metadata`) says how to prepare images. With ``verify`` (default) the
    graph is run with onnxruntime on a random batch and must match PyTorch (|diff| <= 1e-4 +
    1e-4 |logit|); an ExportError says by how much otherwise. ``opset``: the ONNX opset to target
    (None: the exporter's default; else an integer the installed ``onnx`` supports, or a
    ConfigError). Needs the ``onnx`` extra."""
    onnx, ort = _require_onnx()
    opset = _check_opset(opset, onnx)
    spec = export_spec(task)
    model, algorithm = task.model, task.model.algorithm
    name = spec["algorithm"]
    fmt = model.image_format
    dtype = next((p.dtype for p in algorithm.parameters() if p.is_floating_point()), torch.float32)
    graph = _TaskGraph(algorithm, task.adapted, model.temperature, dtype)
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, fmt.channels, fmt.size, fmt.size, generator=gen).to(model.device)
    was_training = algorithm.training
    algorithm.eval()  # as Model keeps it: BatchNorm in the mode predict uses
    try:
        with torch.no_grad():
            ref_logits, ref_probs = graph(example)
        if ref_logits.shape != (2, task.n_classes):
            raise TaskError(
                f"Export: the adapted task must score each of its {task.n_classes} classes; got logits of shape "
                f"{tuple(ref_logits.shape)}. The task file is damaged or was edited; adapt again."
            )
        kwargs: dict[str, Any] = {"dynamo": True, "input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES),
                                  "dynamic_shapes": ({0: torch.export.Dim("N")},), "verbose": False}
        if opset is not None:
            kwargs["opset_version"] = opset
        try:
            with _quiet(), torch.no_grad():
                program = torch.onnx.export(graph, (example,), None, **kwargs)
                proto = program.model_proto
        except MetafitError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the tracer rejects becomes one line
            raise ExportError(
                f"Export: {name}'s predict must be traceable by torch.export to write ONNX; got {_reason(err)}. "
                "Export another algorithm or head, or run the model in PyTorch (task.predict)."
            ) from err
    finally:
        algorithm.train(was_training)
    del proto.metadata_props[:]
    for key, value in _metadata_props(spec).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (f"metafit {name} task over {task.n_classes} classes. Input '{INPUT_NAME}': "
                        f"{spec['preprocessing']}. Outputs: logits, probabilities (softmax(logits / "
                        f"{spec['temperature']:g})).")
    try:
        blob = proto.SerializeToString()
    except ValueError as err:  # protobuf's 2 GiB limit
        raise ExportError(
            f"Export: the graph must fit in one ONNX file (< 2 GiB); got {_reason(err)}. Use a smaller backbone."
        ) from err
    if verify:
        _verify(ort, blob, example, ref_logits, ref_probs, name)
    path = Path(path)
    atomic_write_bytes(path, lambda f: f.write(blob))
    return path


def _verify(ort: Any, blob: bytes, example: torch.Tensor, ref_logits: torch.Tensor, ref_probs: torch.Tensor,
            name: str) -> None:
    try:
        session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        logits, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: example.cpu().numpy()})
    except Exception as err:  # noqa: BLE001 - the runtime's own exception types
        raise ExportError(
            f"Export: the exported {name} graph must run in onnxruntime; got {_reason(err)}. Report this with "
            "the checkpoint's algorithm and backbone, or pass opset= another version."
        ) from err
    ref_logits, ref_probs = ref_logits.cpu().double(), ref_probs.cpu().double()
    err_logits = (torch.from_numpy(logits).double() - ref_logits).abs()
    bound = 1e-4 + 1e-4 * ref_logits.abs()
    err_probs = float((torch.from_numpy(probs).double() - ref_probs).abs().max())
    if bool((err_logits > bound).any()) or err_probs > 1e-4:
        raise ExportError(
            f"Export: the {name} graph's outputs must match PyTorch's within 1e-4; got a logit difference of "
            f"{float(err_logits.max()):.3g} and a probability difference of {err_probs:.3g}. Report this with the "
            "checkpoint's algorithm and backbone."
        )
