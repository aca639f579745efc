"""Experience: Metta's buffer arithmetic, divisibility errors and row bookkeeping."""

import pytest
import torch
from tensordict import TensorDict

from metta_core.errors import MettaError
from metta_core.experience import Experience, ExperienceSpec, FieldSpec

SPEC = ExperienceSpec({"x": FieldSpec(), "obs": FieldSpec((2,))})


def make(total_agents=2, batch_size=16, horizon=4, minibatch=8, max_minibatch=8):
    return Experience(total_agents, batch_size, horizon, minibatch, max_minibatch, SPEC)


def test_sizes():
    exp = make(batch_size=32, minibatch=16, max_minibatch=8)
    assert (exp.segments, exp.minibatch_size, exp.accumulate_minibatches, exp.minibatch_segments, exp.num_minibatches) == (8, 8, 2, 2, 4)
    assert exp.buffer.batch_size == torch.Size([8, 4]) and exp.buffer["obs"].shape == (8, 4, 2)


def test_too_many_agents():
    with pytest.raises(MettaError, match=r"segments \(4 = batch_size // bptt_horizon 4\) must be >= total_agents \(5\); set batch_size to at least 20"):
        make(total_agents=5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(minibatch=6, max_minibatch=6), r"minibatch_size \(6\) must be divisible by bptt_horizon \(4\)"),
    (dict(batch_size=12, minibatch=8), r"num_minibatches = 1.5 is not whole"),
    (dict(batch_size=2), r"batch_size \(2\) is smaller than bptt_horizon \(4\); set batch_size to a multiple"),
    (dict(horizon=0), r"buffer_sizes: bptt_horizon must be a positive int, got 0"),
    (dict(max_minibatch=-8), r"buffer_sizes: max_minibatch_size must be a positive int, got -8"),
])
def test_divisibility_errors(kwargs, match):
    with pytest.raises(MettaError, match=match):
        make(total_agents=1, **kwargs)


def test_store_fills_rows_agent_by_agent():
    exp = make(total_agents=2, batch_size=16, horizon=4)
    step = 0
    while not exp.ready_for_training:
        td = TensorDict({"x": torch.tensor([100.0 + step, 200.0 + step]), "obs": torch.zeros(2, 2)}, batch_size=[2])
        exp.store(td, slice(0, 2))
        step += 1
    assert step == 8  # 4 rows shared by 2 agents: 2 rows of 4 steps each
    # agent 0 starts in row 0, agent 1 in row 1; full rows move them to rows 2 and 3
    assert exp.buffer["x"][0].tolist() == [100, 101, 102, 103]
    assert exp.buffer["x"][1].tolist() == [200, 201, 202, 203]
    assert exp.buffer["x"][2].tolist() == [104, 105, 106, 107]
    assert exp.buffer["x"][3].tolist() == [204, 205, 206, 207]
    exp.reset_for_rollout()
    assert not exp.ready_for_training and exp.ep_lengths.tolist() == [0, 0] and exp.ep_indices.tolist() == [0, 1]


def test_store_when_rows_wrap_around_the_buffer():
    """3 agents, 4 rows of 2 steps: the agents' rows go [0, 1, 2] -> [3, 0, 1] -> [2, 3, 0] (the
    last two are not a consecutive range: the indexed-write path) -> [1, 2, 3]."""
    exp = make(total_agents=3, batch_size=8, horizon=2, minibatch=4, max_minibatch=4)
    seen = []
    for step in range(6):
        if step % 2 == 0:
            seen.append(exp.ep_indices.tolist())
        td = TensorDict({"x": torch.tensor([10.0, 20.0, 30.0]) + step, "obs": torch.zeros(3, 2)}, batch_size=[3])
        exp.store(td, slice(0, 3))
    assert seen == [[0, 1, 2], [3, 0, 1], [2, 3, 0]] and exp.ep_indices.tolist() == [1, 2, 3]
    # agent a writes 10*(a+1) + step; each row holds the last agent that filled it
    assert exp.buffer["x"].tolist() == [[34, 35], [32, 33], [14, 15], [24, 25]]


def test_store_rejects_missing_fields_and_non_slices():
    exp = make()
    with pytest.raises(MettaError, match=r"missing buffer fields \['obs'\]"):
        exp.store(TensorDict({"x": torch.zeros(2)}, batch_size=[2]), slice(0, 2))
    with pytest.raises(MettaError, match="env_id must be a slice"):
        exp.store(TensorDict({"x": torch.zeros(2), "obs": torch.zeros(2, 2)}, batch_size=[2]), [0, 1])


def test_duplicate_field_with_other_spec():
    with pytest.raises(MettaError, match="'x' is declared twice"):
        SPEC.merge(ExperienceSpec({"x": FieldSpec((3,))}))
