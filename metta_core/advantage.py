"""Advantage estimation (SPEC §2) and advantage normalization (SPEC §3).

Index convention (SPEC §1): tensors are ``[segments, horizon]``; ``rewards[:, t]`` and
``dones[:, t]`` belong to the transition that *led into* observation ``t``, so the reward that
followed the action at ``t`` is ``rewards[:, t+1]``: Sutton and Barto's ``r_{t+1}`` (the reward
that followed ``a_t``), which RLlib and TorchRL store at index ``t``. Column 0 of ``rewards`` and
``dones`` is never read, and the last column of the advantage is 0.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor

from metta_core.errors import MettaError
from metta_core.kernels.scan import advantage_scan

try:  # the compiled CPU kernel; numba is a dependency, but keep working without it
    import numba

    import numpy as np

    from metta_core.kernels import cpu as _advantage_cpu
except ImportError as exc:  # pragma: no cover - exercised by forcing the fallback in tests
    numba = None
    _advantage_cpu = None
    _NUMBA_IMPORT_ERROR: ImportError | None = exc
else:
    _NUMBA_IMPORT_ERROR = None

_warned_fallback = False

NORM_EPS = 1e-8
"""Added to the standard deviation in both normalization paths (SPEC §3)."""


def _check_advantage_inputs(values: Tensor, rewards: Tensor, dones: Tensor, ratio: Tensor) -> None:
    named = {"values": values, "rewards": rewards, "dones": dones, "importance_sampling_ratio": ratio}
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise MettaError(f"compute_advantage: {name} must be a torch.Tensor, got {type(x).__name__}")
    if values.dim() != 2:
        raise MettaError(
            f"compute_advantage: values must be [segments, horizon], got shape {tuple(values.shape)}; "
            f"reshape flat data to [segments, horizon] rows in time order"
        )
    for name, x in named.items():
        if x.shape != values.shape:
            raise MettaError(
                f"compute_advantage: {name} has shape {tuple(x.shape)} but values has "
                f"{tuple(values.shape)}; all four must be [segments, horizon]"
            )
        if x.device != values.device:
            raise MettaError(f"compute_advantage: {name} is on {x.device} but values is on {values.device}")
    for name in ("values", "rewards", "importance_sampling_ratio"):
        if named[name].dtype != torch.float32:
            raise MettaError(
                f"compute_advantage: {name} must be float32, got {named[name].dtype}; "
                f"convert with .float()"
            )
    if not (dones.dtype == torch.bool or dones.is_floating_point()):
        raise MettaError(f"compute_advantage: dones must be bool or float, got {dones.dtype}")


def _check_hyperparameters(gamma: float, gae_lambda: float, rho_clip: float, c_clip: float) -> None:
    for name, value, low, high in (("gamma", gamma, 0.0, 1.0), ("gae_lambda", gae_lambda, 0.0, 1.0)):
        if not low <= value <= high:
            raise MettaError(f"compute_advantage: {name} must be in [{low:g}, {high:g}], got {value!r}")
    for name, value in (("rho_clip", rho_clip), ("c_clip", c_clip)):
        if not value > 0:
            raise MettaError(f"compute_advantage: {name} must be > 0 (a V-trace truncation level), got {value!r}")


def flag_violation(dones: Tensor) -> Tensor:
    """``sum |d * (1 - d)|``: 0 when every flag is 0 or 1, positive otherwise, NaN for a NaN flag.

    A scalar to stack into a caller's one fused check (bool flags are always valid: 0).
    """
    if not dones.is_floating_point():
        return torch.zeros((), device=dones.device)
    d = dones.detach()
    return (d * (1 - d)).abs().sum()


def flag_problem(dones: Tensor, name: str, who: str) -> str | None:
    """The error message for terminal flags outside {0, 1} (or NaN), ``None`` if they are fine."""
    if not dones.is_floating_point():
        return None
    d = dones.detach()
    bad = ~((d == 0) | (d == 1))
    if not bool(bad.any()):
        return None
    examples = sorted({float(v) for v in d[bad].flatten()[:20].tolist()}, key=str)[:5]
    return (
        f"{who}: {name} holds {int(bad.sum())} value(s) that are not terminal flags (0 or 1), e.g. {examples}; "
        f"pass the env's terminated flags as 0/1 (or bool), e.g. {name} = terminated.float()"
    )


def _check_advantage_values(values: Tensor, rewards: Tensor, dones: Tensor, ratio: Tensor, out: Tensor) -> None:
    """One fused reduction over inputs and result; a per-tensor diagnosis only when it finds something."""
    named = {"values": values, "rewards": rewards, "importance_sampling_ratio": ratio}
    parts = [x.detach().sum() for x in named.values()]
    parts += [flag_violation(dones), (ratio.detach() < 0).sum().float(), out.sum()]
    summary = torch.stack(parts).tolist()
    if all(map(math.isfinite, summary)) and summary[-3] == 0 and summary[-2] == 0:
        return
    for name, x in named.items():
        if not bool(torch.isfinite(x).all()):
            raise MettaError(
                f"compute_advantage: {name} holds {int((~torch.isfinite(x)).sum())} non-finite value(s) (NaN or inf); "
                f"check the environment / network that produced {name}"
            )
    problem = flag_problem(dones, "dones", "compute_advantage")
    if problem:
        raise MettaError(problem)
    if summary[-2]:
        raise MettaError(
            f"compute_advantage: importance_sampling_ratio holds {int(summary[-2])} negative value(s); a ratio "
            f"pi/mu is >= 0: pass exp(new_logprob - old_logprob)"
        )
    if not bool(torch.isfinite(out).all()):
        raise MettaError(
            f"compute_advantage: the advantage overflows float32 although every input is finite (max |rewards| = "
            f"{float(rewards.abs().max()):.3g}, max |values| = {float(values.abs().max()):.3g}); scale the rewards "
            f"down (e.g. divide them by a constant) or check the environment"
        )


def _use_compiled(values: Tensor) -> bool:
    global _warned_fallback
    if values.device.type != "cpu":
        return False
    if _advantage_cpu is not None and os.environ.get("METTA_ADVANTAGE_BACKEND", "") != "torch":
        return True
    if _advantage_cpu is None and not _warned_fallback:
        warnings.warn(
            f"metta_core.advantage: numba is unavailable ({_NUMBA_IMPORT_ERROR}); using the pure-torch "
            f"scan on CPU, which is several times slower. Install numba to get the compiled kernel.",
            RuntimeWarning,
            stacklevel=4,
        )
        _warned_fallback = True
    return False


def _run_compiled(arrays: list[np.ndarray], scalars: list[float], out: np.ndarray) -> int:
    """The compiled kernel under the thread policy of ``metta_core.kernels.cpu.kernel_threads``;
    returns the kernel's value check (0: inputs valid and result finite).

    The budget is ``torch.get_num_threads()``; torch's setting is never changed: numba's OpenMP
    layer sets the process's OpenMP thread count to its own pool size when it starts (which is
    torch's count too when both use the same OpenMP runtime), so the budget is put back if it moved.
    """
    budget = torch.get_num_threads()
    segments, horizon = arrays[0].shape
    threads = _advantage_cpu.kernel_threads(segments, horizon, budget, numba.config.NUMBA_NUM_THREADS)
    args = (*arrays, *[np.float32(x) for x in scalars], out)
    if threads == 1:
        return _advantage_cpu.advantage_serial(*args)
    previous = numba.get_num_threads()  # the first call starts numba's threading layer
    numba.set_num_threads(threads)
    try:
        return _advantage_cpu.advantage_parallel(*args, threads)
    finally:
        numba.set_num_threads(previous)
        if torch.get_num_threads() != budget:
            torch.set_num_threads(budget)


@torch.no_grad()
def compute_advantage(
    values: Tensor,
    rewards: Tensor,
    dones: Tensor,
    importance_sampling_ratio: Tensor,
    *,
    gamma: float,
    gae_lambda: float,
    rho_clip: float = 1.0,
    c_clip: float = 1.0,
    check_values: bool = True,
) -> Tensor:
    """V-trace-clipped GAE ("puff advantage", SPEC §2); returns a new tensor, never tracks grad.

    All inputs are ``[segments, horizon]``, column ``t`` for times [0, horizon-1]: ``values[:, t]``
    is V(o_t), ``w`` (``importance_sampling_ratio``) the ratio of a_t, and ``rewards[:, t+1]`` /
    ``dones[:, t+1]`` are Sutton and Barto's ``r_{t+1}`` and terminal flag of the step after a_t
    (times [1, horizon-1] are read). With ``A[:, horizon-1] = 0`` and for ``t = horizon-2 … 0``::

        nnt   = 1 - dones[t+1]
        rho   = min(w[t], rho_clip);   c = min(w[t], c_clip)
        delta = rho * (rewards[t+1] + gamma * values[t+1] * nnt - values[t])
        A[t]  = delta + gamma * gae_lambda * c * nnt * A[t+1]

    With ``w == 1`` and clips >= 1 this is GAE(lambda) on rewards shifted by one column.
    CPU tensors use a compiled kernel (bit-identical to the sequential float32 loop) on at most
    ``torch.get_num_threads()`` threads, one below 64k elements (``metta_core.kernels.cpu``), into
    an output allocated by numpy (``torch.from_numpy``: it cannot be grown with ``resize_``);
    other devices (and CPU without numba, or ``METTA_ADVANTAGE_BACKEND=torch``) use a log-depth scan.

    Shapes, dtypes and hyperparameter ranges are always checked; with ``check_values`` (the
    default) also that the inputs are finite, ``dones`` are 0/1 flags, the ratio is >= 0 and the
    result did not overflow: inside the compiled kernel as it computes, otherwise (and for float64
    ``dones``, whose float32 copy could round a bad flag to 0 or 1) in one fused reduction; a
    failure is diagnosed by tensor. ``ppo_minibatch_loss`` passes ``False`` because it checks the
    same tensors in its own single reduction.
    """
    _check_advantage_inputs(values, rewards, dones, importance_sampling_ratio)
    _check_hyperparameters(gamma, gae_lambda, rho_clip, c_clip)
    if values.numel() == 0:
        return torch.zeros_like(values)
    out, problems = _advantage(values, rewards, dones.to(torch.float32), importance_sampling_ratio,
                               gamma, gae_lambda, rho_clip, c_clip)
    if check_values and (problems != 0 or dones.dtype == torch.float64):
        _check_advantage_values(values, rewards, dones, importance_sampling_ratio, out)
    return out


def _advantage(
    values: Tensor, rewards: Tensor, dones: Tensor, importance_sampling_ratio: Tensor,
    gamma: float, gae_lambda: float, rho_clip: float, c_clip: float,
) -> tuple[Tensor, int | None]:
    """The kernel call of ``compute_advantage`` (inputs already checked, ``dones`` float32):
    the advantage and the compiled kernel's value check (0: valid; ``None``: not checked)."""
    if _use_compiled(values):
        arrays = [x.detach().contiguous().numpy() for x in (values, rewards, dones, importance_sampling_ratio)]
        # numpy's allocator (malloc), not torch's (64-byte aligned): glibc returns a freed 1 MiB
        # chunk to the next malloc of that size, while aligned allocations of that size wander
        # through the heap, so a repeated call's output was in fresh, uncached memory
        out = np.empty(arrays[0].shape, np.float32)
        problems = _run_compiled(arrays, [gamma, gae_lambda, rho_clip, c_clip], out)
        return torch.from_numpy(out), problems
    return advantage_scan(
        values.detach(), rewards.detach(), dones, importance_sampling_ratio.detach(),
        gamma, gae_lambda, rho_clip, c_clip,
    ), None


def normalize_advantage(
    adv: Tensor,
    *,
    enabled: bool = True,
    mask: Tensor | None = None,
    group: "torch.distributed.ProcessGroup | None" = None,
) -> Tensor:
    """Metta's advantage normalization (SPEC §3); ``enabled=False`` returns ``adv`` unchanged.

    - Single process: ``(A - A.mean()) / (A.std() + 1e-8)``, Bessel-corrected ``std`` over all
      elements (over ``mask`` elements when a boolean ``mask`` is given).
    - ``torch.distributed`` initialized: one all-reduce of ``[sum, sum of squares, count]``;
      ``mean = sum/count``, ``var = sumsq/count - mean**2`` (population),
      ``std = sqrt(clamp(var, min=1e-8))``, result ``(A - mean) / (std + 1e-8)``. Every rank
      makes exactly one collective call, even with no valid element.

    Elements outside ``mask`` are returned as 0.
    """
    if not enabled:
        return adv
    if mask is not None:
        if mask.shape != adv.shape or mask.dtype != torch.bool:
            raise MettaError(
                f"normalize_advantage: mask must be a bool tensor of shape {tuple(adv.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        valid = adv[mask]
    else:
        valid = adv
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        stats = torch.stack(
            [valid.sum(), (valid * valid).sum(), torch.tensor(float(valid.numel()), device=adv.device)]
        ).to(adv.dtype)
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM, group=group)
        total, total_sq, count = stats
        if count.item() == 0:
            raise MettaError("normalize_advantage: no valid advantage element on any rank; check the loss mask")
        mean = total / count
        var = total_sq / count - mean**2
        std = torch.sqrt(var.clamp(min=1e-8))
    else:
        if valid.numel() < 2 and mask is not None:
            raise MettaError(
                f"normalize_advantage: the mask selects {valid.numel()} of {adv.numel()} elements, but the "
                f"standard deviation needs at least 2 elements; a minibatch needs at least 2 valid (mask True) "
                f"slots: check the loss mask, or set norm_adv=False"
            )
        if valid.numel() < 2:
            raise MettaError(
                f"normalize_advantage: the standard deviation needs at least 2 elements, got "
                f"{valid.numel()}; use a larger minibatch or set norm_adv=False"
            )
        mean, std = valid.mean(), valid.std()
    normalized = (adv - mean) / (std + NORM_EPS)
    if mask is not None:
        normalized = torch.where(mask, normalized, torch.zeros_like(normalized))
    return normalized
