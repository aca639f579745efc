"""RLlib episodes -> Metta's ``[segments, horizon]`` rows (SPEC §1), and checks of such batches.

Index convention. RLlib's row ``t`` of an episode holds ``(o_t, a_t, r_t)``: the reward sits at
the index of the action that caused it. Metta's column ``t`` holds ``o_t``, ``a_t`` and the
reward/terminal flag that *led into* ``o_t``, so ``metta.rewards[t+1] == rllib.reward[t]`` and
``metta.dones[t+1] == rllib.terminated[t]``; column 0 of rewards and dones is never read.

Layout chosen here: episode chunks packed into continuous rows, like one agent's stream.

- An episode chunk of ``L`` steps has ``L + 1`` observations ``o_0 .. o_L``; it becomes ``L + 1``
  slots: slot ``t < L`` holds ``o_t, a_t`` and the reward ``r_{t-1}`` that led into ``o_t``
  (0 at ``t = 0``); slot ``L`` holds ``o_L``, ``r_{L-1}`` and ``done = terminated``, and no action
  (``Columns.LOSS_MASK`` False). Its value ``V(o_L)`` is the bootstrap of a truncated chunk.
- Chunks are laid end to end and the stream is cut into rows of ``horizon`` columns, as Metta's
  rows are cut (a row's last column is a trained step with advantage 0, SPEC §1-2). Terminated
  chunks come first: after a terminal slot (``done = 1``) the recursion stops, so whatever follows
  (the next chunk, padding) never reaches a valid slot; this is Metta's own stream across episode
  boundaries, with one masked slot for the terminal observation.
- A truncated chunk (an episode still running, or cut by RLlib's rollout fragment) is placed so
  that its slot ``L`` lands in the last column of a row, after masked padding slots if needed.
  ``A[:, horizon-1] = 0`` makes that slot a pure bootstrap:
  ``A[L-1] = rho * (r_{L-1} + gamma * V(o_L) - V(o_{L-1}))``, RLlib's truncation handling.
- Padding (zeros, mask False) only ever precedes a chunk or closes the last row, and the recursion
  only looks forward, so padding never influences a valid slot. RLlib's sampled chunks do not say
  which chunk followed which on the same sub-environment, so the rows are not Metta's exact
  per-agent streams; the advantages of every valid slot are the same as in such a stream.

Stateful modules (SPEC §6; ``pack_chunks_stateful``): a row can start only from a stored state,
so each episode chunk starts a row of its own (as RLlib's ``AddTimeDimToBatchAndZeroPad`` starts a
sequence per chunk) and masked padding closes its last row (a chunk whose steps fill whole rows
ends with a row over its last ``horizon`` slots instead of a row of masked slots only). Every slot carries the state the env
runner fed into that step (``Columns.STATE_IN``: the chunk's lookback ``STATE_OUT``, or the
module's initial state at an episode's first step, then ``STATE_OUT`` of the step before), and
``STATE_RESETS`` is True on an episode's first slot (``bridges.rllib.recurrent``). A truncated
chunk whose slot ``L`` does not land in a row's last column is followed by one masked terminal slot
(``done = 1``) whose reward is the bootstrap value ``V(o_L)``: then ``A[L] = 0`` exactly, as in a
row's last column (the recursion's ``delta_L = V(o_L) + 0 - V(o_L)``).

Per-agent streams (``pack_streams``): when every chunk's infos carry ``metta_stream`` and
``metta_t`` (``bridges.rllib.MettaGridMultiAgentEnv`` sets them), each agent's chunks are chained
into the agent's own stream, Metta's same-step layout (a chunk's last observation is the next
chunk's first), and cut into rows in the core's order; see ``pack_streams``. Otherwise chunks are
laid out one by one as above (feed-forward modules; stateful modules always use ``pack_chunks_stateful``).

``Columns.ADVANTAGES`` holds the first-pass advantages ``A0`` (``compute_advantage`` with ratio 1,
zero on masked slots); ``Columns.VF_PREDS`` the values before the update: for a feed-forward module
whose sampling forward returns ``Columns.VF_PREDS`` (``GridCNNModule``), the rollout's values as
Metta's buffer stores them (RLlib keeps them in each step's ``extra_model_outputs``) and a value pass
over the slots that are not rollout steps only (a truncated chunk's ``o_L``, padding); otherwise a
value pass over the whole batch (``MettaLayoutConnector.finish``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Mapping, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import tree  # dm_tree, RLlib's own dependency: nested states
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.utils.annotations import override

from bridges.rllib.recurrent import STATE_RESETS, ZERO_STATE_KEY, row_batch
from metta_core.advantage import compute_advantage, flag_problem, flag_violation
from metta_core.config import PPOConfig
from metta_core.errors import MettaError


class MettaColumns:
    """Batch columns of the Metta layout that RLlib's ``Columns`` has no name for."""

    PRIO_WEIGHTS = "metta_prio_weights"
    """Per-slot importance weight ``(segments * p[idx]) ** -beta`` of the sampled segment (SPEC §4.3)."""


LAYOUT_COLUMNS = (
    Columns.OBS,
    Columns.ACTIONS,
    Columns.ACTION_LOGP,
    Columns.VF_PREDS,
    Columns.REWARDS,
    Columns.TERMINATEDS,
    Columns.LOSS_MASK,
    Columns.ADVANTAGES,
)
"""Columns of a Metta-layout batch, each flat ``[segments * horizon, ...]`` in row-major order."""

_FLOAT_COLUMNS = (Columns.ACTION_LOGP, Columns.VF_PREDS, Columns.REWARDS, Columns.ADVANTAGES)

_FIX = (
    "build the batch with bridges.rllib.MettaLayoutConnector (or lay it out as documented in "
    "bridges/rllib/layout.py)"
)


def check_metta_batch(batch: Mapping[str, Any], horizon: int, *, where: str, min_valid: int = 0) -> int:
    """Check a Metta-layout batch; return its number of segments.

    Every column of ``LAYOUT_COLUMNS`` must be a tensor whose first dimension is
    ``segments * horizon``; float columns float32 and finite; ``Columns.TERMINATEDS`` 0/1 flags;
    ``Columns.LOSS_MASK`` bool with at least ``min_valid`` True slots (2 for a minibatch whose
    advantages are normalized on one learner). The value checks are one fused reduction (one
    device sync; the loss runs this per minibatch). Raises ``MettaError`` naming the column,
    what it got, what was expected and the fix.
    """
    missing = [c for c in LAYOUT_COLUMNS if c not in batch]
    if missing:
        raise MettaError(
            f"{where}: batch is missing column(s) {missing} (RLlib Columns); a Metta-layout batch "
            f"needs {list(LAYOUT_COLUMNS)}; {_FIX}"
        )
    n = None
    for col in LAYOUT_COLUMNS:
        x = batch[col]
        if not isinstance(x, torch.Tensor):
            raise MettaError(f"{where}: column {col!r} must be a torch.Tensor, got {type(x).__name__}; {_FIX}")
        if x.dim() == 0:
            raise MettaError(f"{where}: column {col!r} is a scalar; expected [segments * horizon, ...]; {_FIX}")
        if n is None:
            n = x.shape[0]
        if x.shape[0] != n or (col != Columns.OBS and col != Columns.ACTIONS and x.dim() != 1):
            raise MettaError(
                f"{where}: column {col!r} has shape {tuple(x.shape)}, expected ({n},) like column "
                f"{Columns.OBS!r} (one entry per slot, [segments * horizon] flat); {_FIX}"
            )
    if n % horizon:
        raise MettaError(
            f"{where}: the batch has {n} slots, not a multiple of bptt_horizon ({horizon}); a Metta batch is "
            f"[segments, horizon] rows flattened; {_FIX}"
        )
    for col in _FLOAT_COLUMNS:
        if batch[col].dtype != torch.float32:
            raise MettaError(f"{where}: column {col!r} must be float32, got {batch[col].dtype}; convert with .float()")
    mask = batch[Columns.LOSS_MASK]
    if mask.dtype != torch.bool:
        raise MettaError(
            f"{where}: column {Columns.LOSS_MASK!r} must be bool (True = a trained slot), got {mask.dtype}; "
            f"convert with .bool()"
        )
    dones = batch[Columns.TERMINATEDS]
    if not (dones.dtype == torch.bool or dones.is_floating_point()):
        raise MettaError(f"{where}: column {Columns.TERMINATEDS!r} must be bool or float, got {dones.dtype}")
    parts = [batch[col].sum() for col in _FLOAT_COLUMNS] + [flag_violation(dones), mask.sum().to(torch.float32)]
    summary = torch.stack([p.detach().to(torch.float32) for p in parts]).tolist()
    if all(map(math.isfinite, summary[:-1])) and summary[-2] == 0 and summary[-1] >= min_valid:
        return n // horizon
    for col in _FLOAT_COLUMNS:
        x = batch[col]
        if not bool(torch.isfinite(x).all()):
            raise MettaError(
                f"{where}: column {col!r} has {int((~torch.isfinite(x)).sum())} non-finite value(s) (NaN or inf); "
                f"fix the environment or wrap it to emit finite {col}"
            )
    problem = flag_problem(dones, f"column {Columns.TERMINATEDS!r}", where)
    if problem:
        raise MettaError(problem)
    if summary[-1] < min_valid:
        raise MettaError(
            f"{where}: column {Columns.LOSS_MASK!r} marks {int(summary[-1])} of {n} slots valid, but the standard "
            f"deviation of the advantage normalization needs at least {min_valid} elements; the mask must be True on "
            f"every step that carries an action ({_FIX}), or set norm_adv=False"
        )
    return n // horizon


def check_module_inputs(batch: Mapping[str, torch.Tensor], module, *, where: str) -> None:
    """``Columns.OBS`` and ``Columns.ACTIONS`` against ``module``'s spaces, before the module runs:
    observation dtype float32 and per-slot shape, and for ``Discrete`` the actions' range.

    Without it a wrong observation is a raw torch matmul error and an out-of-range action a raw index
    error. Run once per training phase (the range check is one reduction).
    """
    obs, actions = batch.get(Columns.OBS), batch.get(Columns.ACTIONS)
    if not (isinstance(obs, torch.Tensor) and isinstance(actions, torch.Tensor)):
        return  # check_metta_batch names the missing or mistyped column
    obs_space, act_space = module.observation_space, module.action_space
    if obs_space is not None and tuple(obs.shape[1:]) != tuple(obs_space.shape):
        raise MettaError(
            f"{where}: column {Columns.OBS!r} has shape {tuple(obs.shape)}, expected (slots, "
            f"{', '.join(map(str, obs_space.shape))}) for the module's observation space {obs_space}"
        )
    if obs.is_floating_point() and obs.dtype != torch.float32:
        raise MettaError(
            f"{where}: column {Columns.OBS!r} has dtype {obs.dtype}, the module computes in float32; convert with .float()"
        )
    # the actions' shape is checked against the distribution by the loss (bridges.rllib.loss.check_action_shape)
    if isinstance(act_space, gym.spaces.Discrete) and actions.numel():
        low, high = torch.stack([actions.min(), actions.max()]).tolist()
        if low < act_space.start or high >= act_space.start + act_space.n:
            raise MettaError(
                f"{where}: column {Columns.ACTIONS!r} holds actions in [{low}, {high}], outside the module's action "
                f"space {act_space} ({act_space.start}..{act_space.start + act_space.n - 1})"
            )


class Chunk(NamedTuple):
    """One episode chunk of ``L`` steps as numpy arrays (RLlib's index convention: ``rewards[t]`` follows ``a_t``)."""

    episode: Any
    obs: np.ndarray
    """``o_0 .. o_L``, ``[L + 1, ...]``."""
    actions: np.ndarray
    """``a_0 .. a_{L-1}``, ``[L, ...]``."""
    rewards: np.ndarray
    """``r_0 .. r_{L-1}``, float32 ``[L]``, finite."""
    logp: np.ndarray
    """Sampling log-probabilities of ``a_t``, float32 ``[L]``."""
    values: np.ndarray | None
    """Rollout values ``V(o_t)`` (``Columns.VF_PREDS`` of the sampling forward), float32 ``[L]``; ``None``
    if the episode does not carry them."""


def _episode_arrays(episode) -> Chunk:
    """One episode chunk of ``L`` steps as a ``Chunk``; raises if a column is missing, has the wrong
    length, or a reward is not finite."""
    length = len(episode)
    obs = np.asarray(episode.get_observations())
    actions = np.asarray(episode.get_actions())
    rewards = np.asarray(episode.get_rewards(), dtype=np.float32)
    try:
        logp = np.asarray(episode.get_extra_model_outputs(Columns.ACTION_LOGP), dtype=np.float32)
    except KeyError:
        raise MettaError(
            f"MettaLayoutConnector: episode {episode.id_!r} has no extra model output {Columns.ACTION_LOGP!r}; "
            f"the RLModule's exploration forward must return {Columns.ACTION_DIST_INPUTS!r} so that RLlib "
            f"stores the action log-probabilities"
        ) from None
    if obs.shape[0] != length + 1 or actions.shape[0] != length or logp.shape[0] != length:
        raise MettaError(
            f"MettaLayoutConnector: episode {episode.id_!r} has {obs.shape[0]} observations, {actions.shape[0]} "
            f"actions and {logp.shape[0]} {Columns.ACTION_LOGP!r} for length {length}; expected {length + 1}, "
            f"{length}, {length}"
        )
    if not np.isfinite(rewards).all():
        raise MettaError(
            f"MettaLayoutConnector: column {Columns.REWARDS!r} of episode {episode.id_!r} has non-finite "
            f"value(s) (NaN or inf) at steps {np.flatnonzero(~np.isfinite(rewards)).tolist()[:10]}; "
            f"fix the environment or wrap it to emit finite rewards"
        )
    values = None
    if Columns.VF_PREDS in episode.extra_model_outputs:
        values = np.asarray(episode.get_extra_model_outputs(Columns.VF_PREDS), dtype=np.float32)
        if values.size != length:
            raise MettaError(
                f"MettaLayoutConnector: episode {episode.id_!r} has {Columns.VF_PREDS!r} of shape {values.shape} "
                f"for length {length}; expected one value per step (the sampling forward's {Columns.VF_PREDS!r} "
                f"of shape [batch], as ValueFunctionAPI.compute_values returns)"
            )
        values = values.reshape(length)
    return Chunk(episode, obs, actions, rewards, logp, values)


def _zeros(shape: tuple, dtype) -> np.ndarray:
    """``np.zeros(shape, dtype)`` allocated by torch (the batch becomes torch tensors without a copy).

    numpy asks the kernel for transparent huge pages on large arrays (``madvise``); with Linux's
    default ``defrag=madvise`` the first write then waits for memory compaction: 0.1-0.3 CPU s for a
    40 MB observation column on the 2-core benchmark machine, against 0.02 s with torch's allocation.
    """
    try:
        torch_dtype = torch.from_numpy(np.zeros(0, dtype)).dtype
    except (TypeError, ValueError):  # a dtype torch does not have (or a non-native byte order)
        return np.zeros(shape, dtype)
    return torch.zeros(shape, dtype=torch_dtype).numpy()


ROLLOUT_VALUE_SLOTS = "_metta_rollout_values"
"""Key (in the packers' output only) of the bool per slot: ``Columns.VF_PREDS`` holds the rollout's value
of that step (``finish`` computes the values of the other slots)."""


def write_chunks(chunks: list[Chunk], slots: list[np.ndarray], total: int, *, with_values: bool) -> dict[str, np.ndarray]:
    """The columns of ``total`` slots, chunk ``i``'s position ``p`` at slot ``slots[i][p]`` (the one writer of
    the packers).

    ``slots[i]`` has ``L + 1`` entries: position ``p < L`` is step ``p`` (``o_p``, ``a_p``, its log-prob,
    its rollout value, mask True, and for ``p > 0`` the reward ``r_{p-1}`` that led into ``o_p``);
    position ``L`` receives ``o_L``, ``r_{L-1}`` and ``done = terminated``, or nothing if ``slots[i][L]``
    is -1. Chunks are written in order, so where a chunk's position ``L`` and the next chunk's position
    0 share a slot (a stream), the slot keeps the first chunk's reward and done and the next chunk's
    observation and step. Every other slot is zero (mask False). With ``with_values`` (every chunk has
    ``values``), ``Columns.VF_PREDS`` holds the rollout values and ``ROLLOUT_VALUE_SLOTS`` marks them.
    The columns are allocated once (``_zeros``) and written in place (RLlib batches hold hundreds of chunks).
    """
    first = chunks[0]
    out = {
        Columns.OBS: _zeros((total, *first.obs.shape[1:]), np.result_type(*(c.obs for c in chunks))),
        Columns.ACTIONS: _zeros((total, *first.actions.shape[1:]), np.result_type(*(c.actions for c in chunks))),
        Columns.ACTION_LOGP: _zeros((total,), np.float32),
        Columns.REWARDS: _zeros((total,), np.float32),
        Columns.TERMINATEDS: _zeros((total,), np.float32),
        Columns.LOSS_MASK: _zeros((total,), bool),
    }
    if with_values:
        out[Columns.VF_PREDS] = _zeros((total,), np.float32)
        out[ROLLOUT_VALUE_SLOTS] = _zeros((total,), bool)
    for chunk, at in zip(chunks, slots):
        length = len(chunk.actions)
        steps, last = at[:length], int(at[length])
        out[Columns.OBS][steps] = chunk.obs[:length]
        out[Columns.ACTIONS][steps] = chunk.actions
        out[Columns.ACTION_LOGP][steps] = chunk.logp
        out[Columns.LOSS_MASK][steps] = True
        out[Columns.REWARDS][steps[1:]] = chunk.rewards[:-1]
        if with_values:
            out[Columns.VF_PREDS][steps] = chunk.values
            out[ROLLOUT_VALUE_SLOTS][steps] = True
        if last >= 0:
            out[Columns.OBS][last] = chunk.obs[length]
            out[Columns.REWARDS][last] = chunk.rewards[-1] if length else 0.0
            out[Columns.TERMINATEDS][last] = float(chunk.episode.is_terminated)
    return out


def pack_chunks(episodes: list, horizon: int) -> dict[str, np.ndarray] | None:
    """Lay episode chunks end to end into rows of ``horizon`` (see module docstring); ``None`` if no chunk
    has a step (chunks without steps are left out, as by the other packers).

    Terminated chunks first, in order; each truncated chunk is preceded by the padding that puts its
    last slot in a row's last column; masked padding closes the last row. A chunk of ``L`` steps
    starting at slot ``s`` fills ``obs[s:s+L+1]``, ``actions``, ``action_logp`` and the mask
    ``[s:s+L]``, ``rewards[s+1:s+L+1]`` (``metta.rewards[t+1] = rllib.rewards[t]``) and
    ``dones[s+L] = terminated`` (``write_chunks``); every other slot is zero (mask False). With rollout
    values in every chunk, also ``Columns.VF_PREDS`` and ``ROLLOUT_VALUE_SLOTS`` on its slots ``s..s+L-1``.
    """
    episodes = [episode for episode in episodes if len(episode)]  # a chunk without steps has nothing to train
    ordered = [e for e in episodes if e.is_terminated] + [e for e in episodes if not e.is_terminated]
    if not ordered:
        return None
    chunks = [_episode_arrays(episode) for episode in ordered]
    slots, end = [], 0
    for chunk in chunks:
        if not chunk.episode.is_terminated:
            end += -(end + len(chunk.obs)) % horizon
        slots.append(np.arange(end, end + len(chunk.obs)))
        end += len(chunk.obs)
    with_values = all(chunk.values is not None for chunk in chunks)
    return write_chunks(chunks, slots, -(-end // horizon) * horizon, with_values=with_values)


def _stored_input_states(episode, module, zero_at_start: bool) -> Any:
    """The input state of each of the chunk's ``L + 1`` slots, a tree of ``[L + 1, ...]`` arrays:
    the state before step 0 (the module's initial state at an episode's start, else the lookback
    ``STATE_OUT``; zeros with ``zero_at_start``), then ``STATE_OUT`` of steps ``0 .. L-1``."""
    if Columns.STATE_OUT not in episode.extra_model_outputs:
        raise MettaError(
            f"MettaLayoutConnector: episode {episode.id_!r} has no extra model output {Columns.STATE_OUT!r}, but "
            f"{type(module).__name__} is stateful; its forward must return {Columns.STATE_OUT!r} (RLlib stores it "
            f"with every step and the Metta layout keeps it as each step's stored input state, SPEC §6)"
        )
    if zero_at_start:
        before = tree.map_structure(lambda s: np.zeros(np.shape(s), np.float32), module.get_initial_state())
    elif episode.t_started == 0:
        before = tree.map_structure(lambda s: np.asarray(s, dtype=np.float32), module.get_initial_state())
    else:
        before = episode.get_extra_model_outputs(key=Columns.STATE_OUT, indices=-1, neg_index_as_lookback=True)
    outs = episode.get_extra_model_outputs(key=Columns.STATE_OUT)
    return tree.map_structure(
        lambda b, o: np.concatenate([np.asarray(b)[None], np.asarray(o)], axis=0).astype(np.float32), before, outs
    )


BOOTSTRAP_SLOTS = "_metta_bootstrap_slots"
"""Key (in ``pack_chunks_stateful``'s output only) of the slots ``L`` whose next slot gets ``V(o_L)`` as reward."""


def pack_chunks_stateful(episodes: list, horizon: int, module, zero_at_start: bool = False) -> dict[str, Any] | None:
    """Each chunk starts a row (see module docstring); ``None`` if no chunk has a step.

    ``zero_at_start``: every chunk's first step was run from zeros (``zero_state_at_rollout_start``);
    its stored state is zeros and ``STATE_RESETS`` is True there.

    Columns of ``pack_chunks`` plus ``Columns.STATE_IN`` (a tree of ``[slots, ...]`` float32 arrays)
    and ``STATE_RESETS``; ``BOOTSTRAP_SLOTS`` lists the slot ``L`` of each truncated chunk that is
    followed by its masked terminal slot (``finish`` writes ``V(o_L)`` into that slot's reward).
    The chunks are first laid end to end (``write_chunks``), then cut into rows: at ``0, h, 2h``
    of each chunk, except that when its ``L`` steps fill whole rows (``L % h == 0``), the last row
    would hold only masked slots (``o_L``, its terminal slot): it then covers the chunk's last ``h``
    slots instead, starting from the stored state there, and the slots it shares with the row
    before are trained in it (masked in the earlier row), with the terminal or bootstrap value.
    """
    episodes = [episode for episode in episodes if len(episode)]
    if not episodes:
        return None
    chunks = [_episode_arrays(episode) for episode in episodes]
    states = [_stored_input_states(episode, module, zero_at_start) for episode in episodes]
    starts, sizes, end = [], [], 0
    for episode, chunk in zip(episodes, chunks):
        starts.append(end)
        sizes.append(len(chunk.obs) + (not episode.is_terminated and len(chunk.obs) % horizon != 0))
        end += sizes[-1]
    bootstraps = [s + len(e) for s, size, e in zip(starts, sizes, episodes) if size == len(e) + 2]
    slots = [np.arange(s, s + len(chunk.obs)) for s, chunk in zip(starts, chunks)]
    stream = write_chunks(chunks, slots, end + 1, with_values=False)  # slot ``end``: padding
    stream[STATE_RESETS] = np.zeros(end + 1, dtype=bool)
    stream[Columns.STATE_IN] = tree.map_structure(lambda s: np.zeros((end + 1, *s.shape[1:]), np.float32), states[0])
    for s, episode, state in zip(starts, episodes, states):
        stream[STATE_RESETS][s] = zero_at_start or episode.t_started == 0
        for column, stored in zip(tree.flatten(stream[Columns.STATE_IN]), tree.flatten(state)):
            column[s : s + len(stored)] = stored
    for b in bootstraps:
        stream[Columns.TERMINATEDS][b + 1] = 1.0
    index, owned, out_bootstraps = [], [], []
    columns_of_row = np.arange(horizon)
    for s, size, episode in zip(starts, sizes, episodes):
        offsets = list(range(0, size, horizon))
        if len(episode) % horizon == 0 and size > horizon:
            offsets[-1] = size - horizon
        for k, offset in enumerate(offsets):
            in_chunk = offset + columns_of_row
            index.append(np.where(in_chunk < size, s + in_chunk, end))
            owned.append(in_chunk < (offsets[k + 1] if k + 1 < len(offsets) else size))
        if size == len(episode) + 2:  # slot L (and its terminal slot) sit in the last row
            out_bootstraps.append((len(index) - 1) * horizon + len(episode) - offsets[-1])
    index_flat = np.concatenate(index)
    columns = tree.map_structure(lambda v: v[index_flat], stream)
    columns[Columns.LOSS_MASK] = columns[Columns.LOSS_MASK] & np.concatenate(owned)
    columns[BOOTSTRAP_SLOTS] = np.asarray(out_bootstraps, dtype=np.int64)
    return columns


STREAM_KEY = "metta_stream"
"""Info key of the env that produced a step (``MettaGridMultiAgentEnv``: ``(worker_index, instance)``)."""
STEP_KEY = "metta_t"
"""Info key of that env's step count at an observation, over all its episodes."""


def _stream_position(episode) -> tuple[Any, int] | None:
    """``(stream, first step)`` of a chunk whose infos carry ``STREAM_KEY``/``STEP_KEY``, else ``None``."""
    infos = episode.get_infos()
    first, last = (infos[0], infos[-1]) if len(infos) else ({}, {})
    if not (isinstance(first, dict) and STREAM_KEY in first and STEP_KEY in first):
        return None
    if last.get(STREAM_KEY) != first[STREAM_KEY] or last.get(STEP_KEY) != first[STEP_KEY] + len(episode):
        raise MettaError(
            f"MettaLayoutConnector: episode chunk {episode.id_!r} (agent {episode.agent_id!r}) has infos "
            f"{STREAM_KEY}/{STEP_KEY} {first[STREAM_KEY]}/{first[STEP_KEY]} .. {last.get(STREAM_KEY)}/"
            f"{last.get(STEP_KEY)} for {len(episode)} steps; expected one stream and consecutive steps (the env "
            f"must count every step once, as bridges.rllib.MettaGridMultiAgentEnv does)"
        )
    return first[STREAM_KEY], int(first[STEP_KEY])


def _agent_order(agent_id: Any) -> tuple:
    """Sort key of an agent id: ``agent_<n>`` by ``n`` (row order), other ids after, by name."""
    text = str(agent_id)
    index = text.rpartition("_")[2]
    return (0, int(index), "") if index.isdigit() else (1, 0, text)


def _stream_runs(chunks: list[tuple[int, Chunk]]) -> list[list[tuple[int, Chunk]]]:
    """One agent's chunks ``(first step, chunk)`` in step order, cut where a chunk does not start at the
    step where the previous one ended (a chunk this learner did not receive)."""
    runs: list[list[tuple[int, Chunk]]] = []
    for first, chunk in sorted(chunks, key=lambda c: c[0]):
        if runs:
            prev_first, prev = runs[-1][-1]
            prev_end = prev_first + len(prev.actions)
            if first < prev_end:
                raise MettaError(
                    f"MettaLayoutConnector: agent {chunk.episode.agent_id!r} has overlapping chunks (steps "
                    f"{prev_first}..{prev_end} and {first}..{first + len(chunk.actions)} of one stream); each step "
                    f"must reach the learner once"
                )
            if first == prev_end:
                runs[-1].append((first, chunk))
                continue
        runs.append([(first, chunk)])
    return runs


def _run_slots(length: int, rows: list[int], tail_row: int | None, horizon: int) -> np.ndarray:
    """Slot of each position ``q = 0 .. M`` of a run of ``M = length`` steps (``q = M``: the final observation).

    Steps ``q < len(rows) * horizon`` fill the full rows ``rows`` in order; the last ``m`` steps (if any) sit
    right-aligned in row ``tail_row`` before its last column, which takes the final observation as a masked
    bootstrap slot. Without a tail the final observation has no slot (-1): it would be past a row's end.
    """
    full = len(rows) * horizon
    q = np.arange(full)
    at = np.full(length + 1, -1, dtype=np.int64)
    at[:full] = np.asarray(rows, dtype=np.int64)[q // horizon] * horizon + q % horizon
    if tail_row is not None:
        end = (tail_row + 1) * horizon  # the final observation lands in slot end - 1
        at[full:] = np.arange(end - 1 - (length - full), end)
    return at


def pack_streams(episodes: list, horizon: int) -> dict[str, np.ndarray] | None:
    """Chunks that carry stream infos -> one row stream per agent, in the core's row order; ``None``
    if ``episodes`` is empty or a chunk has no stream infos (then ``pack_chunks`` lays them out).

    Each agent's chunks (grouped by ``(info[STREAM_KEY], agent id)``, chained by ``info[STEP_KEY]``)
    form Metta's stream: ``o_t, a_t`` in slot ``t``, the reward and terminal flag that led into
    ``o_t`` in slot ``t`` (0 in a stream's first slot, which is never read), episodes back to back
    with the next episode's first observation in the slot after the last action (same-step
    autoreset, as ``MettaGridEnvironment`` hands it to the core; a chunk's own last observation is
    not kept there). The stream is cut into rows of ``horizon`` (no bootstrap past a row, SPEC §1-2):
    an agent's ``j``-th full row (counted over its runs of consecutive chunks) is in block ``j``, and
    the rows are block by block, within a block by stream, then ``agent_<n>`` by ``n``; with equal
    stream lengths, row ``b * agents + i`` is block ``b`` of the ``i``-th stream: the rows the core's
    ``Experience`` fills from ``agents`` rows. A run's last ``m < horizon`` steps go in a row of their
    own, right-aligned after masked padding, followed by the final observation as a masked bootstrap
    slot (``pack_chunks``' truncated-chunk rule); such tails come after all full rows. Each chunk is
    written once into the preallocated columns (``write_chunks``), with the rollout values when every
    chunk has them.
    """
    streams: dict[tuple, list] = defaultdict(list)
    for episode in episodes:
        if not len(episode):
            continue
        position = _stream_position(episode)
        if position is None:
            return None
        stream, first = position
        streams[(stream, episode.agent_id)].append((first, _episode_arrays(episode)))
    if not streams:
        return None
    agents = [_stream_runs(streams[key]) for key in sorted(streams, key=lambda k: (k[0], _agent_order(k[1])))]
    lengths = [[sum(len(chunk.actions) for _, chunk in run) for run in runs] for runs in agents]
    full_rows = [sum(m // horizon for m in runs) for runs in lengths]
    row_of: dict[tuple[int, int], int] = {}  # (agent, its j-th full row) -> row
    for j in range(max(full_rows)):
        for k, n in enumerate(full_rows):
            if n > j:
                row_of[k, j] = len(row_of)
    tail_row = len(row_of)
    chunks, slots = [], []
    for k, (runs, run_lengths) in enumerate(zip(agents, lengths)):
        j = 0
        for run, length in zip(runs, run_lengths):
            rows = [row_of[k, j + i] for i in range(length // horizon)]
            j += len(rows)
            has_tail = length % horizon != 0
            at = _run_slots(length, rows, tail_row if has_tail else None, horizon)
            tail_row += has_tail
            offset = 0
            for _, chunk in run:
                chunks.append(chunk)
                slots.append(at[offset : offset + len(chunk.obs)])
                offset += len(chunk.actions)
    with_values = all(chunk.values is not None for chunk in chunks)
    return write_chunks(chunks, slots, tail_row * horizon, with_values=with_values)


def empty_slots(module, num_slots: int) -> dict[str, np.ndarray]:
    """``num_slots`` fully masked padding slots for ``module``'s spaces (zeros, mask False)."""
    obs, act = module.observation_space, module.action_space
    slots = {
        Columns.OBS: np.zeros((num_slots, *obs.shape), dtype=obs.dtype),
        Columns.ACTIONS: np.zeros((num_slots, *act.shape), dtype=act.dtype),
        Columns.ACTION_LOGP: np.zeros(num_slots, dtype=np.float32),
        Columns.REWARDS: np.zeros(num_slots, dtype=np.float32),
        Columns.TERMINATEDS: np.zeros(num_slots, dtype=np.float32),
        Columns.LOSS_MASK: np.zeros(num_slots, dtype=bool),
    }
    if module.is_stateful():
        slots[Columns.STATE_IN] = tree.map_structure(
            lambda s: np.zeros((num_slots, *s.shape), np.float32), module.get_initial_state()
        )
        slots[STATE_RESETS] = np.zeros(num_slots, dtype=bool)
    return slots


def first_pass_advantage(batch: Mapping[str, torch.Tensor], horizon: int, cfg: PPOConfig) -> torch.Tensor:
    """``A0 = compute_advantage(values, rewards, dones, w=1)`` on ``[segments, horizon]`` rows (SPEC §4.2),
    zeroed on slots outside ``Columns.LOSS_MASK``; returned flat like the batch columns."""
    shape = (-1, horizon)
    values = batch[Columns.VF_PREDS].reshape(shape)
    adv = compute_advantage(
        values,
        batch[Columns.REWARDS].reshape(shape),
        batch[Columns.TERMINATEDS].reshape(shape),
        torch.ones_like(values),
        gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda,
        rho_clip=cfg.vtrace.rho_clip,
        c_clip=cfg.vtrace.c_clip,
    ).reshape(-1)
    return torch.where(batch[Columns.LOSS_MASK], adv, torch.zeros_like(adv))


class MettaLayoutConnector(ConnectorV2):
    """Learner connector: episodes -> one Metta-layout batch per module, with values and ``A0``.

    Replaces RLlib's ``AddOneTsToEpisodesAndTruncate`` + default batching + ``GeneralAdvantageEstimation``
    (which normalizes advantages batch-wide, padding included); normalization happens per minibatch
    in the loss instead (SPEC §3). Use it as the whole learner pipeline
    (``add_default_connectors_to_learner_pipeline=False``); ``metta_ppo_config`` does this for you.
    Output columns: ``LAYOUT_COLUMNS``, tensors on the module's device, rows as documented above.
    """

    def __init__(self, input_observation_space=None, input_action_space=None, *, ppo: PPOConfig, horizon: int,
                 zero_state_at_rollout_start: bool = False, count_steps_by: str = "agent_steps"):
        super().__init__(input_observation_space, input_action_space)
        self.ppo = ppo
        self.horizon = horizon
        self.zero_state_at_rollout_start = zero_state_at_rollout_start
        self.count_steps_by = count_steps_by

    @classmethod
    def from_config(cls, config) -> "MettaLayoutConnector":
        """Build from an ``AlgorithmConfig`` made by ``bridges.rllib.metta_ppo_config``."""
        from bridges.rllib.config import METTA_KEY, metta_settings

        ppo, trainer = metta_settings(config)
        zero = bool(config.learner_config_dict[METTA_KEY].get(ZERO_STATE_KEY, False))
        return cls(ppo=ppo, horizon=trainer.bptt_horizon, zero_state_at_rollout_start=zero,
                   count_steps_by=config.count_steps_by)

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        from bridges.rllib.config import require_agent_step_counting

        for episode in episodes:
            require_agent_step_counting(self.count_steps_by, len(getattr(episode, "agent_ids", ())))
        by_module: dict[str, list] = defaultdict(list)
        for episode in self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False):
            by_module[episode.module_id or DEFAULT_MODULE_ID].append(episode)
        for module_id in rl_module.keys():
            module = rl_module[module_id].unwrapped()
            if not isinstance(module, ValueFunctionAPI):
                continue
            episodes = by_module.get(module_id, [])
            if module.is_stateful():
                columns = pack_chunks_stateful(episodes, self.horizon, module, self.zero_state_at_rollout_start)
            else:
                columns = pack_streams(episodes, self.horizon)
                if columns is None:
                    columns = pack_chunks(episodes, self.horizon)
            batch[module_id] = self.finish(module, empty_slots(module, 0) if columns is None else columns)
        return batch

    def finish(self, module, columns: Mapping[str, Any]) -> dict[str, Any]:
        """Slots -> tensors on the module's device, plus ``VF_PREDS`` (no grad) and ``A0``.

        Which values: with ``ROLLOUT_VALUE_SLOTS`` (a feed-forward module whose sampling forward
        returned ``Columns.VF_PREDS`` for every packed chunk), the rollout's own values on those slots,
        as Metta's buffer stores them (the values of the weights that sampled: with synchronous
        sampling the weights before this update, equal to a value pass up to float noise), and a
        value pass over the other slots only (a truncated chunk's bootstrap ``V(o_L)``, padding).
        Otherwise (RLlib's default modules, modules without ``VF_PREDS`` in their sampling forward, a
        chunk without them) one value pass over every slot. A stateful module's values always come
        from its rows (``bridges.rllib.recurrent.row_batch``: each row from its column 0's stored
        state, SPEC §6); a truncated chunk's masked terminal slot then gets ``V(o_L)`` as its reward
        (module docstring).
        """
        columns = dict(columns)
        bootstraps = columns.pop(BOOTSTRAP_SLOTS, np.zeros(0, dtype=np.int64))
        rollout_values = columns.pop(ROLLOUT_VALUE_SLOTS, None)
        if rollout_values is None:
            columns.pop(Columns.VF_PREDS, None)
        device = next(module.parameters()).device
        out = {c: tree.map_structure(lambda v: torch.as_tensor(v, device=device), v) for c, v in columns.items()}
        if rollout_values is None or module.is_stateful():
            out[Columns.VF_PREDS] = self._value_pass(module, out)
        else:
            missing = torch.as_tensor(np.flatnonzero(~rollout_values), device=device)
            if len(missing):
                out[Columns.VF_PREDS][missing] = self._value_pass(module, out, missing)
        if len(bootstraps):
            slots = torch.as_tensor(bootstraps, device=device)
            out[Columns.REWARDS][slots + 1] = out[Columns.VF_PREDS][slots]
        out[Columns.ADVANTAGES] = first_pass_advantage(out, self.horizon, self.ppo)
        return out

    def _value_pass(self, module, out: Mapping[str, Any], slots: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 values (no grad) of the given slots, or of all (a stateful module runs whole rows)."""
        if not len(out[Columns.OBS]):
            return torch.zeros(0, device=out[Columns.OBS].device)
        with torch.no_grad():
            if module.is_stateful():
                values = module.compute_values(row_batch(module, out, self.horizon, where="MettaLayoutConnector"))
            else:
                obs = out[Columns.OBS]
                values = module.compute_values({Columns.OBS: obs if slots is None else obs[slots]})
        return values.reshape(-1).to(torch.float32)
