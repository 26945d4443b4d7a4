"""N-way K-shot Q-query episode sampling by index arithmetic.

Classes are drawn with one ``randperm`` (optionally inside one group, e.g. one alphabet), images
of every drawn class with one batched ``argsort`` of random keys, and 90-degree rotations (new
classes, as in Vinyals et al. / Snell et al.) are applied per rotation group: there is no
per-image Python loop. An episode is first described by indices (``Episode``), so a fixed list
of evaluation episodes is cheap to keep and identical for a given seed on any machine.

Two random streams: one draws the episodes (classes and images), the other the augmentation.
The second is consumed in step order whatever the storage, so with lazily decoded images
(worker processes decode the next batches while the model trains on this one) a seed gives
exactly the episodes and augmentations of memory storage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import DataError
from ..types import Task, TaskBatch
from .augment import ImageAugment
from .classes import ImageClasses
from .loader import PrefetchPipeline, default_workers, prefetch_list

__all__ = ["Episode", "EpisodeSampler", "SamplerStreams", "apply_symmetries", "as_augment", "symmetry_count"]


def _check_shard(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise DataError(
            f"Sampler: rank must lie in 0..world_size-1 with world_size >= 1; got rank {rank!r} of "
            f"{world_size!r}. Pass the process's rank and the number of processes."
        )


@dataclass(frozen=True)
class Episode:
    """An episode described by indices, before any image is read: ``classes``, the ``n_ways``
    virtual class ids drawn (``base class * n_rot + rotation``; label ``i`` is ``classes[i]``), and
    ``positions`` ``[n_ways, k_shots + n_queries]``, the images' positions inside each class (the
    first ``k_shots`` of every row form the support set)."""

    classes: torch.Tensor  # [n_ways] virtual class ids (base * n_rot + rotation)
    positions: torch.Tensor  # [n_ways, k + q] image positions inside each class


def symmetry_count(rotations: bool, reflections: bool) -> int:
    """How many classes every class becomes: 4 with ``rotations`` (0/90/180/270 degrees), twice as
    many with ``reflections`` (each also mirrored left to right)."""
    return (4 if rotations else 1) * (2 if reflections else 1)


def apply_symmetries(x: torch.Tensor, which: torch.Tensor, rotations: bool) -> torch.Tensor:
    """Turn every image (or row of images) ``x[i]`` ([N, ..., H, W], in place) into its copy number
    ``which[i]`` (see :func:`symmetry_count`): copy ``r`` is rotated by ``r % 4`` quarter turns (``r``
    itself without ``rotations``), mirrored first when ``r`` is at least 4 (1 without rotations)."""
    turns = 4 if rotations else 1
    for r in torch.unique(which).tolist():
        if r == 0:
            continue
        sel = torch.nonzero(which == r).flatten()
        y = x[sel]
        if r >= turns:
            y = y.flip(-1)
        if r % turns:
            y = torch.rot90(y, r % turns, dims=(-2, -1))
        x[sel] = y
    return x


def as_augment(augment) -> ImageAugment | None:
    """An :class:`ImageAugment` from one, from a dict of :func:`random_affine` arguments (the
    older form), or None."""
    if augment is None or isinstance(augment, ImageAugment):
        return augment
    return ImageAugment(affine=dict(augment)) if augment else None


class SamplerStreams:
    """The random streams of a training sampler over image data: ``generator`` (what is drawn)
    and ``aug_generator`` (augmentation), and for lazily stored images the prefetch pipeline
    whose pending draws :meth:`get_state` accounts for. Subclasses implement ``_draw(*args)`` ->
    ``(description, image indices)`` and ``_assemble(description, uint8 images, args)``."""

    data: ImageClasses
    augment_seconds: float = 0.0  # wall time spent augmenting (the trainer reports it apart from loading)

    def _augmented(self, x: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
        t = time.perf_counter()
        x = self.augment(x, self.aug_generator, shard=shard)
        self.augment_seconds += time.perf_counter() - t
        return x

    def _init_streams(self, seed: int, workers: int | None) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))
        self.aug_generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + 0x5EED) % (2**63))
        self.workers = default_workers() if workers is None else int(workers)
        self._pipeline: PrefetchPipeline | None = None
        self._pipeline_args: tuple | None = None

    # -- RNG state (for exact resume) ---------------------------------------------------------
    def get_state(self) -> torch.Tensor:
        """Both streams' states as one tensor, as of the last batch handed out."""
        pending = self._pipeline.state() if self._pipeline is not None else None
        draws = pending if pending is not None else self.generator.get_state()
        return torch.cat([draws, self.aug_generator.get_state()])

    def set_state(self, state: torch.Tensor) -> None:
        """Restore :meth:`get_state`'s tensor (a checkpoint of an older version holds the first
        stream only; augmentation then continues from its current state)."""
        self.close()
        n = self.generator.get_state().numel()
        self.generator.set_state(state[:n].clone())
        if state.numel() >= 2 * n:
            self.aug_generator.set_state(state[n:2 * n].clone())

    def close(self) -> None:
        """Stop prefetching workers; the draw stream rewinds to the first unconsumed batch."""
        if self._pipeline is not None:
            pending = self._pipeline.state()
            self._pipeline.close()
            self._pipeline = None
            if pending is not None:
                self.generator.set_state(pending)

    def _next(self, args: tuple):
        """The next batch for ``args``: drawn and decoded here (memory storage), or taken from
        the prefetch pipeline (lazy storage, ``workers`` > 0)."""
        if not (self.data.lazy and self.workers > 0):
            description, indices = self._draw(*args)
            return self._assemble(description, self.data.fetch(indices), args)
        if self._pipeline is None or self._pipeline_args != args:
            self.close()
            self._pipeline = PrefetchPipeline(self.data.images, lambda: self._draw(*args),
                                              self.generator.get_state, self.workers)
            self._pipeline_args = args
        try:
            description, images = self._pipeline.next()
        except BaseException:
            self.close()  # workers stopped; the draw stream rewinds to the batch that failed
            raise
        return self._assemble(description, images, args)


class EpisodeSampler(SamplerStreams):
    """Samples tasks from an :class:`ImageClasses` collection.

    ``rotations=True`` turns every class into four (0/90/180/270 degrees), ``reflections=True``
    doubles that with mirror images (:func:`symmetry_count`); ``within_group=True``
    draws all classes of an episode from one group (alphabet). ``augment`` (an
    :class:`ImageAugment`, or a dict of :func:`random_affine` arguments) is applied to sampled
    training images. ``workers``: processes decoding lazily stored images ahead of use (None:
    one per core beyond the first, at most 4; 0: decode in this process).

    ``data``: the classes to draw from; ``n_ways`` (>= 2), ``k_shots`` and ``n_queries`` (>= 1): the
    task shape; every class must have ``k_shots + n_queries`` images and there must be ``n_ways``
    classes (a :class:`~metafit.errors.DataError` otherwise, started by ``owner``). ``seed``: seeds
    both random streams (episodes and augmentation).
    """

    def __init__(self, data: ImageClasses, n_ways: int, k_shots: int, n_queries: int, *,
                 rotations: bool = False, within_group: bool = False, augment=None,
                 seed: int = 0, owner: str = "EpisodeSampler", workers: int | None = None,
                 reflections: bool = False) -> None:
        for name, v, lo in (("n_ways", n_ways, 2), ("k_shots", k_shots, 1), ("n_queries", n_queries, 1)):
            if not isinstance(v, int) or v < lo:
                raise DataError(f"{owner}: {name} must be an integer >= {lo}; got {v!r}. Fix the task settings.")
        self.data = data
        self.n_ways, self.k_shots, self.n_queries = n_ways, k_shots, n_queries
        self.rotations = bool(rotations)
        self.n_rot = symmetry_count(rotations, reflections)  # copies per class (rotations, mirror images)
        self.within_group = within_group
        self.augment = as_augment(augment)
        self._init_streams(seed, workers)
        need = k_shots + n_queries
        counts = data.class_count
        short = torch.nonzero(counts < need).flatten()
        if len(short):
            c = int(short[0])
            raise DataError(
                f"{owner}: class {data.class_names[c]!r} must have at least k_shots + n_queries = "
                f"{need} images; got {int(counts[c])}. Add images to it, remove the class, or lower "
                "k_shots/n_queries."
            )
        n_virtual = data.n_classes * self.n_rot
        if n_virtual < n_ways:
            raise DataError(
                f"{owner}: the dataset must have at least n_ways = {n_ways} classes; got "
                f"{n_virtual}. Lower n_ways or add classes."
            )
        self.max_count = int(counts.max())
        if within_group:
            vgroup = data.class_group.repeat_interleave(self.n_rot)
            self.group_classes = [
                torch.nonzero(vgroup == g).flatten() for g in range(len(data.group_names))
            ]
            self.group_classes = [c for c in self.group_classes if len(c) >= n_ways]
            if not self.group_classes:
                biggest = max(int((vgroup == g).sum()) for g in range(len(data.group_names)))
                raise DataError(
                    f"{owner}: within_group episodes need a group with at least n_ways = {n_ways} "
                    f"classes; got at most {biggest}. Lower n_ways or turn within_group off."
                )

    # -- sampling -----------------------------------------------------------------------------
    def sample_episode(self) -> Episode:
        """Draw the description of one new episode (an :class:`Episode`) from the sampler's generator."""
        g = self.generator
        if self.within_group:
            pool = self.group_classes[int(torch.randint(len(self.group_classes), (1,), generator=g))]
            classes = pool[torch.randperm(len(pool), generator=g)[: self.n_ways]]
        else:
            classes = torch.randperm(self.data.n_classes * self.n_rot, generator=g)[: self.n_ways]
        counts = self.data.class_count[classes // self.n_rot]
        keys = torch.rand(self.n_ways, self.max_count, generator=g)
        keys[torch.arange(self.max_count)[None, :] >= counts[:, None]] = 2.0  # never chosen
        positions = keys.argsort(dim=1)[:, : self.k_shots + self.n_queries]
        return Episode(classes, positions)

    def fixed_episodes(self, n: int, seed: int) -> list[Episode]:
        """A reproducible list of ``n`` episodes, which depends only on ``seed`` (and the data), and
        leaves this sampler's own RNG untouched."""
        saved = self.generator.get_state()
        self.generator.manual_seed(int(seed))
        try:
            return [self.sample_episode() for _ in range(n)]
        finally:
            self.generator.set_state(saved)

    def image_indices(self, episodes: list[Episode]) -> torch.Tensor:
        """Storage positions of the images of ``episodes``: [B, n_ways, k + q]."""
        classes = torch.stack([e.classes for e in episodes])  # [B, n]
        positions = torch.stack([e.positions for e in episodes])  # [B, n, k+q]
        return self.data.class_start[classes // self.n_rot].unsqueeze(-1) + positions

    def assemble(self, episodes: list[Episode], images: torch.Tensor, augment: bool = False,
                 shard: tuple[int, int] = (0, 1)) -> TaskBatch:
        """The float ``TaskBatch`` (values in [0, 1]) of ``episodes`` from their uint8 ``images``
        (in :meth:`image_indices` order): rotations, augmentation (only with ``augment=True`` and a
        sampler ``augment``), support/query split. ``shard``: ``(rank, world_size)``, the batch being
        rank's slice of a larger one (see :meth:`sample`), so the augmentation draws match."""
        classes = torch.stack([e.classes for e in episodes])  # [B, n]
        b, n = classes.shape
        m = self.k_shots + self.n_queries
        rot = (classes % self.n_rot).flatten()
        x = images.float().div_(255.0)  # [B*n*(k+q), C, H, W]
        x = x.view(b * n, m, *x.shape[1:])
        if self.n_rot > 1:
            apply_symmetries(x, rot, self.rotations)
        if augment and self.augment is not None:
            x = self._augmented(x.flatten(0, 1), shard).view_as(x)
        x = x.view(b, n, m, *x.shape[2:])
        k = self.k_shots
        support = x[:, :, :k].flatten(1, 2)
        query = x[:, :, k:].flatten(1, 2)
        labels = torch.arange(n)
        sy = labels.repeat_interleave(k).expand(b, -1).contiguous()
        qy = labels.repeat_interleave(m - k).expand(b, -1).contiguous()
        return TaskBatch(support, sy, query, qy, n)

    def materialize(self, episodes: list[Episode], augment: bool = False,
                    shard: tuple[int, int] = (0, 1)) -> TaskBatch:
        """Turn ``episodes`` (descriptions) into a float ``TaskBatch`` in [0, 1], reading their images;
        ``augment`` applies the sampler's augmentation (``shard``: see :meth:`assemble`)."""
        return self.assemble(episodes, self.data.fetch(self.image_indices(episodes).flatten()), augment, shard)

    def tasks(self, episodes: list[Episode]):
        """One :class:`Task` per fixed episode of ``episodes``, in order, without augmentation (a
        generator; lazily stored images are decoded by the worker processes ahead of use)."""
        if self.data.lazy and self.workers > 0:
            for e, images in prefetch_list(self.data.images, list(episodes),
                                           lambda e: self.image_indices([e]), self.workers):
                yield self.assemble([e], images)[0]
        else:
            for e in episodes:
                yield self.materialize([e])[0]

    def _draw(self, meta_batch_size: int, rank: int, world_size: int):
        episodes = [self.sample_episode() for _ in range(meta_batch_size * world_size)]
        mine = episodes[rank * meta_batch_size:(rank + 1) * meta_batch_size]
        return mine, self.image_indices(mine).flatten()

    def _assemble(self, mine, images, args) -> TaskBatch:
        _, rank, world_size = args
        return self.assemble(mine, images, augment=True, shard=(rank, world_size))

    def sample(self, meta_batch_size: int = 1, rank: int = 0, world_size: int = 1) -> TaskBatch:
        """Sample a training batch of tasks (augmented if the sampler has ``augment``).

        Distributed training: with ``world_size`` ranks, every rank draws the descriptions of the
        global batch of ``meta_batch_size * world_size`` tasks (cheap index draws) and builds only
        its own slice, so ranks train on different tasks, their generators stay in step, and the
        union of the slices is exactly what one process would sample."""
        _check_shard(rank, world_size)
        return self._next((meta_batch_size, rank, world_size))

    def sample_task(self) -> Task:
        """One training task (:meth:`sample` of one task, augmented if the sampler has ``augment``)."""
        return self.sample(1)[0]
