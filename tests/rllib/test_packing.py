"""The packers of ``bridges.rllib.layout`` against slow slot-by-slot references, on random episode chunks.

``reference_streams`` and ``reference_chunks`` build the layout one slot at a time from the rules of
the module docstring (per-agent streams cut into rows, block order, right-aligned tails with a
masked bootstrap slot; chunks end to end with truncated chunks ending in a row's last column). The
packers must give the same columns byte for byte (values, dtypes, shapes), and the rollout values
(``Columns.VF_PREDS`` in the episodes) on exactly the slots of rollout steps.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import pytest
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from bridges.rllib.layout import ROLLOUT_VALUE_SLOTS, STEP_KEY, STREAM_KEY, _zeros, pack_chunks, pack_streams

HORIZON = 6
OBS_SHAPE = (2, 3)


def chunk(rng, *, length, terminated, agent="agent_0", stream=None, first=0, values=True, obs_dtype=np.uint8):
    """A numpy'd episode chunk of ``length`` steps with random observations (all distinct in a test,
    the last one included: a packer that keeps a chunk's ``o_L`` where the next chunk's ``o_0`` belongs
    gives other bytes), optional stream infos and rollout values."""
    obs = [rng.integers(0, 256, OBS_SHAPE).astype(obs_dtype) for _ in range(length + 1)]
    infos = [{} if stream is None else {STREAM_KEY: stream, STEP_KEY: first + t} for t in range(length + 1)]
    outputs = {Columns.ACTION_LOGP: list(rng.normal(-1.5, 0.2, length).astype(np.float32))}
    if values:
        outputs[Columns.VF_PREDS] = list(rng.normal(0.0, 1.0, length).astype(np.float32))
    return SingleAgentEpisode(
        observations=obs, infos=infos, actions=list(rng.integers(0, 5, length)),
        rewards=list(rng.normal(size=length).astype(np.float32)), extra_model_outputs=outputs,
        terminated=terminated, len_lookback_buffer=0, agent_id=agent,
    ).to_numpy()


def without_values(episode):
    episode = copy.deepcopy(episode)
    del episode.extra_model_outputs[Columns.VF_PREDS]
    return episode


def random_streams(seed: int, *, values=True):
    """Chunks of 2 envs x 3 agents: each agent's steps (often whole rows) cut at random points (fragment
    ends and episode ends, ``terminated`` at the latter), sometimes a chunk missing (a gap starts a new
    run), shuffled."""
    rng = np.random.default_rng(seed)
    chunks = []
    for env in range(2):
        total = int(rng.integers(1, 4)) * HORIZON if rng.random() < 0.5 else int(rng.integers(1, 4 * HORIZON))
        cuts = sorted({0, total, *rng.integers(1, total + 1, int(rng.integers(0, 5))).tolist()})
        ends = {c for c in cuts[1:] if rng.random() < 0.4}
        dropped = int(rng.integers(-2, len(cuts) - 1))  # -2, -1: no gap
        for agent in range(3):
            for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
                if k != dropped:
                    chunks.append(chunk(rng, length=b - a, terminated=b in ends, agent=f"agent_{agent}",
                                        stream=(0, env), first=a, values=values))
    rng.shuffle(chunks)
    return chunks


def random_chunks(seed: int, *, values=True):
    """1-5 chunks of 0 .. 2 * HORIZON + 2 steps (a chunk without steps is truncated)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 2 * HORIZON + 3, int(rng.integers(1, 6)))
    return [chunk(rng, length=int(n), terminated=bool(n and rng.random() < 0.5), values=values) for n in lengths]


def padding_slot():
    return {"obs": np.zeros(OBS_SHAPE, np.uint8), "action": 0, "logp": 0.0, "value": None, "reward": 0.0,
            "done": 0.0, "mask": False}


def step_slots(episode, t, reward, done):
    """Slot of step ``t`` (``t < L``: the observation, action, log-prob and value of step ``t``) or of the
    observation ``o_L`` (``t = L``: no action, no rollout value), with the reward/done that led into it."""
    stepped = t < len(episode)
    return {
        "obs": episode.get_observations()[t], "reward": reward, "done": done, "mask": stepped,
        "action": episode.get_actions()[t] if stepped else 0,
        "logp": episode.get_extra_model_outputs(Columns.ACTION_LOGP)[t] if stepped else 0.0,
        "value": episode.get_extra_model_outputs(Columns.VF_PREDS)[t]
        if stepped and Columns.VF_PREDS in episode.extra_model_outputs else None,
    }


def columns_of(slots, obs_dtype=np.uint8):
    """Slot dicts -> the packers' columns (``VF_PREDS`` 0 and ``ROLLOUT_VALUE_SLOTS`` False where no rollout value)."""
    return {
        Columns.OBS: np.stack([np.asarray(s["obs"], obs_dtype) for s in slots]),
        Columns.ACTIONS: np.asarray([s["action"] for s in slots], np.int64),
        Columns.ACTION_LOGP: np.asarray([s["logp"] for s in slots], np.float32),
        Columns.REWARDS: np.asarray([s["reward"] for s in slots], np.float32),
        Columns.TERMINATEDS: np.asarray([s["done"] for s in slots], np.float32),
        Columns.LOSS_MASK: np.asarray([s["mask"] for s in slots], bool),
        Columns.VF_PREDS: np.asarray([0.0 if s["value"] is None else s["value"] for s in slots], np.float32),
        ROLLOUT_VALUE_SLOTS: np.asarray([s["value"] is not None for s in slots], bool),
    }


def reference_streams(chunks, horizon):
    """Per-agent streams slot by slot: runs of consecutive chunks; the ``k``-th full row of each agent (over its
    runs) in block ``k``, blocks in order, agents in order within a block; then the tails."""
    by_agent = defaultdict(list)
    for episode in chunks:
        by_agent[(episode.get_infos()[0][STREAM_KEY], int(episode.agent_id.split("_")[1]))].append(episode)
    blocks, tails = defaultdict(list), []
    for key in sorted(by_agent):
        runs = []
        for episode in sorted(by_agent[key], key=lambda e: e.get_infos()[0][STEP_KEY]):
            first = episode.get_infos()[0][STEP_KEY]
            if runs and first == runs[-1][-1].get_infos()[-1][STEP_KEY]:
                runs[-1].append(episode)
            else:
                runs.append([episode])
        block = 0  # an agent's full rows, over all its runs, go to blocks 0, 1, 2, ...
        for run in runs:
            slots, reward, done = [], 0.0, 0.0
            for episode in run:
                for t in range(len(episode)):
                    slots.append(step_slots(episode, t, reward, done))
                    reward, done = episode.get_rewards()[t], 0.0
                done = float(episode.is_terminated)
            final = step_slots(run[-1], len(run[-1]), reward, done)
            full = len(slots) // horizon
            for b in range(full):
                blocks[block].append(slots[b * horizon : (b + 1) * horizon])
                block += 1
            tail = slots[full * horizon :]
            if tail:
                tails.append([padding_slot() for _ in range(horizon - 1 - len(tail))] + tail + [final])
    rows = [row for b in sorted(blocks) for row in blocks[b]] + tails
    return columns_of([slot for row in rows for slot in row])


def reference_chunks(chunks, horizon):
    """Chunks end to end slot by slot: terminated ones first; a truncated chunk's ``o_L`` in a row's last column."""
    slots = []
    chunks = [e for e in chunks if len(e)]  # nothing to train in a chunk without steps
    for episode in [e for e in chunks if e.is_terminated] + [e for e in chunks if not e.is_terminated]:
        while not episode.is_terminated and (len(slots) + len(episode) + 1) % horizon:
            slots.append(padding_slot())
        slots.append(step_slots(episode, 0, 0.0, 0.0))
        for t in range(1, len(episode) + 1):
            done = float(episode.is_terminated and t == len(episode))
            slots.append(step_slots(episode, t, episode.get_rewards()[t - 1], done))
    while len(slots) % horizon:
        slots.append(padding_slot())
    return columns_of(slots, chunks[0].get_observations().dtype)


def assert_same_bytes(got, expected):
    assert set(got) == set(expected)
    for column, value in expected.items():
        assert got[column].dtype == value.dtype and got[column].shape == value.shape, column
        assert got[column].tobytes() == value.tobytes(), column


@pytest.mark.parametrize("seed", range(40))
def test_pack_streams_is_the_slot_by_slot_reference(seed):
    chunks = random_streams(seed)
    assert_same_bytes(pack_streams(chunks, HORIZON), reference_streams(chunks, HORIZON))


@pytest.mark.parametrize("seed", range(40))
def test_pack_chunks_is_the_slot_by_slot_reference(seed):
    chunks = random_chunks(seed)
    if not any(len(e) for e in chunks):
        assert pack_chunks(chunks, HORIZON) is None
        return
    assert_same_bytes(pack_chunks(chunks, HORIZON), reference_chunks(chunks, HORIZON))


@pytest.mark.parametrize("pack, make", [(pack_streams, random_streams), (pack_chunks, random_chunks)])
def test_without_rollout_values_in_every_chunk_no_value_column(pack, make):
    """One chunk without ``VF_PREDS`` (e.g. a module whose sampling forward does not return them): the
    packers give no values at all, and ``MettaLayoutConnector.finish`` runs the value pass."""
    chunks = make(3)
    expected = {c: v for c, v in pack(chunks, HORIZON).items() if c not in (Columns.VF_PREDS, ROLLOUT_VALUE_SLOTS)}
    plain = [without_values(episode) for episode in chunks]
    for case in (plain, chunks[:-1] + plain[-1:]):
        assert_same_bytes(pack(case, HORIZON), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32, bool, np.longdouble, np.dtype(">f4")])
def test_columns_are_zeros_of_the_dtype_with_or_without_a_torch_dtype(dtype):
    """``_zeros`` allocates through torch where torch has the dtype, else falls back to numpy."""
    column = _zeros((3, 2), dtype)
    assert column.dtype == np.dtype(dtype) and column.shape == (3, 2) and not column.any()
    column[1, 1] = 1  # writable
    assert column.sum() == 1
