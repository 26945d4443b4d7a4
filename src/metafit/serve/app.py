"""The HTTP service: adapt a trained model to uploaded support sets and predict on uploaded
images (FastAPI; run with ``metafit serve CHECKPOINT``).

Endpoints (OpenAPI schema at ``/openapi.json``, interactive docs at ``/docs``):

- ``GET /health``: liveness (no API key needed).
- ``GET /info``: the model, its image format and the service limits.
- ``POST /tasks``: multipart ``images`` (files) and ``labels`` (one form field per image, or one
  JSON list) -> ``{task_id, class_names, ...}``.
- ``GET /tasks``, ``DELETE /tasks/{task_id}``.
- ``POST /tasks/{task_id}/predict``: multipart ``images`` -> per-image label, probability, top-k;
  ``?abstain_below=P`` answers ``label: null, abstained: true`` below top probability P.

Protection (:class:`ServeLimits`, all listed by ``/info``):

- ``max_body_bytes`` (32 MiB): the request body, checked on ``Content-Length`` and while it streams
  in (chunked uploads too) -> 413.
- ``max_images`` (256): images per request -> 413.
- ``max_image_pixels`` (4096 x 4096): pixels per image, read from each image's header before
  anything is decoded, by the one image reader of :mod:`metafit.data.decode` -> 413.
- ``max_request_decoded_bytes`` (1 GiB): the decoded size of all images of a request together
  (width x height x bytes per pixel, from the headers), checked before any is decoded -> 413.
- ``max_decoding_bytes`` (256 MiB): decoded images held at once over all concurrent requests.
  Each request decodes its images one at a time straight into the model's input size and lets
  each go before the next; a decode waits for room, and after ``decode_wait_s`` (30 s) the
  request gets 503. Freed image memory goes back to the system (:func:`create_app` sets glibc's
  mmap threshold), so a burst of large images leaves no lasting footprint.
- ``max_tasks`` (64): tasks kept (least recently used are evicted); an optional API key
  (``X-API-Key`` header or ``Authorization: Bearer``).

Bad input gets a 4xx JSON body ``{"error": message}`` with the message the Python API raises
(one line, users' values quoted with bounded reprs, JSON fields parsed with bounded size and
nesting); the connection is kept and the service keeps serving.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import io
import json
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator

import torch
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..data.decode import ImageTooLargeError, decoded_bytes, open_image
from ..data.store import ImageFormat, check_polarity
from ..errors import ConfigError, DataError, MetafitError, TaskError, short_repr
from ..inference import AdaptedTask, Model
from ..validation import load_json

__all__ = ["ServeLimits", "TaskStore", "create_app"]


@dataclass(frozen=True)
class ServeLimits:
    """What one request, and all requests together, may cost the service (see the module doc).

    ``max_body_bytes``: bytes of a request body; ``max_images``: images per request;
    ``max_image_pixels``: pixels per image; ``max_request_decoded_bytes``: decoded bytes of all
    images of one request; ``max_decoding_bytes``: decoded bytes held at once over all requests;
    ``decode_wait_s``: seconds a decode waits for room before the request gets 503; ``max_tasks``:
    tasks kept; ``api_key``: the key every endpoint but ``/health`` requires (None: no key). Every
    limit must be a positive number (else a :class:`~metafit.errors.ConfigError`). Frozen.
    """

    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 256
    max_image_pixels: int = 4096 * 4096
    max_request_decoded_bytes: int = 1024 * 1024 * 1024
    max_decoding_bytes: int = 256 * 1024 * 1024
    decode_wait_s: float = 30.0
    max_tasks: int = 64
    api_key: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "api_key" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not value > 0):
                raise ConfigError(f"Serve: ServeLimits.{f.name} must be a positive number; got "
                                  f"{short_repr(value)}. Pass a positive limit.")

    def public(self) -> dict[str, Any]:
        """The limits as a dict, for ``/info``: ``api_key`` says only whether a key is required."""
        d = asdict(self)
        d["api_key"] = self.api_key is not None  # whether one is required, never the key
        return d


def _clip(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 4] + " ..."


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def task_bytes(task: AdaptedTask) -> int:
    """Memory held by an adapted task's tensors."""
    total = 0
    for f in fields(task.adapted):
        v = getattr(task.adapted, f.name)
        for t in (v.values() if isinstance(v, dict) else [v]):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class TaskStore:
    """Adapted tasks by id, least recently used evicted beyond ``max_tasks``; thread-safe.

    Unknown ids raise the service's internal ``HTTPError`` (404), which :func:`create_app` answers
    as a JSON error.
    """

    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self._tasks: OrderedDict[str, tuple[AdaptedTask, float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, task: AdaptedTask) -> str:
        """Keep ``task`` (evicting the least recently used beyond ``max_tasks``); returns its new id."""
        task_id = uuid.uuid4().hex
        with self._lock:
            self._tasks[task_id] = (task, time.time(), task_bytes(task))
            while len(self._tasks) > self.max_tasks:
                self._tasks.popitem(last=False)
        return task_id

    def get(self, task_id: str) -> AdaptedTask:
        """The task kept under ``task_id``, now the most recently used (404 if unknown)."""
        with self._lock:
            if task_id not in self._tasks:
                raise HTTPError(404, f"Serve: task_id must name a kept task; got {short_repr(task_id)}. Create it "
                                     "with POST /tasks (tasks beyond the limit are evicted, least recently used first).")
            self._tasks.move_to_end(task_id)
            return self._tasks[task_id][0]

    def delete(self, task_id: str) -> None:
        """Forget the task ``task_id`` (404 if unknown)."""
        with self._lock:
            if self._tasks.pop(task_id, None) is None:
                raise HTTPError(404, f"Serve: task_id must name a kept task; got {short_repr(task_id)}. List tasks "
                                     "with GET /tasks.")

    def describe(self) -> list[dict[str, Any]]:
        """One dict per kept task, least recently used first: ``task_id``, ``class_names``, ``created``
        (a Unix time) and ``bytes`` (its tensors' memory)."""
        with self._lock:
            return [{"task_id": k, "class_names": list(t.class_names), "created": c, "bytes": b}
                    for k, (t, c, b) in self._tasks.items()]

    def __len__(self) -> int:
        return len(self._tasks)


class DecodeBudget:
    """Decoded image bytes held at once over all requests: :meth:`hold` waits until ``n`` more
    fit under ``total`` (a single image larger than ``total`` waits until it is alone)."""

    def __init__(self, total: int, wait_s: float) -> None:
        self.total, self.wait_s, self.used = total, wait_s, 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = min(n, self.total)
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + n <= self.total, self.wait_s):
                raise HTTPError(503, f"Serve: decoding must find room within {self.wait_s:g} s; got a busy "
                                     "service. Retry the request later.")
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def _return_freed_memory() -> None:
    """Let large allocations (decoded images) go back to the system when freed: glibc otherwise
    raises its mmap threshold after the first large free and keeps later ones in per-thread
    arenas, so a burst of big images leaves the process holding their memory."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD: blocks of 1 MiB and more are mmapped
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class BodyLimit:
    """ASGI middleware refusing request bodies above ``max_bytes`` with 413, whether declared in
    ``Content-Length`` or seen while the body streams in (chunked uploads): whatever the
    application answers to a body cut short is replaced by the 413."""

    class _TooLarge(StarletteHTTPException):
        def __init__(self, message: str) -> None:
            super().__init__(413, message)

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, got: str) -> str:
        return (f"Serve: the request body must be at most {self.max_bytes} bytes; got {got}. "
                "Send fewer or smaller images per request.")

    async def _reject(self, send, got: str) -> None:
        body = json.dumps({"error": self._message(got)}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(send, f"{int(declared)} bytes")
        seen = 0
        exceeded = started = replaced = False
        over = f"more than {self.max_bytes} bytes"

        async def limited_receive():
            nonlocal seen, exceeded
            if exceeded:
                raise BodyLimit._TooLarge(self._message(over))
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise BodyLimit._TooLarge(self._message(over))
            return message

        async def guarded_send(message):
            nonlocal started, replaced
            if not exceeded or started:
                started = started or message["type"] == "http.response.start"
                return await send(message)
            if not replaced and message["type"] == "http.response.start":
                replaced = True  # the application's answer to a cut body becomes the 413
                await self._reject(send, over)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyLimit._TooLarge:
            if not replaced and not started:
                replaced = True
                await self._reject(send, over)


def _key_check(limits: ServeLimits) -> Callable[[Request], None]:
    """The dependency that refuses requests without the API key (none is needed without one)."""

    def check_key(request: Request) -> None:
        if limits.api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:]
        if given is None or not hmac.compare_digest(given.encode(), limits.api_key.encode()):
            raise HTTPError(401, "Serve: requests must carry the API key; got none or a wrong one. Send it in "
                                 "the X-API-Key header (or Authorization: Bearer KEY).")

    return check_key


def _add_error_handlers(app: FastAPI) -> None:
    """Every error becomes one JSON line ``{"error": ...}`` with its status."""
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(MetafitError)
    async def _metafit_error(request: Request, err: MetafitError):
        return JSONResponse({"error": str(err)}, status_code=413 if isinstance(err, ImageTooLargeError) else 400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors()[:4]]
        return JSONResponse({"error": "Serve: the request must match the endpoint's form; got "
                                      + _clip("; ".join(parts), 300) + ". See /docs for the fields."},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, err: StarletteHTTPException):
        detail = str(err.detail)
        if detail.startswith("Serve: "):  # ours, e.g. the body limit's
            message = detail
        elif err.status_code == 400:  # the body did not parse (FastAPI keeps the parser's reason as the cause)
            reason = _clip(str(err.__cause__ or detail).rstrip("."), 160)
            message = ("Serve: the request body must be multipart form data (files 'images', field 'labels'); got "
                       f"{reason}. Send the images as files of a multipart form.")
        else:
            message = (f"Serve: the request must address an endpoint as documented; got {request.method} "
                       f"{short_repr(request.url.path)} ({detail}). See /docs.")
        return JSONResponse({"error": message}, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):  # logged by the server; the client gets JSON
        return JSONResponse({"error": f"Serve: the request must be one the service can answer; got an internal "
                                      f"error ({type(err).__name__}). Report it with the request that caused it."},
                            status_code=500)


def _read_images(files: list[UploadFile], limits: ServeLimits, budget: DecodeBudget,
                 fmt: ImageFormat) -> tuple[torch.Tensor, list[str]]:
    """The uploads as model input [N, C, size, size]: every header checked first (pixels
    per image, decoded bytes of the request), then decoded one at a time straight into the
    model's input size under the shared decoding budget."""
    if not files:
        raise DataError("Serve: a request must carry at least one image (form field 'images'); got none. "
                        "Attach image files.")
    if len(files) > limits.max_images:
        raise HTTPError(413, f"Serve: a request may carry at most {limits.max_images} images; got {len(files)}. "
                             "Split them over several requests.")
    fix = "Downscale it before sending it."
    names = [short_repr(f.filename or f"image {i}") for i, f in enumerate(files)]

    def opened(i: int):  # the reader closes what it opens: hand it a copy of the (compressed) upload
        files[i].file.seek(0)
        return open_image(io.BytesIO(files[i].file.read()), names[i], limits.max_image_pixels, fix)

    sizes = []
    for i in range(len(files)):  # headers only: nothing is decoded yet
        with opened(i) as im:
            sizes.append(decoded_bytes(im))
    total = sum(sizes)
    if total > limits.max_request_decoded_bytes:
        raise HTTPError(413, f"Serve: the images of a request must decode to at most "
                             f"{limits.max_request_decoded_bytes} bytes together; got {total} bytes from "
                             f"{len(files)} images. Send fewer or smaller images per request.")
    out = torch.empty((len(files), fmt.channels, fmt.size, fmt.size))
    for i, n in enumerate(sizes):  # one at a time, each let go before the next
        with budget.hold(n), opened(i) as im:
            out[i] = torch.from_numpy(fmt.array(im)).float() / 255.0
    return out, [f.filename or f"image {i}" for i, f in enumerate(files)]


def _parse_labels(labels: list[str]) -> list[str | int]:
    if len(labels) == 1 and labels[0].lstrip().startswith("["):
        parsed = load_json(labels[0], "Serve: the labels field", error=TaskError)
        if not isinstance(parsed, list):
            raise TaskError("Serve: a JSON labels field must be a list; got another value. Send [\"a\", ...].")
        for value in parsed:
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise TaskError(f"Serve: labels must be strings or integers; got {short_repr(value)}. "
                                "Send one class name per image.")
        return parsed
    return labels


def create_app(model: Model, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The FastAPI application serving ``model`` under ``limits``. It sets glibc's mmap threshold
    of the process (1 MiB) so that memory of decoded images goes back to the system when freed.
    A model on vectors (not images) is a :class:`~metafit.errors.TaskError`."""
    if model.image_format is None:
        raise TaskError(
            f"Serve: the model must take images; got a {model.config.data.task_kind} model on vectors. "
            "Serve an image classification checkpoint."
        )
    app = FastAPI(title="metafit", version=__version__,
                  description="Adapt a meta-trained model to your labelled images and predict.")
    store = TaskStore(limits.max_tasks)
    compute = threading.Lock()  # one adapt/predict at a time: models are not re-entrant (BatchNorm modes)
    budget = DecodeBudget(limits.max_decoding_bytes, limits.decode_wait_s)
    fmt = model.image_format
    app.state.store, app.state.limits, app.state.model = store, limits, model
    _return_freed_memory()
    check_key = _key_check(limits)
    _add_error_handlers(app)

    def read_images(files: list[UploadFile]) -> tuple[torch.Tensor, list[str]]:
        return _read_images(files, limits, budget, fmt)


    @app.get("/health")
    async def health() -> dict[str, str]:  # on the event loop: answers while workers are busy
        return {"status": "ok"}

    @app.get("/info", dependencies=[Depends(check_key)])
    def info() -> dict[str, Any]:
        cfg = model.config
        return {"metafit_version": __version__, "algorithm": cfg.algorithm.name,
                "algorithm_config": cfg.algorithm.model_dump(mode="json"),
                "backbone": cfg.backbone.name, "image_format": model.image_format.to_dict(),
                "checkpoint": model.checkpoint.name if model.checkpoint else None,
                "step": model.checkpoint_meta.get("step"), "temperature": model.temperature,
                "tasks": len(store), "limits": limits.public()}

    @app.post("/tasks", status_code=201, dependencies=[Depends(check_key)])
    def create_task(images: list[UploadFile] = File(...), labels: list[str] = Form(...),
                    polarity: str = Form("auto")) -> dict[str, Any]:
        names = _parse_labels(labels)
        check_polarity(polarity, "Serve", "Send polarity=auto (detect from each image's border), as_trained or flip.")
        x, _ = read_images(images)
        with compute:
            task = model.adapt(x, names, polarity=polarity)
        task_id = store.add(task)
        return {"task_id": task_id, "class_names": list(task.class_names), "n_support": len(x),
                "bytes": task_bytes(task), "polarity": task.support_polarity.to_dict()}

    @app.get("/tasks", dependencies=[Depends(check_key)])
    def list_tasks() -> dict[str, Any]:
        return {"tasks": store.describe(), "max_tasks": limits.max_tasks}

    @app.delete("/tasks/{task_id}", status_code=204, dependencies=[Depends(check_key)])
    def delete_task(task_id: str) -> None:
        store.delete(task_id)

    @app.post("/tasks/{task_id}/predict", dependencies=[Depends(check_key)])
    def predict(task_id: str, images: list[UploadFile] = File(...), top_k: int = 3,
                abstain_below: float | None = None, polarity: str | None = Form(None)) -> dict[str, Any]:
        task = store.get(task_id)
        if top_k < 1:
            raise TaskError(f"Serve: top_k must be >= 1; got {top_k}. Pass a positive top_k.")
        if polarity is not None:
            check_polarity(polarity, "Serve", "Send polarity=auto, as_trained or flip, or leave it out (the task's own).")
        x, names = read_images(images)
        with compute:
            pred = task.predict(x, abstain_below=abstain_below, polarity=polarity)
        return {"task_id": task_id, "polarity": pred.polarity.to_dict(), "predictions": [
            {"file": n, "label": lab, "probability": float(p.max()), "abstained": lab is None,
             "top_k": [{"label": c, "probability": q} for c, q in top]}
            for n, lab, p, top in zip(names, pred.labels, pred.probabilities, pred.top_k(top_k))]}

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app
