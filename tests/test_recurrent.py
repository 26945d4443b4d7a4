"""Recurrent cores (metafit.nn.recurrent): LayerNormGRU against an independent float64 reference of
its equations, step/sequence agreement, gradients by gradcheck, and GRUCore against nn.GRU."""

from __future__ import annotations

import pytest
import torch

from metafit.errors import ConfigError
from metafit.nn.recurrent import GRUCore, LayerNormGRU, make_recurrent_core


def _reference_step(cell: LayerNormGRU, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The cell's equations written out gate by gate, with layer norm computed by hand."""
    H = cell.hidden_size

    def ln(y, gain, shift):  # normalise over the units of one gate (biased variance, eps 1e-5)
        mu = y.mean(-1, keepdim=True)
        var = ((y - mu) ** 2).mean(-1, keepdim=True)
        return (y - mu) / torch.sqrt(var + 1e-5) * gain + shift

    a = [ln(x @ cell.weight_ih[g * H:(g + 1) * H].T, cell.ln_ih_weight[g], cell.ln_ih_bias[g]) for g in range(3)]
    b = [ln(h @ cell.weight_hh[g * H:(g + 1) * H].T, cell.ln_hh_weight[g], cell.ln_hh_bias[g]) for g in range(3)]
    z = torch.sigmoid(a[0] + b[0])
    r = torch.sigmoid(a[1] + b[1])
    n = torch.relu(a[2] + r * b[2])
    return (1 - z) * h + z * n


def _perturbed(cell: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    with torch.no_grad():  # away from the initial gains/shifts, so every parameter matters
        g = torch.Generator().manual_seed(seed)
        for p in cell.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return cell


def test_layer_norm_gru_matches_reference_equations_float64():
    torch.manual_seed(0)
    cell = _perturbed(LayerNormGRU(5, 7).double())
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    h = torch.zeros(3, 7, dtype=torch.float64)
    states = cell.sequence(x)
    assert states.shape == (6, 3, 7)
    for t in range(6):
        h = _reference_step(cell, x[t], h)
        assert torch.allclose(states[t], h, atol=1e-12), t
        assert torch.allclose(cell.step(x[t], states[t - 1] if t else torch.zeros_like(h)), h, atol=1e-12)


def test_layer_norm_gru_initial_update_gate_keeps_the_state():
    cell = LayerNormGRU(4, 16)
    assert torch.equal(cell.ln_ih_bias[0], torch.full((16,), -1.0))  # z = sigmoid(-1) ~ 0.27 from a fresh state
    assert torch.equal(cell.ln_ih_bias[1:], torch.zeros(2, 16))
    w = cell.weight_hh.detach()
    for g in range(3):  # orthogonal recurrent blocks
        block = w[g * 16:(g + 1) * 16]
        assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)


def test_layer_norm_gru_gradcheck_float64():
    """Gradients of a whole sequence with respect to the inputs and every parameter."""
    torch.manual_seed(1)
    cell = _perturbed(LayerNormGRU(3, 4).double(), seed=1)
    names = [n for n, _ in cell.named_parameters()]
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True) for p in cell.parameters())

    def sequence(x, *values):
        return torch.func.functional_call(cell, dict(zip(names, values)), (x,), strict=True)

    assert torch.autograd.gradcheck(sequence, (x, *params), eps=1e-6, atol=1e-7)


def test_gru_core_is_torch_gru():
    torch.manual_seed(2)
    core = GRUCore(5, 6)
    ref = torch.nn.GRU(5, 6)
    ref.load_state_dict(core.state_dict())  # the same parameter names as nn.GRU
    x = torch.randn(7, 3, 5)
    assert torch.allclose(core.sequence(x), ref(x)[0], atol=1e-6)
    cell = torch.nn.GRUCell(5, 6)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in core.state_dict().items()})
    h = torch.randn(3, 6)
    assert torch.allclose(core.step(x[0], h), cell(x[0], h), atol=1e-6)


def test_make_recurrent_core_names_the_choices():
    assert isinstance(make_recurrent_core("gru", 3, 4), GRUCore)
    assert isinstance(make_recurrent_core("ln-gru", 3, 4), LayerNormGRU)
    with pytest.raises(ConfigError, match=r"cell must be one of 'gru' or 'ln-gru'; got 'lstm'\. Choose"):
        make_recurrent_core("lstm", 3, 4)
