"""Worker processes that decode lazily stored images ahead of training (``data.storage: lazy``).

The main process draws every batch's description (episode classes and image positions, or a
mini-batch's picks) from the sampler's generator exactly as in memory mode; a
``torch.utils.data.DataLoader`` with persistent workers and an episodic batch sampler decodes
the images of the next few batches meanwhile; batches come back in order and are assembled
(rotations, augmentation, support/query split) in the main process. So a seed gives the same
episodes in every storage mode, and resuming is exact: the sampler's reported state is the
state before the oldest batch drawn but not yet consumed.

A worker never raises into the DataLoader (whose re-raised errors carry a worker traceback): an
unreadable image comes back as a message, and the main process raises it as a one-line
:class:`~metafit.errors.DataError` after stopping the workers.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .store import FileImages

__all__ = ["PrefetchPipeline", "decode_batches", "default_workers", "prefetch_list"]


def default_workers() -> int:
    """Decoding processes when none are configured: one per core beyond the first, at most 4."""
    import os  # noqa: PLC0415

    return max(1, min(4, (os.cpu_count() or 2) - 1))


class _Decode(Dataset):
    """Decodes a list of image indices in a worker: ``(uint8 [n, C, H, W], None)`` or
    ``(None, error message)``."""

    def __init__(self, store: FileImages) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):  # pragma: no cover - DataLoader uses __getitems__
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]):
        try:
            return self.store.fetch(torch.as_tensor(indices, dtype=torch.long)), None
        except DataError as err:
            return None, str(err)


def _identity(batch):
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is PIL work; keep torch's pools out of the training cores


def _loader(store: FileImages, batches, workers: int, prefetch: int) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = dict(num_workers=workers, prefetch_factor=prefetch, persistent_workers=True,
                      worker_init_fn=_worker_init)
    return DataLoader(_Decode(store), batch_sampler=batches, collate_fn=_identity, **kwargs)


def _checked(item) -> torch.Tensor:
    images, error = item
    if error is not None:
        raise DataError(error)
    return images


def decode_batches(store: FileImages, workers: int = 0, batch_size: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, uint8 images)`` for consecutive chunks of the whole store, decoded by ``workers``."""
    starts = list(range(0, len(store), batch_size))
    yield from prefetch_list(store, starts, lambda s: torch.arange(s, min(s + batch_size, len(store))), workers,
                             prefetch=4)


class _Requests:
    """The DataLoader's batch sampler: pulls the next description from the pipeline (in the
    main process) and hands its image indices to a worker."""

    def __init__(self, pipeline: "PrefetchPipeline") -> None:
        self.pipeline = pipeline

    def __iter__(self):
        while True:
            yield self.pipeline._draw_next()


class PrefetchPipeline:
    """Decodes the images of upcoming batches in worker processes.

    ``draw()`` -> ``(description, image indices)`` draws the next batch from the sampler's
    generator; ``get_state()``/``set_state()`` are the generator's; ``assemble(description,
    uint8 images)`` builds the batch. The pipeline keeps the generator state before each drawn
    batch so that :meth:`state` is the state of the next batch to be consumed."""

    def __init__(self, store: FileImages, draw: Callable[[], tuple[Any, torch.Tensor]],
                 get_state: Callable[[], torch.Tensor], workers: int, prefetch: int = 2) -> None:
        self.store = store
        self._draw = draw
        self._get_state = get_state
        self.workers = workers
        self.prefetch = prefetch
        self.pending: deque[tuple[Any, torch.Tensor]] = deque()
        self._it = None

    def _draw_next(self) -> list[int]:
        state = self._get_state()
        description, indices = self._draw()
        self.pending.append((description, state))
        return indices.reshape(-1).tolist()

    def next(self) -> tuple[Any, torch.Tensor]:
        """The next batch's description and its decoded uint8 images."""
        if self._it is None:
            self._it = iter(_loader(self.store, _Requests(self), self.workers, self.prefetch))
        try:
            item = next(self._it)
            images = _checked(item)
        except BaseException:
            self._stop_workers()  # the owner decides what happens to the drawn batches (see close)
            raise
        description, _ = self.pending.popleft()
        return description, images

    def state(self) -> torch.Tensor | None:
        """Generator state before the oldest drawn-but-unconsumed batch (None: nothing pending)."""
        return self.pending[0][1] if self.pending else None

    def _stop_workers(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def close(self) -> None:
        """Stop the workers and forget drawn batches (the caller restores the generator)."""
        self._stop_workers()
        self.pending.clear()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


def prefetch_list(store: FileImages, items: list, indices_of: Callable[[Any], torch.Tensor],
                  workers: int, prefetch: int = 2) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(item, uint8 images)`` for a finite list (e.g. fixed evaluation episodes), in order, the
    images of upcoming items decoded by ``workers`` processes meanwhile."""
    batches = [indices_of(item).reshape(-1).tolist() for item in items]
    it = iter(_loader(store, batches, workers, prefetch))
    try:
        for item in items:
            yield item, _checked(next(it))
    finally:
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        del it
