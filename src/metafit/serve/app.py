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

Protection: a maximum request body (checked on ``Content-Length`` and while streaming), images
per request, pixels per image (checked before decoding), tasks kept (least recently used are
evicted), an optional API key (``X-API-Key`` header or ``Authorization: Bearer``). Bad input gets
a 4xx JSON body ``{"error": message}`` with the message the Python API raises; the service
keeps serving.
"""

from __future__ import annotations

import hmac
import io
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import DataError, MetafitError, TaskError
from ..training.inference import AdaptedTask, Model

__all__ = ["ServeLimits", "TaskStore", "create_app"]


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 256
    max_image_pixels: int = 4096 * 4096
    max_tasks: int = 64
    api_key: str | None = None

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["api_key"] = self.api_key is not None  # whether one is required, never the key
        return d


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
    """Adapted tasks by id, least recently used evicted beyond ``max_tasks``; thread-safe."""

    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self._tasks: OrderedDict[str, tuple[AdaptedTask, float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, task: AdaptedTask) -> str:
        task_id = uuid.uuid4().hex
        with self._lock:
            self._tasks[task_id] = (task, time.time(), task_bytes(task))
            while len(self._tasks) > self.max_tasks:
                self._tasks.popitem(last=False)
        return task_id

    def get(self, task_id: str) -> AdaptedTask:
        with self._lock:
            if task_id not in self._tasks:
                raise HTTPError(404, f"Serve: task_id must name a kept task; got {task_id!r}. Create it with POST "
                                     "/tasks (tasks beyond the limit are evicted, least recently used first).")
            self._tasks.move_to_end(task_id)
            return self._tasks[task_id][0]

    def delete(self, task_id: str) -> None:
        with self._lock:
            if self._tasks.pop(task_id, None) is None:
                raise HTTPError(404, f"Serve: task_id must name a kept task; got {task_id!r}. List tasks with GET /tasks.")

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"task_id": k, "class_names": list(t.class_names), "created": c, "bytes": b}
                    for k, (t, c, b) in self._tasks.items()]

    def __len__(self) -> int:
        return len(self._tasks)


class BodyLimit:
    """ASGI middleware refusing request bodies above ``max_bytes`` with 413 (declared or streamed)."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, got: str) -> bytes:
        return json.dumps({"error": f"Serve: the request body must be at most {self.max_bytes} bytes; got {got}. "
                                    "Send fewer or smaller images per request."}).encode()

    async def _reject(self, send, got: str) -> None:
        body = self._message(got)
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
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyLimit._TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyLimit._TooLarge:
            if not started:
                await self._reject(send, f"more than {self.max_bytes} bytes")


def create_app(model: Model, limits: ServeLimits = ServeLimits()) -> FastAPI:
    """The FastAPI application serving ``model`` under ``limits``."""
    if model.image_format is None:
        raise TaskError(
            f"Serve: the model must take images; got a {model.config.data.task_kind} model on vectors. "
            "Serve an image classification checkpoint."
        )
    app = FastAPI(title="metafit", version=__version__,
                  description="Adapt a meta-trained model to your labelled images and predict.")
    store = TaskStore(limits.max_tasks)
    compute = threading.Lock()  # one adapt/predict at a time: models are not re-entrant (BatchNorm modes)
    app.state.store, app.state.limits, app.state.model = store, limits, model

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

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(MetafitError)
    async def _metafit_error(request: Request, err: MetafitError):
        return JSONResponse({"error": str(err)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors()]
        return JSONResponse({"error": "Serve: the request must match the endpoint's form; got "
                                      + "; ".join(parts) + ". See /docs for the fields."}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, err: StarletteHTTPException):
        return JSONResponse({"error": f"Serve: {err.detail}"}, status_code=err.status_code)

    def read_images(files: list[UploadFile]) -> tuple[list[Image.Image], list[str]]:
        if not files:
            raise DataError("Serve: a request must carry at least one image (form field 'images'); got none. "
                            "Attach image files.")
        if len(files) > limits.max_images:
            raise HTTPError(413, f"Serve: a request may carry at most {limits.max_images} images; got {len(files)}. "
                                 "Split them over several requests.")
        images, names = [], []
        for i, f in enumerate(files):
            name = f.filename or f"image {i}"
            data = f.file.read()
            try:
                im = Image.open(io.BytesIO(data))
                w, h = im.size
                if w * h > limits.max_image_pixels:
                    raise HTTPError(413, f"Serve: images may have at most {limits.max_image_pixels} pixels; got "
                                         f"{name!r} with {w}x{h}. Downscale it before sending.")
                im.load()
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
                raise DataError(f"Serve: {name!r} must be an image (PNG, JPEG, ...); got unreadable data ({err}). "
                                "Send image files.") from err
            images.append(im)
            names.append(name)
        return images, names

    def parse_labels(labels: list[str]) -> list[str]:
        if len(labels) == 1 and labels[0].lstrip().startswith("["):
            try:
                parsed = json.loads(labels[0])
            except json.JSONDecodeError as err:
                raise TaskError(f"Serve: labels must be one form field per image or one JSON list; got invalid "
                                f"JSON ({err}). Fix the labels field.") from err
            if not isinstance(parsed, list):
                raise TaskError("Serve: a JSON labels field must be a list; got another value. Send [\"a\", ...].")
            return parsed
        return labels

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", dependencies=[Depends(check_key)])
    def info() -> dict[str, Any]:
        cfg = model.config
        return {"metafit_version": __version__, "algorithm": cfg.algorithm.name,
                "algorithm_config": cfg.algorithm.model_dump(mode="json"),
                "backbone": cfg.backbone.name, "image_format": model.image_format.to_dict(),
                "checkpoint": str(model.checkpoint) if model.checkpoint else None,
                "step": model.checkpoint_meta.get("step"), "temperature": model.temperature,
                "tasks": len(store), "limits": limits.public()}

    @app.post("/tasks", status_code=201, dependencies=[Depends(check_key)])
    def create_task(images: list[UploadFile] = File(...), labels: list[str] = Form(...)) -> dict[str, Any]:
        pics, _ = read_images(images)
        with compute:
            task = model.adapt(pics, parse_labels(labels))
        task_id = store.add(task)
        return {"task_id": task_id, "class_names": list(task.class_names), "n_support": len(pics),
                "bytes": task_bytes(task)}

    @app.get("/tasks", dependencies=[Depends(check_key)])
    def list_tasks() -> dict[str, Any]:
        return {"tasks": store.describe(), "max_tasks": limits.max_tasks}

    @app.delete("/tasks/{task_id}", status_code=204, dependencies=[Depends(check_key)])
    def delete_task(task_id: str) -> None:
        store.delete(task_id)

    @app.post("/tasks/{task_id}/predict", dependencies=[Depends(check_key)])
    def predict(task_id: str, images: list[UploadFile] = File(...), top_k: int = 3,
                abstain_below: float | None = None) -> dict[str, Any]:
        task = store.get(task_id)
        if top_k < 1:
            raise TaskError(f"Serve: top_k must be >= 1; got {top_k}. Pass a positive top_k.")
        pics, names = read_images(images)
        with compute:
            pred = task.predict(pics, abstain_below=abstain_below)
        return {"task_id": task_id, "predictions": [
            {"file": n, "label": lab, "probability": float(p.max()), "abstained": lab is None,
             "top_k": [{"label": c, "probability": q} for c, q in top]}
            for n, lab, p, top in zip(names, pred.labels, pred.probabilities, pred.top_k(top_k))]}

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app
