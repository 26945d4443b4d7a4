"""Recurrent cores for memory-based meta-RL (RL²): torch's GRU, and a layer-normalised GRU.

Both expose the same two calls, so a learner steps them one step at a time while it collects
experience and recomputes whole sequences during its update:

- ``step(x, h) -> h'`` with ``x [N, input_size]`` and ``h [N, hidden_size]``;
- ``sequence(x) -> states`` with ``x [T, N, input_size]`` from a zero initial state, states
  ``[T, N, hidden_size]``.

:class:`LayerNormGRU` is a GRU in which each gate's input projection and recurrent projection are
layer-normalised separately (Ba et al. 2016, "Layer normalization", section 3.2 applies it to
recurrent networks this way), the candidate state uses a ReLU instead of tanh, the reset gate
scales the recurrent part of the candidate (``n = relu(x_n + r * h_n)``, the cuDNN placement)
and the update gate starts biased towards keeping the state (its input-side shift is initialised
to ``-update_bias``; with ``h' = (1 - z) h + z n``, ``z = sigmoid(-1) = 0.27`` at the start).
This is the cell the RL² replication lucaslingle/pytorch_rl2 trains on tabular MDPs: the ReLU
candidate does not saturate, so sums of rewards can be held without squashing, and the
normalisation keeps the recurrence well scaled over the hundreds of steps of a trial.
It runs as a Python loop over time (about 2.7x the cost of ``nn.GRU``'s fused kernels per
forward+backward pass on a CPU); the input projections of a whole sequence are computed at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, constraint_message

__all__ = ["GRUCore", "LayerNormGRU", "make_recurrent_core"]


class GRUCore(nn.GRU):
    """``nn.GRU`` (one layer) with the ``step`` / ``sequence`` calls. Its parameters keep
    ``nn.GRU``'s names (``weight_ih_l0``, ...), so state dicts of a plain ``nn.GRU`` load."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)

    def step(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One step with these weights (what ``nn.GRUCell`` computes)."""
        return torch.gru_cell(x, h, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0)

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self(x)
        return out


class LayerNormGRU(nn.Module):
    """A layer-normalised GRU with a ReLU candidate (see the module docstring).

    Gates, for input ``x`` and state ``h`` (``LN`` normalises over the hidden units of one gate,
    then applies that gate's own gain and shift; ``[.]_g`` is gate ``g``'s block)::

        a = LN_x(W_x x),  b = LN_h(W_h h)          # [3, hidden]: update z, reset r, candidate n
        z = sigmoid(a_z + b_z),  r = sigmoid(a_r + b_r)
        n = relu(a_n + r * b_n)
        h' = (1 - z) * h + z * n
    """

    def __init__(self, input_size: int, hidden_size: int, update_bias: float = 1.0) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * H, H))
        self.ln_ih_weight = nn.Parameter(torch.ones(3, H))
        self.ln_ih_bias = nn.Parameter(torch.zeros(3, H))
        self.ln_hh_weight = nn.Parameter(torch.ones(3, H))
        self.ln_hh_bias = nn.Parameter(torch.zeros(3, H))
        with torch.no_grad():
            nn.init.xavier_normal_(self.weight_ih)
            for g in range(3):  # each recurrent block orthogonal: norm-preserving at the start
                nn.init.orthogonal_(self.weight_hh[g * H:(g + 1) * H])
            self.ln_ih_bias[0].fill_(-float(update_bias))

    def _norm(self, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = y.unflatten(-1, (3, self.hidden_size))
        return F.layer_norm(y, (self.hidden_size,)) * weight + bias

    def project_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``LN_x(W_x x)`` of shape ``[..., 3, hidden]``: computed once for a whole sequence."""
        return self._norm(F.linear(x, self.weight_ih), self.ln_ih_weight, self.ln_ih_bias)

    def _step_projected(self, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        b = self._norm(F.linear(h, self.weight_hh), self.ln_hh_weight, self.ln_hh_bias)
        zr = torch.sigmoid(a[..., :2, :] + b[..., :2, :])
        n = torch.relu(a[..., 2, :] + zr[..., 1, :] * b[..., 2, :])
        return torch.lerp(h, n, zr[..., 0, :])  # (1 - z) h + z n

    def step(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self._step_projected(self.project_inputs(x), h)

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        a = self.project_inputs(x)
        h = x.new_zeros(x.shape[1], self.hidden_size)
        states = []
        for t in range(x.shape[0]):
            h = self._step_projected(a[t], h)
            states.append(h)
        return torch.stack(states)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The states of ``sequence(x)``."""
        return self.sequence(x)


def make_recurrent_core(cell: str, input_size: int, hidden_size: int) -> nn.Module:
    """``"gru"``: :class:`GRUCore`; ``"ln-gru"``: :class:`LayerNormGRU`."""
    if cell == "gru":
        return GRUCore(input_size, hidden_size)
    if cell == "ln-gru":
        return LayerNormGRU(input_size, hidden_size)
    raise ConfigError(constraint_message("recurrent core", "cell", "one of 'gru' or 'ln-gru'", cell,
                                         "Choose one of the listed cells."))
