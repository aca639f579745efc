"""TorchRL ``[B, T]`` trajectories to Metta's ``[segments, horizon]`` layout (SPEC §1).

TorchRL stores the reward and terminal flag of a transition at the index of the action that
caused it: ``("next", "reward")[:, t]`` follows ``action[:, t]``. Metta stores them with the
observation they led into: ``rewards[:, t+1]``. So, per row::

    metta.rewards[:, t+1] = torchrl ("next", reward)[:, t]       for t = 0 … T-2
    metta.dones[:, t+1]   = torchrl ("next", terminated)[:, t]
    metta.rewards[:, 0] = metta.dones[:, 0] = 0                    (never read)

The last step's reward and flag have no column: the last advantage of a row is 0 (SPEC §2).
Only the *terminal* flag is used; truncation is ignored and the recursion bootstraps from the
next column (the new episode's first observation), as Metta does.

Only layout lives here: no RL formula.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor
from torch.nn.functional import pad

from metta_core.advantage import flag_problem, flag_violation
from metta_core.errors import MettaError

TIME_DIM_NAME = "time"
"""The tensordict dimension name TorchRL collectors give the time axis."""


COLLECTOR_MASK = ("collector", "mask")
"""Where TorchRL's collectors mark real (True) and padding (False) steps of split trajectories."""


def check_batch_time(td: TensorDictBase, who: str, *, groups_allowed: bool = False) -> None:
    """Check that ``td`` is laid out ``[B, T]`` with time last; raise a ``MettaError`` otherwise.

    Time is the dimension named ``"time"`` when the tensordict has names, else the last batch
    dimension (TorchRL's convention). The checks refuse, rather than guess:

    - a batch with other than 2 batch dims (``[T]`` or ``[B1, B2, T]`` are ambiguous rows);
    - names that do not mark exactly one ``"time"`` dim;
    - a ``"time"`` dim that is not the last one (a ``[T, B]`` batch);
    - padding steps: a ``("collector", "mask")`` entry (``split_trajs=True``) with a False value;
    - unless ``groups_allowed`` (callers that fold them with ``as_rows``), agent groups.
    """
    if td.batch_dims != 2:
        raise MettaError(
            f"{who}: expected a [B, T] tensordict (rows of consecutive steps, time last), got "
            f"batch_size {tuple(td.batch_size)}; for one trajectory use td.unsqueeze(0), for more "
            f"batch dims use td.reshape(-1, T)"
        )
    if td._has_names():
        names = list(td.names)
        if names.count(TIME_DIM_NAME) != 1:
            raise MettaError(
                f"{who}: the tensordict has dim names {names} but no single {TIME_DIM_NAME!r} dim, so "
                f"the time axis is ambiguous; name it with td.refine_names(None, {TIME_DIM_NAME!r}) "
                f"(for [B, T]) or clear the names with td.names = None"
            )
        if names.index(TIME_DIM_NAME) != 1:
            raise MettaError(
                f"{who}: the dim names {names} put {TIME_DIM_NAME!r} first: this is a [T, B] batch of "
                f"shape {tuple(td.batch_size)}, but Metta's loss reads rows [B, T]; pass td.transpose(0, 1)"
            )
    if td.batch_size.numel() == 0:
        raise MettaError(
            f"{who}: empty batch (batch_size {tuple(td.batch_size)}); collect at least one step per row"
        )
    if not groups_allowed and agent_groups(td):
        raise MettaError(
            f"{who}: the batch holds agent groups ({_describe(agent_groups(td))}) of TorchRL's multi-agent layout "
            f"[B, T, agents]; this call reads rows [B, T]: fold them first with "
            f"bridges.torchrl.as_rows(td, who) (MettaPPOLoss and MettaSegmentSampler do it themselves)"
        )
    mask = td.get(COLLECTOR_MASK, None)
    if mask is not None and not bool(mask.all()):
        raise MettaError(
            f"{who}: {COLLECTOR_MASK!r} marks {int((~mask.bool()).sum())} padding step(s); Metta's rows are "
            f"consecutive real steps (SPEC §1), so padded trajectories would be trained on: collect with "
            f"split_trajs=False and cut each env's steps into rows with data.reshape(-1, bptt_horizon)"
        )


AGENT_DIM = 2
"""An agent group's sub-tensordict is ``[B, T, agents]``: the agent dim follows the ``[B, T]`` batch."""
FLAG_NAMES = ("done", "terminated", "truncated")
"""Terminal flags a group may hold per agent next to the shared ones (under ``"next"``)."""
AGENT_MASK = "mask"
"""Where TorchRL's multi-agent envs (``PettingZooWrapper``) mark active (True) agents of a group."""


def agent_groups(td: TensorDictBase) -> dict[NestedKey, int]:
    """The agent groups of a ``[B, T]`` tensordict: every sub-tensordict (at any depth, e.g.
    ``"agents"`` and ``("next", "agents")``) whose batch is ``[B, T, agents]``, with its agent count."""
    groups: dict[NestedKey, int] = {}
    for key, value in td.items(include_nested=True):
        if isinstance(value, TensorDictBase) and value.batch_dims == td.batch_dims + 1:
            if not any(_within(key, group) for group in groups):
                groups[key] = int(value.batch_size[AGENT_DIM])
    return groups


def _within(key: NestedKey, group: NestedKey) -> bool:
    key, group = _as_tuple(key), _as_tuple(group)
    return key[: len(group)] == group


def _as_tuple(key: NestedKey) -> tuple[str, ...]:
    return key if isinstance(key, tuple) else (key,)


def as_rows(td: TensorDictBase, who: str) -> TensorDictBase:
    """``td`` checked as ``[B, T]`` (``check_batch_time``) and, if it holds agent groups (TorchRL's
    multi-agent layout, ``("agents", key)`` entries of batch ``[B, T, A]``), folded into
    ``[B * A, T]`` rows in SPEC §1 order: row ``b * A + a`` is agent ``a`` of row ``b``.

    Group entries keep their keys (``("agents", "observation")`` stays the actor's input key);
    shared entries (``("next", "done")``, ``"collector"``) are repeated for each agent. Refused with
    a ``MettaError``: groups with different agent counts, a group's ``mask`` marking an inactive
    agent, and per-agent terminal flags that disagree with the shared ones (an agent whose episode
    ends apart from its env's: its row would continue with steps it did not take).
    A tensordict without groups is returned as it is.
    """
    check_batch_time(td, who, groups_allowed=True)
    groups = agent_groups(td)
    if not groups:
        return td
    counts = set(groups.values())
    if len(counts) > 1:
        raise MettaError(
            f"{who}: the agent groups have different agent counts ({_describe(groups)}); Metta folds one group "
            f"layout [B, T, agents] into rows, so every group must have the same agents: train each group with "
            f"its own loss on td.exclude(<the other groups>)"
        )
    (agents,) = counts
    b, t = td.batch_size
    for group in groups:
        _check_active(td, group, who)
    folded = TensorDict({}, batch_size=[b * agents, t], device=td.device)
    for key, x in td.items(include_nested=True, leaves_only=True):
        if any(_within(key, group) for group in groups):
            x = x.movedim(AGENT_DIM, 1).reshape(b * agents, t, *x.shape[AGENT_DIM + 1:])
        else:
            x = x.repeat_interleave(agents, dim=0)
        folded.set(key, x)
    if td._has_names():
        folded.names = [None, TIME_DIM_NAME]
    for group in groups:
        _check_flags_agree(folded, group, who)
    return folded


def _describe(groups: dict[NestedKey, int]) -> str:
    return ", ".join(f"{key!r}: {count} agents" for key, count in groups.items())


def _check_active(td: TensorDictBase, group: NestedKey, who: str) -> None:
    mask = td.get((*_as_tuple(group), AGENT_MASK), None)
    if mask is not None and not bool(mask.all()):
        raise MettaError(
            f"{who}: {(*_as_tuple(group), AGENT_MASK)!r} marks {int((~mask.bool()).sum())} inactive agent-step(s); "
            f"Metta's rows are each agent's consecutive real steps (SPEC §1), so an agent that left its episode "
            f"early would be trained on padding: use an env whose agents all act until the episode ends (MettaGrid, "
            f"VMAS), or drop those agents' steps yourself before training"
        )


def _check_flags_agree(folded: TensorDictBase, group: NestedKey, who: str) -> None:
    """A group's per-agent terminal flags under ``"next"`` equal the shared ones, where both exist."""
    group = _as_tuple(group)
    if group[0] != "next":
        return
    for name in FLAG_NAMES:
        own, shared = folded.get((*group, name), None), folded.get(("next", name), None)
        if own is None or shared is None:
            continue
        own, shared = own.reshape(*own.shape[:2], -1), shared.reshape(*shared.shape[:2], -1)
        if own.shape != shared.shape:
            raise MettaError(
                f"{who}: the per-agent {(*group, name)!r} has {own.shape[-1]} flag(s) per agent-step, the shared "
                f"{('next', name)!r} {shared.shape[-1]}; give both one flag per step"
            )
        disagree = own.bool() != shared.bool()
        if bool(disagree.any()):
            raise MettaError(
                f"{who}: the per-agent {(*group, name)!r} disagrees with the shared {('next', name)!r} at "
                f"{int(disagree.sum())} agent-step(s); Metta's rows follow each env's episodes, so all agents of an "
                f"env must end together: set the per-agent flags from the shared ones (as TorchRL's MAPPO example "
                f"does: td['next', 'done'].unsqueeze(-1).expand(...)), or drop them"
            )


def set_keys_hint(field: str, key: NestedKey) -> str:
    """The call that points ``field`` at another tensordict entry, for error messages."""
    return f"loss.set_keys({field}=<your key>) (or estimator.set_keys; currently {field}={key!r})"


def read_bt(
    td: TensorDictBase,
    key: NestedKey,
    *,
    field: str,
    who: str,
    configured: NestedKey | None = None,
    float32: bool = True,
    check_finite: bool = True,
    check_flags: bool = True,
) -> Tensor:
    """``td[key]`` as a ``[B, T]`` tensor (a trailing feature dim of size 1 is dropped).

    With ``float32`` the entry must be float32 and finite (with ``check_finite=False`` the caller
    checks finiteness, e.g. of several entries at once with :func:`check_values`); otherwise
    (flags) bool, integer or floating, and (unless ``check_flags=False``, when the caller checks them
    with :func:`check_values`) every value 0 or 1. Every failure names the key, shape or dtype, and the
    ``set_keys`` call for ``field`` (whose current value is ``configured``, ``key`` when not given).
    """
    x = td.get(key, None)
    if x is None:
        raise MettaError(
            f"{who}: the input tensordict has no {key!r} entry (the {field!r} key); add it to the "
            f"batch or map {field!r} to the entry that holds it with {set_keys_hint(field, key if configured is None else configured)}"
        )
    bt = tuple(td.batch_size)
    if tuple(x.shape) == bt + (1,):
        x = x.squeeze(-1)
    if tuple(x.shape) != bt:
        raise MettaError(
            f"{who}: {key!r} ({field}) has shape {tuple(x.shape)}, expected {bt} or {bt + (1,)} "
            f"(one scalar per step of the [B, T] batch)"
        )
    if float32:
        if x.dtype != torch.float32:
            raise MettaError(
                f"{who}: {key!r} ({field}) has dtype {x.dtype}, expected torch.float32; cast it with "
                f"td[{key!r}] = td[{key!r}].float()"
            )
        if check_finite:
            _require_finite(x, key, field, who)
    elif x.dtype.is_complex:
        raise MettaError(f"{who}: {key!r} ({field}) has dtype {x.dtype}, expected bool, integer or float")
    elif check_flags:
        _require_flags(x, key, field, who)
    return x


def _require_flags(x: Tensor, key: NestedKey, field: str, who: str) -> None:
    problem = flag_problem(x.to(torch.float32), f"{key!r} ({field})", who)
    if problem:
        raise MettaError(problem)


def _require_finite(x: Tensor, key: NestedKey, field: str, who: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise MettaError(
            f"{who}: {key!r} ({field}) holds {bad} non-finite value(s) (NaN or inf); the loss "
            f"would be NaN. Check the environment / network that produced {key!r}"
        )


def check_values(
    entries: Sequence[tuple[NestedKey, str, Tensor]],
    who: str,
    *,
    flags: tuple[NestedKey, str, Tensor] | None = None,
    positive: tuple[NestedKey, str, Tensor] | None = None,
) -> None:
    """``read_bt``'s value checks of several entries in ONE fused reduction (one device sync):
    every ``(key, field, tensor)`` of ``entries`` finite, ``flags`` 0 or 1, ``positive`` finite and > 0.

    The sum of all elements is finite unless an element is NaN or inf (or the sum overflows, where
    the per-entry checks below find nothing and pass); only on a suspicious result is each entry
    checked, and the first offending one raises an error naming its key.
    """
    parts = [x.sum() for _, _, x in entries]
    if flags is not None:
        parts.append(flag_violation(flags[2].to(torch.float32)))
    if positive is not None:
        parts += [positive[2].sum(), (positive[2] <= 0).sum().to(torch.float32)]
    summary = torch.stack([p.detach().to(torch.float32) for p in parts]).tolist()
    clean = all(map(math.isfinite, summary))
    if flags is not None:
        clean = clean and summary[len(entries)] == 0
    if positive is not None:
        clean = clean and summary[-1] == 0
    if clean:
        return
    for key, field, x in entries:
        _require_finite(x, key, field, who)
    if flags is not None:
        _require_flags(flags[2], flags[0], flags[1], who)
    if positive is not None:
        key, field, x = positive
        _require_finite(x, key, field, who)
        if not bool((x > 0).all()):
            raise MettaError(
                f"{who}: {key!r} ({field}) holds {int((x <= 0).sum())} value(s) <= 0 (min {float(x.min()):.3g}); "
                f"importance weights are > 0: use the weights MettaSegmentSampler writes, or drop the entry"
            )


@contextmanager
def blame_inputs(who: str, what: str, inputs: dict[NestedKey, Tensor], hint: str) -> Iterator[None]:
    """Turn a raw torch error raised by ``what`` (a network call, a ``log_prob``) into a ``MettaError``
    naming the input entries with their shapes and dtypes, and ``hint`` (what they should be)."""
    try:
        yield
    except MettaError:
        raise
    except (RuntimeError, ValueError, IndexError) as exc:
        described = ", ".join(f"{key!r} {tuple(x.shape)} {x.dtype}" for key, x in inputs.items())
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MettaError(f"{who}: {what} failed on {described} ({reason}); {hint}") from exc


def check_estimator_hyperparams(hyperparams: dict[str, object], who: str) -> None:
    """Ranges of a TorchRL value estimator's settings: ``gamma``, ``lmbda`` in [0, 1]; V-trace's
    ``rho_thresh``, ``c_thresh`` > 0. TorchRL itself accepts any float."""
    for name in ("gamma", "lmbda"):
        value = hyperparams.get(name)
        if isinstance(value, (int, float)) and not 0 <= value <= 1:
            raise MettaError(f"{who}: {name} must be in [0, 1], got {value!r}")
    for name in ("rho_thresh", "c_thresh"):
        value = hyperparams.get(name)
        if isinstance(value, (int, float)) and not value > 0:
            raise MettaError(f"{who}: {name} must be > 0 (a V-trace truncation level), got {value!r}")


def metta_rewards_dones(next_reward: Tensor, next_terminated: Tensor) -> tuple[Tensor, Tensor]:
    """Shift TorchRL's ``[B, T]`` ``("next", reward)`` / ``("next", terminated)`` one column right.

    Returns Metta's ``rewards``, ``dones`` (float32): column ``t+1`` holds TorchRL's column ``t``,
    column 0 is 0 (never read), TorchRL's last column is dropped (SPEC §1).
    """
    shift = (1, 0)  # one zero column on the left of the last dim
    return pad(next_reward[:, :-1], shift), pad(next_terminated[:, :-1].to(torch.float32), shift)
