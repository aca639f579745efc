"""Bad input to the RLlib bridge raises MettaError naming the column, setting or shape."""

from __future__ import annotations

import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from bridges.rllib import MettaLayoutConnector, metta_ppo_config
from metta_core.errors import MettaError
from tests.rllib.conftest import HORIZON, as_multi_agent, build, layout_batch, make_config


@pytest.mark.parametrize("column", [Columns.VF_PREDS, Columns.ADVANTAGES, Columns.LOSS_MASK, Columns.ACTION_LOGP])
def test_missing_column(learner, column):
    batch = layout_batch(learner)
    del batch[column]
    with pytest.raises(MettaError, match=rf"missing column\(s\) \['{column}'\].*MettaLayoutConnector"):
        learner.update(batch=as_multi_agent(batch))


def test_column_with_wrong_shape(learner):
    batch = layout_batch(learner)
    batch[Columns.REWARDS] = batch[Columns.REWARDS].reshape(-1, 1).expand(-1, 2).contiguous()
    with pytest.raises(MettaError, match=r"column 'rewards' has shape \(32, 2\), expected \(32,\)"):
        learner.update(batch=as_multi_agent(batch))


def test_slots_not_a_multiple_of_horizon(learner):
    batch = {c: v[:-3] for c, v in layout_batch(learner).items()}
    with pytest.raises(MettaError, match=rf"29 slots, not a multiple of bptt_horizon \({HORIZON}\)"):
        learner.update(batch=as_multi_agent(batch))


def test_wrong_dtype(learner):
    batch = layout_batch(learner)
    batch[Columns.REWARDS] = batch[Columns.REWARDS].double()
    with pytest.raises(MettaError, match=r"column 'rewards' must be float32, got torch.float64"):
        learner.update(batch=as_multi_agent(batch))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards(learner, bad):
    batch = layout_batch(learner)
    batch[Columns.REWARDS][5] = bad
    with pytest.raises(MettaError, match=r"column 'rewards' has 1 non-finite value"):
        learner.update(batch=as_multi_agent(batch))


def test_episode_without_logp(learner):
    ep = SingleAgentEpisode(
        observations=[[0.0] * 4] * 3, actions=[0, 1], rewards=[1.0, 1.0], len_lookback_buffer=0
    ).to_numpy()
    connector = MettaLayoutConnector.from_config(make_config())
    with pytest.raises(MettaError, match=r"no extra model output 'action_logp'"):
        connector(rl_module=learner.module, batch={}, episodes=[ep])


def test_unknown_and_out_of_range_settings():
    with pytest.raises(MettaError, match="clip_cof"):
        metta_ppo_config(clip_cof=0.2)
    with pytest.raises(MettaError, match="gamma"):
        metta_ppo_config(gamma=1.5)
    with pytest.raises(MettaError, match="rho_clip"):
        metta_ppo_config(**{"vtrace.rho_clip": -1.0})
    with pytest.raises(MettaError, match=r"minibatch_segments"):
        metta_ppo_config(batch_size=96, bptt_horizon=16, minibatch_size=64)


def test_rllib_copy_changed_without_metta_twin():
    config = make_config().training(clip_param=0.3)
    with pytest.raises(MettaError, match=r"config.clip_param \(0.3\) differs from Metta's clip_coef"):
        build(config)


def test_config_not_from_metta_ppo_config():
    from ray.rllib.algorithms.ppo import PPOConfig

    from bridges.rllib import MettaPPOLearner

    config = PPOConfig().environment("CartPole-v1").learners(learner_class=MettaPPOLearner)
    with pytest.raises(MettaError, match=r"learner_config_dict has no 'metta' entry.*metta_ppo_config"):
        build(config)


def test_module_output_without_values_api(learner):
    """A minibatch run through the loss checks the module output (action distribution inputs)."""
    batch = layout_batch(learner)
    with pytest.raises(MettaError, match="action_dist_inputs"):
        learner.compute_losses(fwd_out={DEFAULT_MODULE_ID: {"x": torch.zeros(1)}}, batch={DEFAULT_MODULE_ID: batch})


def test_stateful_module_episode_without_state_out_is_refused():
    """A ``use_lstm`` module's episodes must carry the per-step ``STATE_OUT`` the Metta layout stores as
    input states (SPEC §6); a chunk without it is a clear error (it used to die with ``KeyError: 'state_in'``)."""
    config = make_config().rl_module(model_config={"use_lstm": True, "lstm_cell_size": 8, "max_seq_len": HORIZON})
    learner = build(config)
    ep = SingleAgentEpisode(
        observations=[[0.0] * 4] * (HORIZON + 1), actions=[0] * HORIZON, rewards=[1.0] * HORIZON,
        extra_model_outputs={Columns.ACTION_LOGP: [0.0] * HORIZON}, len_lookback_buffer=0,
    ).to_numpy()
    connector = MettaLayoutConnector.from_config(config)
    with pytest.raises(MettaError, match=r"has no extra model output 'state_out', but .* is stateful"):
        connector(rl_module=learner.module, batch={}, episodes=[ep])
