"""Pure-torch advantage kernel: a log-depth parallel scan, for CUDA and as the CPU fallback."""

from __future__ import annotations

import torch
from torch import Tensor


def reverse_linear_recurrence(x: Tensor, k: Tensor) -> Tensor:
    """Solve ``y[:, t] = x[:, t] + k[:, t] * y[:, t+1]`` with ``y[:, n] = 0`` for all ``t < n``.

    Hillis-Steele doubling over the time axis (dim 1): after the step with offset ``o``,
    ``y[t]`` holds the sum over ``j in [t, t+2o)`` of ``x[j] * prod(k[t:j])`` and ``k[t]`` the
    product ``prod(k[t:t+2o])``. ``ceil(log2(n))`` steps of whole-tensor ops, no per-step
    Python loop over time; rounding differs from the sequential loop by a few ulp.
    """
    y, k = x.clone(), k.clone()
    n = y.shape[1]
    offset = 1
    while offset < n:
        y_next = y.clone()
        y_next[:, : n - offset] += k[:, : n - offset] * y[:, offset:]
        k_next = k.clone()
        k_next[:, : n - offset] *= k[:, offset:]
        k_next[:, n - offset :] = 0.0  # beyond the row's end the recursion is cut
        y, k = y_next, k_next
        offset *= 2
    return y


def advantage_scan(
    values: Tensor,
    rewards: Tensor,
    dones: Tensor,
    ratio: Tensor,
    gamma: float,
    gae_lambda: float,
    rho_clip: float,
    c_clip: float,
) -> Tensor:
    """SPEC §2 on ``[segments, horizon]`` float32 tensors, vectorized over rows and time.

    For ``t < horizon - 1``::

        nnt[t]   = 1 - dones[t+1]
        delta[t] = min(w[t], rho_clip) * (rewards[t+1] + gamma * values[t+1] * nnt[t] - values[t])
        A[t]     = delta[t] + gamma * gae_lambda * min(w[t], c_clip) * nnt[t] * A[t+1]

    and ``A[horizon-1] = 0``.
    """
    nnt = 1.0 - dones[:, 1:]
    w = ratio[:, :-1]
    delta = w.clamp(max=rho_clip) * (rewards[:, 1:] + gamma * values[:, 1:] * nnt - values[:, :-1])
    coef = gamma * gae_lambda * w.clamp(max=c_clip) * nnt
    advantages = torch.zeros_like(values)
    advantages[:, :-1] = reverse_linear_recurrence(delta, coef)
    return advantages
