"""Stored-state BPTT of Metta's recurrent agents (SPEC §6, Metta's ``LSTMReset``), written once.

Time index (SPEC §1): column ``t`` of a ``[rows, horizon]`` buffer row holds the input ``x_t``
(observation ``t``) and the flags ``dones[t]``, ``truncateds[t]`` of the transition that *led
into* ``x_t``. With ``reset_t = dones[t] or truncateds[t]`` and ``s_stored`` the input state the
rollout stored with column 0 (already zeroed by the rollout where ``reset_0``)::

    s_{-1}^out = s_stored                                  (detached: no gradient into it)
    s_t^in     = 0 if reset_t else s_{t-1}^out             t = 0 .. horizon-1
    (y_t, s_t^out) = cell(x_t, s_t^in)

Gradients flow through the whole row (``y_t`` depends on ``x_0 .. x_t`` back to the last reset).
The same rule, one column at a time, is what the rollout applies per agent
(``zero_where_reset`` on the state an agent left at ``t-1``).

A state is a tuple of ``[layers, rows, hidden]`` tensors: ``(h, c)`` for ``nn.LSTM``, ``(h,)``
for ``nn.GRU``. Cells are ``torch.nn.LSTM`` / ``torch.nn.GRU`` with ``batch_first=False``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metta_core.errors import MettaError

__all__ = ["RecurrentState", "init_lstm_like_metta", "state_size", "step_cell", "unroll", "zero_where_reset"]

RecurrentState = tuple[Tensor, ...]
"""``(h, c)`` of an LSTM or ``(h,)`` of a GRU, each ``[layers, rows, hidden]``."""


def state_size(cell: nn.RNNBase) -> int:
    """Number of tensors in the cell's state: 2 for ``nn.LSTM``, 1 for ``nn.GRU``."""
    if isinstance(cell, nn.LSTM):
        return 2
    if isinstance(cell, nn.GRU):
        return 1
    raise MettaError(f"recurrent cell must be torch.nn.LSTM or torch.nn.GRU, got {type(cell).__name__}")


def init_lstm_like_metta(cell: nn.RNNBase) -> None:
    """Metta's ``LSTMReset`` init (SPEC §6): every weight orthogonal with gain 1, every bias 1."""
    for name, param in cell.named_parameters():
        if "bias" in name:
            nn.init.constant_(param, 1.0)
        elif "weight" in name:
            nn.init.orthogonal_(param, 1.0)


def zero_where_reset(state: RecurrentState, reset: Tensor) -> RecurrentState:
    """``s^in = 0 if reset else s`` per row; ``reset`` is a ``[rows]`` bool tensor."""
    mask = reset.view(1, -1, 1)
    return tuple(s.masked_fill(mask, 0.0) for s in state)


def step_cell(cell: nn.RNNBase, x: Tensor, state: RecurrentState) -> tuple[Tensor, RecurrentState]:
    """Run ``cell`` over ``x`` (``[steps, rows, features]``) from ``state``, with no resets inside.

    Returns ``(y [steps, rows, hidden], state after the last step)``.
    """
    if len(state) == 2:
        y, (h, c) = cell(x, (state[0], state[1]))
        return y, (h, c)
    y, h = cell(x, state[0])
    return y, (h,)


def _check(cell: nn.RNNBase, x: Tensor, state: RecurrentState, resets: Tensor) -> None:
    if x.dim() != 3:
        raise MettaError(f"unroll: inputs must be [rows, horizon, features], got shape {tuple(x.shape)}")
    rows, horizon, features = x.shape
    if features != cell.input_size:
        raise MettaError(f"unroll: inputs have {features} features per step, the cell expects input_size={cell.input_size}")
    if resets.shape != (rows, horizon):
        raise MettaError(f"unroll: resets has shape {tuple(resets.shape)}, expected {(rows, horizon)} (the shape of the rows)")
    if len(state) != state_size(cell):
        raise MettaError(f"unroll: {type(cell).__name__} needs a state of {state_size(cell)} tensors, got {len(state)}")
    expected = (cell.num_layers, rows, cell.hidden_size)
    for i, s in enumerate(state):
        if tuple(s.shape) != expected:
            raise MettaError(
                f"unroll: state[{i}] has shape {tuple(s.shape)}, expected [layers, rows, hidden] = {expected}"
            )


def unroll(
    cell: nn.RNNBase, x: Tensor, stored_state: RecurrentState, resets: Tensor, *, fused: bool = True
) -> tuple[Tensor, RecurrentState]:
    """The training unroll of SPEC §6 over ``[rows, horizon]`` rows (formula in the module docstring).

    ``x``: ``[rows, horizon, features]`` inputs ``x_t`` for ``t`` in ``[0, horizon)``;
    ``stored_state``: the rollout's stored input state of column 0, each ``[layers, rows, hidden]``
    (detached here); ``resets``: ``[rows, horizon]`` bool, ``dones[t] or truncateds[t]``.
    Returns ``(y [rows, horizon, hidden], state after the last column)``.

    ``fused=False`` calls the cell once per column. ``fused=True`` cuts the horizon at the columns
    where any row resets and calls the cell once per piece; inside a piece no state is zeroed, so
    it is the same recursion (equal to float rounding; ``tests/core/test_recurrent.py`` checks it).
    """
    _check(cell, x, stored_state, resets)
    horizon = x.shape[1]
    state = tuple(s.detach() for s in stored_state)
    resets = resets.bool()
    x_tm = x.transpose(0, 1)  # [horizon, rows, features]
    if fused:
        later = torch.nonzero(resets[:, 1:].any(dim=0)).flatten().add_(1).tolist()
        bounds = [0, *later, horizon]
    else:
        bounds = list(range(horizon + 1))
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        state = zero_where_reset(state, resets[:, start])
        y, state = step_cell(cell, x_tm[start:end], state)
        pieces.append(y)
    y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    return y.transpose(0, 1), state
