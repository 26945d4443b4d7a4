"""A worked example of adding a dataset: one file, plus one line in ``DATASETS``
(``metafit/data/__init__.py``: ``"toy_blocks": ToyBlocksConfig``).

Every class is a random blocky binary pattern; its images are noisy copies. The classes are
split into disjoint training, validation and test classes, as every metafit source is.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from metafit.data import ImageClasses
from metafit.data.source import ImageSourceConfig


class ToyBlocksConfig(ImageSourceConfig):
    name: Literal["toy_blocks"] = "toy_blocks"
    summary: ClassVar[str] = "random blocky patterns with pixel noise (a worked example of a data source)"
    image_size: int = Field(16, ge=8, le=64, description="images are size x size")
    n_classes: int = Field(30, ge=6, le=1000, description="classes in all (split 60/20/20)")
    per_class: int = Field(10, ge=2, le=100, description="images per class")
    noise: float = Field(0.15, ge=0.0, le=0.5, description="probability that a pixel is flipped")
    seed: int = Field(0, ge=0, description="which patterns")

    @property
    def in_channels(self) -> int:
        return 1

    def load_splits(self) -> dict[str, ImageClasses]:
        g = torch.Generator().manual_seed(self.seed)
        size, n = self.image_size, self.n_classes
        coarse = (torch.rand(n, 1, 4, 4, generator=g) > 0.5).float()
        patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
        flips = torch.rand(n, self.per_class, 1, size, size, generator=g) < self.noise
        images = (((patterns[:, None] + flips.float()) % 2).flatten(0, 1) * 255).to(torch.uint8)
        data = ImageClasses(images=images, class_start=torch.arange(n) * self.per_class,
                            class_count=torch.full((n,), self.per_class),
                            class_names=tuple(f"pattern{c:03d}" for c in range(n)),
                            class_group=torch.zeros(n, dtype=torch.long), group_names=("patterns",))
        n_train, n_val = int(0.6 * n), int(0.2 * n)
        ids = list(range(n))
        return {"train": data.subset(ids[:n_train]), "val": data.subset(ids[n_train:n_train + n_val]),
                "test": data.subset(ids[n_train + n_val:])}
