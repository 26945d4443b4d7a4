"""Labelled image collections: the images (a uint8 tensor in memory, or a lazily decoded
:class:`~metafit.data.store.FileImages` store), classes as contiguous ranges of them, and the
group (alphabet, superclass) of every class."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .store import FileImages

__all__ = ["ImageClasses"]


@dataclass(frozen=True)
class ImageClasses:
    """Images ``[n_images, C, H, W]`` (uint8, ink/foreground high) grouped into classes.

    Class ``c`` owns ``images[class_start[c] : class_start[c] + class_count[c]]``. Subsets share
    the image storage and only re-index the classes. ``images`` is a uint8 tensor (memory
    storage) or a store that decodes on demand (lazy storage); :meth:`fetch` reads either.

    Fields: ``images``; ``class_start`` and ``class_count``, int64 ``[n_classes]``; ``class_names``,
    one name per class; ``class_group``, int64 ``[n_classes]``, every class's index into
    ``group_names``, the names of the groups (alphabets, superclasses). Frozen.

    >>> import torch
    >>> data = ImageClasses(torch.zeros(6, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 2, 4]),
    ...                     torch.tensor([2, 2, 2]), ("a1", "a2", "b1"), torch.tensor([0, 0, 1]), ("A", "B"))
    >>> data.n_classes, data.n_images, data.image_shape
    (3, 6, (1, 8, 8))
    >>> part = data.subset(data.classes_of_groups(["B"]))
    >>> part.class_names, part.group_names, part.class_start.tolist()
    (('b1',), ('B',), [4])
    """

    images: "torch.Tensor | FileImages"
    class_start: torch.Tensor  # int64 [n_classes]
    class_count: torch.Tensor  # int64 [n_classes]
    class_names: tuple[str, ...]
    class_group: torch.Tensor  # int64 [n_classes], index into group_names
    group_names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        """The number of classes."""
        return len(self.class_names)

    @property
    def n_images(self) -> int:
        """The number of images of the classes (a subset counts its own only)."""
        return int(self.class_count.sum())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def lazy(self) -> bool:
        """Whether images are decoded on demand (``data.storage: lazy``)."""
        return not isinstance(self.images, torch.Tensor)

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images at storage positions ``indices`` (decoded here when lazy)."""
        return self.images[indices]

    def image_indices(self) -> torch.Tensor:
        """Storage positions of every image of every class, class by class."""
        return torch.cat([torch.arange(s, s + c) for s, c in zip(self.class_start.tolist(), self.class_count.tolist())]) \
            if self.n_classes else torch.zeros(0, dtype=torch.long)

    def subset(self, class_ids) -> "ImageClasses":
        """The collection of the classes ``class_ids`` (indices, in the order given), sharing this
        one's image storage; only the groups those classes use are kept, renumbered."""
        ids = torch.as_tensor(class_ids, dtype=torch.long)
        groups_used = torch.unique(self.class_group[ids])
        remap = torch.full((len(self.group_names),), -1, dtype=torch.long)
        remap[groups_used] = torch.arange(len(groups_used))
        return ImageClasses(
            images=self.images,
            class_start=self.class_start[ids].clone(),
            class_count=self.class_count[ids].clone(),
            class_names=tuple(self.class_names[i] for i in ids.tolist()),
            class_group=remap[self.class_group[ids]],
            group_names=tuple(self.group_names[g] for g in groups_used.tolist()),
        )

    def groups(self) -> list[str]:
        """The group names, as a list."""
        return list(self.group_names)

    def classes_of_groups(self, names) -> list[int]:
        """The indices of the classes whose group is one of ``names`` (group names; an unknown one
        raises ``ValueError``), in class order."""
        wanted = {self.group_names.index(n) for n in names}
        return [c for c, g in enumerate(self.class_group.tolist()) if g in wanted]

    @staticmethod
    def concat(parts: list["ImageClasses"]) -> "ImageClasses":
        """Concatenate the collections ``parts`` into one (image storage is copied once; only the
        images of their classes are kept); groups are not merged, each part keeps its own. Lazily
        stored parts raise ``TypeError``."""
        images, starts, counts, names, groups, group_names = [], [], [], [], [], []
        offset = 0
        for p in parts:
            if p.lazy:
                raise TypeError("ImageClasses.concat needs images in memory")
            # compact each part's classes so subsets concatenate correctly
            idx = torch.cat([torch.arange(s, s + c) for s, c in zip(p.class_start.tolist(), p.class_count.tolist())])
            images.append(p.images[idx])
            starts.append(torch.cumsum(p.class_count, 0) - p.class_count + offset)
            counts.append(p.class_count)
            offset += int(p.class_count.sum())
            names.extend(p.class_names)
            base = len(group_names)
            group_names.extend(p.group_names)
            groups.append(p.class_group + base)
        return ImageClasses(
            images=torch.cat(images),
            class_start=torch.cat(starts),
            class_count=torch.cat(counts),
            class_names=tuple(names),
            class_group=torch.cat(groups),
            group_names=tuple(group_names),
        )

    # -- serialisation for the on-disk cache (plain numpy arrays, no pickle) ------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The collection as a dict of numpy arrays, one per field (for the on-disk cache; images in
        memory only, else ``TypeError``). :meth:`from_arrays` reverses it."""
        if self.lazy:
            raise TypeError("ImageClasses.to_arrays needs images in memory")
        return {
            "images": self.images.numpy(),
            "class_start": self.class_start.numpy(),
            "class_count": self.class_count.numpy(),
            "class_names": np.array(self.class_names, dtype=str),
            "class_group": self.class_group.numpy(),
            "group_names": np.array(self.group_names, dtype=str),
        }

    @staticmethod
    def from_arrays(a: dict[str, np.ndarray]) -> "ImageClasses":
        """The collection stored by :meth:`to_arrays` in ``a`` (images in memory)."""
        return ImageClasses(
            images=torch.from_numpy(np.ascontiguousarray(a["images"])),
            class_start=torch.from_numpy(a["class_start"].astype(np.int64)),
            class_count=torch.from_numpy(a["class_count"].astype(np.int64)),
            class_names=tuple(str(s) for s in a["class_names"].tolist()),
            class_group=torch.from_numpy(a["class_group"].astype(np.int64)),
            group_names=tuple(str(s) for s in a["group_names"].tolist()),
        )
