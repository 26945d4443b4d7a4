"""Few-shot sinusoid regression (Finn et al., 2017, section 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]``; the support set has ``k_shots`` points, the query set ``n_queries``
points of the same curve. There is no finite dataset: training, validation and test tasks are
different seeded draws from the same family. Everything is generated in float32 on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..errors import DataError
from ..types import Task, TaskBatch
from .sampler import _check_shard
from .source import DataSourceConfig

__all__ = ["SinusoidConfig", "SinusoidEpisode", "SinusoidFamily", "SinusoidSampler"]


@dataclass(frozen=True)
class SinusoidFamily:
    """The family of sinusoid tasks: ``amplitude``, ``phase`` and ``x_range`` are the ``(min, max)``
    of the uniform distributions the amplitude, the phase and the inputs are drawn from (finite,
    ``min <= max``, else a :class:`~metafit.errors.DataError`). Frozen.

    >>> family = SinusoidFamily()
    >>> sampler = family.sampler(k_shots=5, n_queries=10, seed=0)
    >>> batch = sampler.sample(4)
    >>> tuple(batch.support_x.shape), tuple(batch.query_y.shape), batch.n_ways
    ((4, 5, 1), (4, 10, 1), 1)
    >>> [round(float(e.amplitude), 3) for e in sampler.fixed_episodes(3, seed=1)]
    [3.812, 1.469, 2.075]
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    def __post_init__(self) -> None:
        for name, (lo, hi) in (("amplitude", self.amplitude), ("phase", self.phase), ("x_range", self.x_range)):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise DataError(
                    f"Sinusoid: {name} must be a finite range with min <= max; got ({lo}, {hi}). "
                    "Swap or fix the bounds."
                )

    def sampler(self, k_shots: int, n_queries: int, seed: int = 0) -> "SinusoidSampler":
        """A :class:`SinusoidSampler` of this family's tasks with ``k_shots`` support and ``n_queries``
        query points, its random draws seeded by ``seed``."""
        return SinusoidSampler(self, k_shots, n_queries, seed)

    @staticmethod
    def curve(amplitude: torch.Tensor, phase: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The targets ``amplitude * sin(x - phase)`` (broadcast).

        >>> import torch
        >>> SinusoidFamily.curve(torch.tensor(2.0), torch.tensor(0.0), torch.tensor([0.0, math.pi / 2]))
        tensor([0., 2.])
        """
        return amplitude * torch.sin(x - phase)


@dataclass(frozen=True)
class SinusoidEpisode:
    """One drawn sinusoid task, without its targets (:meth:`SinusoidSampler.materialize` computes
    them): ``amplitude`` ``[1, 1]``, ``phase`` ``[1, 1]``, ``support_x`` ``[k_shots, 1]`` and ``query_x``
    ``[n_queries, 1]``."""

    amplitude: torch.Tensor  # [1, 1]
    phase: torch.Tensor  # [1, 1]
    support_x: torch.Tensor  # [k, 1]
    query_x: torch.Tensor  # [q, 1]


class SinusoidSampler:
    """Samples sinusoid tasks; same interface as the image :class:`EpisodeSampler`.

    ``family``: the :class:`SinusoidFamily` to draw from; ``k_shots``: support points per task;
    ``n_queries``: query points per task (both integers >= 1, else a
    :class:`~metafit.errors.DataError`); ``seed``: seeds the sampler's generator, so a given seed
    gives the same sequence of tasks. Tasks are :class:`~metafit.types.Task` with ``n_ways`` 1 and
    inputs and targets of shape ``[points, 1]``.
    """

    def __init__(self, family: SinusoidFamily, k_shots: int, n_queries: int, seed: int = 0) -> None:
        for name, v in (("k_shots", k_shots), ("n_queries", n_queries)):
            if not isinstance(v, int) or v < 1:
                raise DataError(f"Sinusoid: {name} must be an integer >= 1; got {v!r}. Fix the task settings.")
        self.family = family
        self.k_shots, self.n_queries = k_shots, n_queries
        self.generator = torch.Generator().manual_seed(int(seed))

    def get_state(self) -> torch.Tensor:
        """The state of the sampler's random generator (for checkpoints; see :meth:`set_state`)."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Restore the random generator to ``state``, from :meth:`get_state`, so sampling resumes exactly."""
        self.generator.set_state(state)

    def _uniform(self, lo_hi: tuple[float, float], *shape: int, generator: torch.Generator) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    def _draw(self, b: int, generator: torch.Generator):
        f = self.family
        amp = self._uniform(f.amplitude, b, 1, 1, generator=generator)
        phase = self._uniform(f.phase, b, 1, 1, generator=generator)
        xs = self._uniform(f.x_range, b, self.k_shots, 1, generator=generator)
        xq = self._uniform(f.x_range, b, self.n_queries, 1, generator=generator)
        return amp, phase, xs, xq

    def _batch(self, amp, phase, xs, xq) -> TaskBatch:
        curve = self.family.curve
        return TaskBatch(xs, curve(amp, phase, xs), xq, curve(amp, phase, xq), 1)

    def sample(self, meta_batch_size: int = 1, rank: int = 0, world_size: int = 1) -> TaskBatch:
        """``meta_batch_size`` tasks; with ``world_size`` ranks, rank's slice of the global batch
        (see :meth:`EpisodeSampler.sample`)."""
        _check_shard(rank, world_size)
        sl = slice(rank * meta_batch_size, (rank + 1) * meta_batch_size)
        return self._batch(*(t[sl] for t in self._draw(meta_batch_size * world_size, self.generator)))

    def sample_task(self) -> Task:
        """One new task (a :class:`Task`), drawn from the sampler's generator."""
        return self.sample(1)[0]

    def fixed_episodes(self, n: int, seed: int) -> list[SinusoidEpisode]:
        """``n`` tasks that depend only on ``seed`` (validation and test sets), as
        :class:`SinusoidEpisode`; the sampler's own generator is not used."""
        g = torch.Generator().manual_seed(int(seed))
        amp, phase, xs, xq = self._draw(n, g)
        return [SinusoidEpisode(amp[i], phase[i], xs[i], xq[i]) for i in range(n)]

    def materialize(self, episodes: list[SinusoidEpisode], augment: bool = False) -> TaskBatch:
        """The :class:`TaskBatch` of ``episodes`` (their targets computed); ``augment`` is accepted for
        the image samplers' interface and ignored."""
        stack = lambda name: torch.stack([getattr(e, name) for e in episodes])  # noqa: E731
        return self._batch(stack("amplitude"), stack("phase"), stack("support_x"), stack("query_x"))

    def tasks(self, episodes: list[SinusoidEpisode]):
        """One :class:`Task` per fixed episode of ``episodes``, in order (a generator)."""
        for e in episodes:
            yield self.materialize([e])[0]

    def close(self) -> None:
        """Nothing to stop (the image samplers' decoding workers)."""


class SinusoidConfig(DataSourceConfig):
    """``data.name: sinusoid``: few-shot regression of ``y = A sin(x - phase)``."""

    summary = "few-shot sinusoid regression (Finn et al. 2017), generated: no files needed"
    task_kind: ClassVar[str] = "regression"
    rotations: ClassVar[bool] = False
    name: Literal["sinusoid"] = "sinusoid"
    amplitude_min: float = Field(0.1, description="smallest amplitude")
    amplitude_max: float = Field(5.0, description="largest amplitude")
    phase_min: float = Field(0.0, description="smallest phase (radians)")
    phase_max: float = Field(3.141592653589793, description="largest phase (radians)")
    x_min: float = Field(-5.0, description="smallest input")
    x_max: float = Field(5.0, description="largest input")

    @model_validator(mode="after")
    def _ranges(self):
        for lo, hi in (("amplitude_min", "amplitude_max"), ("phase_min", "phase_max"), ("x_min", "x_max")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"{lo} must not exceed {hi}")
        return self

    @property
    def in_channels(self) -> int:
        return 1

    def sinusoid_family(self) -> SinusoidFamily:
        """The :class:`SinusoidFamily` of the config's ranges."""
        return SinusoidFamily((self.amplitude_min, self.amplitude_max), (self.phase_min, self.phase_max),
                              (self.x_min, self.x_max))

    def load_splits(self) -> dict[str, SinusoidFamily]:
        """The task family itself for every split: its splits differ by seed."""
        family = self.sinusoid_family()
        return {"train": family, "val": family, "test": family}
