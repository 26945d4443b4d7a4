"""Standard mini-batches over all base classes (supervised pretraining of transfer baselines).

Every (class, rotation) pair is one base class, exactly the virtual classes the episode sampler
draws from: with rotations, Omniglot's 1028 training characters become 4112 classes. Images are
drawn uniformly at random with replacement from all (image, rotation) pairs, so the state of a
sampler is its generator alone and resume is exact.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from ..types import LabelledBatch
from .classes import ImageClasses
from .sampler import SamplerStreams, _check_shard, apply_symmetries, as_augment, symmetry_count

__all__ = ["ClassBatchSampler"]


class ClassBatchSampler(SamplerStreams):
    """Samples :class:`LabelledBatch` mini-batches with labels ``class * n_rot + rotation``
    (``augment`` and ``workers``: see :class:`EpisodeSampler`).

    ``data``: the training classes (at least 2, else a :class:`~metafit.errors.DataError` started by
    ``owner``); ``rotations``: every class also in 90, 180 and 270 degree rotations, as new classes;
    ``reflections``: every class (and rotation) also mirrored, as new classes; ``seed``: seeds the
    random streams.
    """

    def __init__(self, data: ImageClasses, *, rotations: bool = False, augment=None,
                 seed: int = 0, owner: str = "ClassBatchSampler", workers: int | None = None,
                 reflections: bool = False) -> None:
        if data.n_classes < 2:
            raise DataError(
                f"{owner}: pretraining needs at least 2 classes; got {data.n_classes}. Add classes to the "
                "training split."
            )
        self.data = data
        self.rotations = bool(rotations)
        self.n_rot = symmetry_count(rotations, reflections)
        self.augment = as_augment(augment)
        self._init_streams(seed, workers)
        counts = data.class_count
        # position of every image of the collection and its class, in class order
        self.image_class = torch.arange(data.n_classes).repeat_interleave(counts)
        offsets = torch.cumsum(counts, 0) - counts
        within = torch.arange(int(counts.sum())) - offsets.repeat_interleave(counts)
        self.image_index = data.class_start.repeat_interleave(counts) + within

    @property
    def n_classes(self) -> int:
        """Base classes (rotated and mirrored copies count as classes)."""
        return self.data.n_classes * self.n_rot

    def _draw(self, batch_size: int, rank: int, world_size: int):
        g = self.generator
        total, sl = batch_size * world_size, slice(rank * batch_size, (rank + 1) * batch_size)
        pick = torch.randint(len(self.image_index), (total,), generator=g)[sl]
        rot = torch.randint(self.n_rot, (total,), generator=g)[sl]
        return (pick, rot), self.image_index[pick]

    def _assemble(self, description, images: torch.Tensor, args) -> LabelledBatch:
        pick, rot = description
        _, rank, world_size = args
        x = images.float().div_(255.0)
        if self.n_rot > 1:
            apply_symmetries(x, rot, self.rotations)
        if self.augment is not None:
            x = self._augmented(x, (rank, world_size))
        return LabelledBatch(x, self.image_class[pick] * self.n_rot + rot)

    def sample(self, batch_size: int, rank: int = 0, world_size: int = 1) -> LabelledBatch:
        """``batch_size`` images; with ``world_size`` ranks, rank's slice of a global batch of
        ``batch_size * world_size`` (see :meth:`EpisodeSampler.sample`)."""
        _check_shard(rank, world_size)
        return self._next((batch_size, rank, world_size))
