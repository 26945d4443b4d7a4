"""Evaluation of many episodes at once for learners whose predictions come from per-image
embeddings (ProtoNet, the SVM and ridge heads, transfer's frozen-feature heads).

The fixed episodes of an evaluation draw their images from one split, again and again: 1,000
20-way 1-shot Omniglot episodes with 15 queries show 320,000 images but only the split's few
thousand distinct ones. In eval mode such a learner's task logits depend on each image only
through its embedding (BatchNorm uses its running statistics), so every distinct image (with its
rotation) is embedded once, in large batches, and the head of every episode runs on the cached
embeddings, many episodes at a time. The numbers equal the one-episode-at-a-time path up to the
float rounding of convolutions over differently sized batches (``tests/test_embedded_eval.py``).

A learner takes part when its ``embeds_per_image()`` is true (see
:class:`~metafit.algorithms.Algorithm`); the path also checks, on two real images, that the
backbone's output for an image does not depend on the rest of its batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..algorithms import Algorithm
from ..data import EpisodeSampler
from ..types import Task

__all__ = ["EMBED_BATCH", "EPISODE_CHUNK", "embedded_logits", "episode_task", "supports_embedding"]

#: distinct images embedded per backbone call, by device type: on a CPU small batches keep a
#: convolution's activations in cache (Conv4 on 28 x 28 Omniglot, 2-core EPYC: 0.085 ms per image
#: in batches of 32, 0.42 ms in batches of 512)
EMBED_BATCH = {"cpu": 32, "cuda": 512}
#: episodes whose heads run together
EPISODE_CHUNK = 64


def supports_embedding(model: Algorithm, sampler: EpisodeSampler, inner_steps: int | None) -> bool:
    """Whether ``model`` can be evaluated on ``sampler``'s episodes through cached per-image
    embeddings (see the module docstring); ``inner_steps`` (an adaptation override) rules it out."""
    return (inner_steps is None and callable(getattr(model, "embeds_per_image", None)) and model.embeds_per_image()
            and getattr(model, "task_kind", "classification") == "classification"
            and isinstance(sampler, EpisodeSampler))


def _images(sampler: EpisodeSampler, keys: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] of ``keys`` (storage index * n_rot + rotation), rotated as episodes show them."""
    n_rot = sampler.n_rot
    x = sampler.data.fetch(keys // n_rot).float().div_(255.0)
    if n_rot > 1:
        rot = keys % n_rot
        for r in (1, 2, 3):
            sel = torch.nonzero(rot == r).flatten()
            if len(sel):
                x[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return x


def _batch_independent(model: Algorithm, x: torch.Tensor) -> bool:
    """Whether the embedding of an image is the same alone and in a batch (no batch statistics)."""
    if len(x) < 2:
        return True
    together = model.embed_images(x[:2])
    alone = torch.cat([model.embed_images(x[:1]), model.embed_images(x[1:2])])
    return bool(torch.allclose(together, alone, rtol=1e-4, atol=1e-5))


@torch.no_grad()
def embedded_logits(model: Algorithm, sampler: EpisodeSampler, episodes: list, device: torch.device | str,
                    channels_last: bool = False) -> Callable[[], tuple[torch.Tensor, torch.Tensor]] | None:
    """A function yielding ``(query_logits [E, n_ways * q, n_ways], query_y [E, n_ways * q])`` chunks
    for ``episodes`` of ``sampler`` in order, computed on ``device`` from cached embeddings (images in
    ``channels_last`` format if asked); None where the backbone turns out to use batch statistics
    (the caller then evaluates one episode at a time). ``model`` must be in eval mode."""
    classes = torch.stack([e.classes for e in episodes])  # [B, n]
    index = sampler.image_indices(episodes)  # [B, n, k + q] storage positions
    keys = index * sampler.n_rot + (classes % sampler.n_rot).unsqueeze(-1)
    distinct, where = torch.unique(keys.flatten(), return_inverse=True)
    probe = _images(sampler, distinct[:2]).to(device)
    if not _batch_independent(model, probe):
        return None
    parts = []
    step = EMBED_BATCH.get(torch.device(device).type, 512)
    for start in range(0, len(distinct), step):
        x = _images(sampler, distinct[start:start + step]).to(device)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        parts.append(model.embed_images(x))
    table = torch.cat(parts)  # [distinct, d]
    b, n, m = index.shape
    k = sampler.k_shots
    labels = torch.arange(n, device=table.device)
    sy = labels.repeat_interleave(k)
    qy = labels.repeat_interleave(m - k)

    def chunks():
        for start in range(0, b, EPISODE_CHUNK):
            emb = table[where.view(b, n, m)[start:start + EPISODE_CHUNK].to(table.device)]  # [E, n, m, d]
            e = emb.shape[0]
            support = emb[:, :, :k].flatten(1, 2)
            query = emb[:, :, k:].flatten(1, 2)
            logits = model.head_logits(support, sy.expand(e, -1), query, n)
            yield logits, qy.expand(e, -1)

    return chunks


def episode_task(sampler: EpisodeSampler, episode) -> Task:
    """The :class:`Task` of one episode (its images), as the one-at-a-time path shows it."""
    return sampler.materialize([episode])[0]
