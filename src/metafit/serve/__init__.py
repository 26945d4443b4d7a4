"""HTTP service around a trained model (needs the ``serve`` extra: FastAPI and uvicorn)."""

from .app import ServeLimits, TaskStore, create_app, task_bytes

__all__ = ["ServeLimits", "TaskStore", "create_app", "task_bytes"]
