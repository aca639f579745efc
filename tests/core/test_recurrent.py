"""metta_core.recurrent: the SPEC §6 unroll against a slow per-step reference written from the
LSTM/GRU equations (float64, one row and one step at a time)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metta_core.errors import MettaError
from metta_core.recurrent import init_lstm_like_metta, unroll, zero_where_reset


def reference_unroll(cell, x, stored, resets):
    """Slow SPEC §6 reference: per row, per column: zero the state if reset, then one step of the
    textbook LSTM/GRU equations in float64 with the cell's weights."""
    p = {name: w.detach().double() for name, w in cell.named_parameters()}
    lstm = isinstance(cell, nn.LSTM)
    rows, horizon, _ = x.shape
    out = torch.zeros(rows, horizon, cell.hidden_size, dtype=torch.float64)
    for r in range(rows):
        h = [stored[0][k, r].double() for k in range(cell.num_layers)]
        c = [stored[1][k, r].double() for k in range(cell.num_layers)] if lstm else None
        for t in range(horizon):
            if resets[r, t]:
                h = [torch.zeros_like(v) for v in h]
                c = [torch.zeros_like(v) for v in c] if lstm else None
            inp = x[r, t].double()
            for k in range(cell.num_layers):
                gi = p[f"weight_ih_l{k}"] @ inp + p[f"bias_ih_l{k}"]
                gh = p[f"weight_hh_l{k}"] @ h[k] + p[f"bias_hh_l{k}"]
                if lstm:
                    i, f, g, o = (gi + gh).chunk(4)
                    c[k] = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
                    h[k] = torch.sigmoid(o) * torch.tanh(c[k])
                else:
                    ir, iz, inn = gi.chunk(3)
                    hr, hz, hn = gh.chunk(3)
                    rr, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                    n = torch.tanh(inn + rr * hn)
                    h[k] = (1 - z) * n + z * h[k]
                inp = h[k]
            out[r, t] = inp
    return out


PATTERNS = ["none", "column 0", "mid-row", "every column", "random"]


def make_resets(pattern, rows, horizon, gen):
    resets = torch.zeros(rows, horizon, dtype=torch.bool)
    if pattern == "column 0":
        resets[:, 0] = True
    elif pattern == "mid-row":
        resets[0, horizon // 2] = True
    elif pattern == "every column":
        resets[:] = True
    elif pattern == "random":
        resets = torch.rand(rows, horizon, generator=gen) < 0.3
    return resets


def make_case(kind, rows, horizon, layers, hidden, features, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cell = (nn.LSTM if kind == "lstm" else nn.GRU)(features, hidden, layers)
    x = torch.randn(rows, horizon, features, generator=gen)
    n_state = 2 if kind == "lstm" else 1
    stored = tuple(torch.randn(layers, rows, hidden, generator=gen) for _ in range(n_state))
    return cell, x, stored, gen


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["lstm", "gru"]),
    pattern=st.sampled_from(PATTERNS),
    rows=st.integers(1, 4),
    horizon=st.integers(1, 7),
    layers=st.integers(1, 2),
    hidden=st.integers(1, 5),
    features=st.integers(1, 4),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unroll_matches_the_per_step_reference(kind, pattern, rows, horizon, layers, hidden, features, fused, seed):
    cell, x, stored, gen = make_case(kind, rows, horizon, layers, hidden, features, seed)
    resets = make_resets(pattern, rows, horizon, gen)
    y, _ = unroll(cell, x, stored, resets, fused=fused)
    assert y.shape == (rows, horizon, hidden)
    torch.testing.assert_close(y.double(), reference_unroll(cell, x, stored, resets), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["lstm", "gru"]), pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2**16))
def test_fused_path_equals_per_column_path_with_gradients(kind, pattern, seed):
    cell, x, stored, gen = make_case(kind, 3, 9, 2, 6, 4, seed)
    resets = make_resets(pattern, 3, 9, gen)
    results = []
    for fused in (False, True):
        cell.zero_grad()
        xg = x.clone().requires_grad_(True)
        y, final = unroll(cell, xg, stored, resets, fused=fused)
        (y.square().sum() + sum(s.sum() for s in final)).backward()
        results.append((y.detach(), xg.grad, [p.grad.clone() for p in cell.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_gradients_flow_through_the_row_back_to_the_last_reset_and_not_into_the_stored_state(fused):
    cell, x, stored, _ = make_case("lstm", 2, 6, 1, 3, 2, 0)
    stored = tuple(s.requires_grad_(True) for s in stored)
    resets = torch.zeros(2, 6, dtype=torch.bool)
    resets[1, 3] = True  # row 1 restarts at column 3
    x.requires_grad_(True)
    y, _ = unroll(cell, x, stored, resets, fused=fused)
    y[:, -1].sum().backward()
    assert all(s.grad is None for s in stored)
    assert x.grad[0].abs().sum(dim=-1).gt(0).all()  # row 0: every column feeds the last output
    assert x.grad[1, :3].abs().sum() == 0 and x.grad[1, 3:].abs().sum(dim=-1).gt(0).all()


def test_stored_state_is_used_unless_column_0_resets():
    cell, x, stored, _ = make_case("gru", 2, 3, 1, 4, 2, 1)
    resets = torch.zeros(2, 3, dtype=torch.bool)
    resets[1, 0] = True
    zeros = tuple(torch.zeros_like(s) for s in stored)
    y_stored, _ = unroll(cell, x, stored, resets)
    y_zero, _ = unroll(cell, x, zeros, resets)
    assert not torch.allclose(y_stored[0], y_zero[0])
    torch.testing.assert_close(y_stored[1], y_zero[1])


def test_zero_where_reset_zeroes_only_the_flagged_rows():
    state = (torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0))
    h, c = zero_where_reset(state, torch.tensor([False, True, False]))
    assert h[:, 1].abs().sum() == 0 and c[:, 1].abs().sum() == 0
    assert (h[:, [0, 2]] == 1).all() and (c[:, [0, 2]] == 2).all()


def test_metta_init_is_orthogonal_weights_and_unit_biases():
    cell = nn.LSTM(5, 4, 2)
    init_lstm_like_metta(cell)
    for name, p in cell.named_parameters():
        if "bias" in name:
            assert (p == 1).all()
        else:  # [4*hidden, in] with orthonormal columns (rows > columns)
            torch.testing.assert_close(p.T @ p, torch.eye(p.shape[1]), atol=1e-5, rtol=0)


def test_bad_shapes_name_what_was_expected():
    cell, x, stored, _ = make_case("lstm", 2, 4, 1, 3, 2, 0)
    resets = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(MettaError, match=r"state\[0\] has shape \(1, 3, 3\), expected \[layers, rows, hidden\] = \(1, 2, 3\)"):
        unroll(cell, x, (torch.zeros(1, 3, 3), stored[1]), resets)
    with pytest.raises(MettaError, match=r"LSTM needs a state of 2 tensors, got 1"):
        unroll(cell, x, stored[:1], resets)
    with pytest.raises(MettaError, match=r"resets has shape \(2, 3\), expected \(2, 4\)"):
        unroll(cell, x, stored, resets[:, :3])
    with pytest.raises(MettaError, match=r"3 features per step, the cell expects input_size=2"):
        unroll(cell, torch.zeros(2, 4, 3), stored, resets)
