"""Recurrent policies in the core loop and run: last_actions, stored states in the buffer,
CartPoleNoVel-v1, --policy and resume."""

import gymnasium as gym
import pytest
import torch

from bridges.cli import main
from metta_core.config import PPOConfig, TrainerConfig
from metta_core.experience import Experience
from metta_core.gym_env import GymVectorEnvironment
from metta_core.loop import ComponentContext, CoreTrainingLoop
from metta_core.ppo import PPO
from metta_core.recurrent_policy import RecurrentActorCritic
from metta_core.run import CoreRun, TrainArgs

SMALL = dict(num_envs=4, batch_size=256, bptt_horizon=16, minibatch_size=64, update_epochs=2, progress=False,
             hidden_size=8, target_return=None, env="CartPoleNoVel-v1")


def rollout_loop(policy, agents=4, horizon=16, batch=256):
    env = GymVectorEnvironment("CartPole-v1", agents, seed=0)
    trainer = TrainerConfig(batch_size=batch, bptt_horizon=horizon, minibatch_size=64)
    ppo = PPO(policy, trainer, env, "cpu", "ppo", PPOConfig())
    spec = policy.get_agent_experience_spec().merge(ppo.get_experience_spec())
    exp = Experience(agents, batch, horizon, 64, 32768, spec)
    opt = torch.optim.Adam(policy.parameters())
    ctx = ComponentContext(policy=policy, experience=exp, optimizer=opt, config=trainer)
    loop = CoreTrainingLoop(policy, exp, {"ppo": ppo}, opt, "cpu", ctx)
    ppo.on_new_training_run(ctx)
    return loop, ctx, env, exp


def test_last_actions_are_each_agents_previous_action_kept_across_episode_ends():
    torch.manual_seed(0)
    policy = RecurrentActorCritic(gym.spaces.Box(-5, 5, (4,)), gym.spaces.Discrete(2), hidden_size=4,
                                  condition_on_last_action=True)
    loop, ctx, env, exp = rollout_loop(policy)
    loop.on_epoch_start(ctx)
    loop.rollout_phase(env, ctx)
    b = exp.buffer  # rows 0..3 hold the agents' first 16 steps
    assert (b["last_actions"][:4, 0] == 0).all()
    assert torch.equal(b["last_actions"][:, 1:], b["actions"][:, :-1])
    restarts = (b["dones"][:, 1:] + b["truncateds"][:, 1:]) > 0
    assert restarts.any()  # an episode started inside a row: its first step still sees the previous action
    assert torch.equal(b["last_actions"][:, 1:][restarts], b["actions"][:, :-1][restarts])
    # the next rollout continues from where this one left, and the buffer keeps the stored states
    assert torch.equal(loop.last_action, b["actions"][-4:, -1])  # rows 12..15: the agents' last steps
    assert b["actor_lstm_h"].abs().sum() > 0


def test_feed_forward_and_recurrent_policies_get_whole_rows(monkeypatch):
    torch.manual_seed(0)
    policy = RecurrentActorCritic(gym.spaces.Box(-5, 5, (4,)), gym.spaces.Discrete(2), hidden_size=4)
    loop, ctx, env, exp = rollout_loop(policy)
    loop.on_epoch_start(ctx)
    loop.rollout_phase(env, ctx)
    shapes = []
    forward = policy.forward
    monkeypatch.setattr(policy, "forward", lambda td, action=None: shapes.append(td.batch_size) or forward(td, action))
    stats, _ = loop.training_phase(ctx, update_epochs=1)
    assert shapes == [torch.Size([4, 16])] * exp.num_minibatches
    assert abs(stats["importance"] - 1) < 0.1  # the unroll reproduces the rollout's log-probs


def test_cartpole_no_velocity_is_registered_by_the_core_env_and_hides_velocities():
    env = GymVectorEnvironment("CartPoleNoVel-v1", 2, seed=0)
    full = GymVectorEnvironment("CartPole-v1", 2, seed=0)
    assert env.single_observation_space.shape == (2,)
    torch.testing.assert_close(torch.as_tensor(env.get_observations()[0]), torch.as_tensor(full.get_observations()[0][:, [0, 2]]))
    assert gym.spec("CartPoleNoVel-v1").max_episode_steps == 500


def test_lstm_run_resumes_exactly(tmp_path):
    args = dict(SMALL, policy="lstm")
    straight = CoreRun(TrainArgs(**args, out_dir=tmp_path / "a"))
    rows_straight = [straight.iteration() for _ in range(3)]
    first = CoreRun(TrainArgs(**args, out_dir=tmp_path / "b"))
    rows = [first.iteration() for _ in range(2)]
    first.save(tmp_path / "ckpt.pt")
    resumed = CoreRun(TrainArgs(**args, out_dir=tmp_path / "b"))
    resumed.load(tmp_path / "ckpt.pt", trust=True)  # the env's mid-episode state too
    rows.append(resumed.iteration())
    for ra, rb in zip(rows_straight, rows):
        ra.pop("steps_per_second"), rb.pop("steps_per_second")
        assert ra == rb
    assert isinstance(straight.policy, RecurrentActorCritic)


def test_gru_policy_from_the_cli(tmp_path, capsys):
    code = main(["train", "--policy", "gru", "--env", "CartPoleNoVel-v1", "--total-timesteps", "256", "--num-envs", "4",
                 "--batch-size", "256", "--bptt-horizon", "16", "--minibatch-size", "64", "--hidden-size", "8",
                 "--no-progress", "--out-dir", str(tmp_path)])
    assert code == 0 and '"env_steps": 256' in capsys.readouterr().out


@pytest.mark.parametrize("action_space", [gym.spaces.Discrete(3), gym.spaces.Box(-1, 1, (2,))])
def test_actor_critic_on_rows_gives_the_flat_numbers_bit_for_bit(action_space):
    from tensordict import TensorDict

    from metta_core.policy import ActorCritic

    torch.manual_seed(0)
    policy = ActorCritic(gym.spaces.Box(-1, 1, (4,)), action_space, (8,))
    rows = TensorDict({"env_obs": torch.randn(3, 5, 4)}, batch_size=[3, 5])
    with torch.no_grad():
        actions = policy(rows.clone())["actions"]
        on_rows = policy(rows.clone(), action=actions)
        flat = policy(rows.reshape(-1).clone(), action=actions.reshape(-1, *actions.shape[2:]))
    for key in ("act_log_prob", "entropy", "values"):
        assert torch.equal(on_rows[key].reshape(-1), flat[key])
