"""CoreTrainingLoop + PPO against a separately written reference of one training phase (SPEC §4)."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict

from metta_core.config import PPOConfig, TrainerConfig
from metta_core.experience import Experience
from metta_core.policy import ActorCritic
from metta_core.ppo import PPO
from metta_core.loop import ComponentContext, CoreTrainingLoop
from tests.reference import advantage_loop, ppo_terms, sample_probabilities

OBS = gym.spaces.Box(-1, 1, (3,), np.float32)


class FakeEnv:
    single_action_space = gym.spaces.Discrete(3)
    single_observation_space = OBS


def filled_setup(ppo_cfg, trainer_cfg, agents=2, seed=0, hidden=(8,)):
    torch.manual_seed(seed)
    policy = ActorCritic(OBS, FakeEnv.single_action_space, hidden)
    gen = torch.Generator().manual_seed(seed)
    ppo = PPO(policy, trainer_cfg, FakeEnv(), "cpu", "ppo", ppo_cfg, gen)
    spec = policy.get_agent_experience_spec().merge(ppo.get_experience_spec())
    exp = Experience(agents, trainer_cfg.batch_size, trainer_cfg.bptt_horizon, trainer_cfg.minibatch_size,
                     trainer_cfg.max_minibatch_size, spec)
    g = torch.Generator().manual_seed(seed + 100)
    shape = exp.buffer.batch_size
    exp.buffer["env_obs"] = torch.randn(*shape, 3, generator=g)
    exp.buffer["actions"] = torch.randint(0, 3, shape, generator=g)
    with torch.no_grad():
        out = policy(exp.buffer.reshape(-1).select("env_obs").clone(), action=exp.buffer["actions"].reshape(-1))
    # stored log-probs/values off the current policy so ratios differ from 1
    exp.buffer["act_log_prob"] = out["act_log_prob"].reshape(shape) + torch.randn(shape, generator=g) * 0.3
    exp.buffer["values"] = out["values"].reshape(shape) + torch.randn(shape, generator=g) * 0.5
    exp.buffer["rewards"] = torch.randn(shape, generator=g)
    exp.buffer["dones"] = (torch.rand(shape, generator=g) < 0.1).float()
    opt = torch.optim.Adam(policy.parameters(), lr=0.01)
    ctx = ComponentContext(policy=policy, experience=exp, optimizer=opt, config=trainer_cfg, epoch=3)
    loop = CoreTrainingLoop(policy, exp, {"ppo": ppo}, opt, "cpu", ctx)
    return loop, ctx


def reference_phase(policy, optimizer, buffer, ppo_cfg, trainer_cfg, epoch, gen):
    """SPEC §4 written out directly; returns (tracked stats lists, epochs trained)."""
    segments, horizon = buffer.batch_size
    mb_size = min(trainer_cfg.minibatch_size, trainer_cfg.max_minibatch_size)
    accumulate = max(1, trainer_cfg.minibatch_size // trainer_cfg.max_minibatch_size)
    mb_segments = mb_size // horizon
    num_mb = segments // mb_segments
    prio = ppo_cfg.prioritized_experience_replay
    tracked = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "importance", "current_logprobs")}
    epochs = 0
    for _ in range(trainer_cfg.update_epochs):
        stop = False
        for mb_idx in range(num_mb):
            if mb_idx % accumulate == 0:
                optimizer.zero_grad()
            if ppo_cfg.target_kl is not None and mb_idx > 0 and np.mean(tracked["approx_kl"]) > ppo_cfg.target_kl:
                stop = True
            if mb_idx == 0:
                beta = prio.prio_beta0 + (1 - prio.prio_beta0) * prio.prio_alpha * epoch / max(1, trainer_cfg.total_timesteps // trainer_cfg.batch_size)
                a0 = torch.tensor(advantage_loop(buffer["values"], buffer["rewards"], buffer["dones"], torch.ones(segments, horizon),
                                                 ppo_cfg.gamma, ppo_cfg.gae_lambda, ppo_cfg.vtrace.rho_clip, ppo_cfg.vtrace.c_clip))
            probs = torch.tensor(sample_probabilities(a0.numpy(), prio.prio_alpha))
            idx = torch.multinomial(probs, mb_segments, replacement=False, generator=gen)
            prio_w = (segments * probs[idx, None]) ** -beta
            mb = buffer[idx]
            out = policy(mb.reshape(-1).select("env_obs").clone(), action=mb["actions"].reshape(-1))
            terms = ppo_terms(ppo_cfg, mb["act_log_prob"], out["act_log_prob"].reshape(mb_segments, horizon),
                              out["entropy"].reshape(mb_segments, horizon), out["values"].reshape(mb_segments, horizon),
                              mb["values"], mb["rewards"], mb["dones"], a0[idx], prio_w)
            for k in tracked:
                tracked[k].append(float(terms[k].detach()))
            if stop:
                break
            terms["loss"].backward()
            if (mb_idx + 1) % accumulate == 0:
                torch.nn.utils.clip_grad_norm_(list(policy.parameters()), ppo_cfg.max_grad_norm)
                optimizer.step()
        epochs += 1
        if stop:
            break
    return tracked, epochs


CASES = {
    "defaults": (PPOConfig(), TrainerConfig(batch_size=128, bptt_horizon=8, minibatch_size=32, update_epochs=2, total_timesteps=1280)),
    "prio_accumulate": (
        PPOConfig(max_grad_norm=0.05).update({"prioritized_experience_replay.prio_alpha": 0.6, "vtrace.rho_clip": 0.7, "vtrace.c_clip": 1.5}),
        TrainerConfig(batch_size=128, bptt_horizon=8, minibatch_size=64, max_minibatch_size=32, update_epochs=3, total_timesteps=1280),
    ),
    "target_kl_stops": (
        PPOConfig(target_kl=1e-4, clip_vloss=False, norm_adv=False),
        TrainerConfig(batch_size=128, bptt_horizon=8, minibatch_size=16, update_epochs=4, total_timesteps=1280),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_training_phase_matches_reference(case):
    ppo_cfg, trainer_cfg = CASES[case]
    loop, ctx = filled_setup(ppo_cfg, trainer_cfg)
    ref_policy = copy.deepcopy(loop.policy)
    ref_opt = torch.optim.Adam(ref_policy.parameters(), lr=0.01)
    buffer = loop.experience.buffer.clone()
    stats, epochs = loop.training_phase(ctx, trainer_cfg.update_epochs, ppo_cfg.max_grad_norm)
    tracked, ref_epochs = reference_phase(ref_policy, ref_opt, buffer, ppo_cfg, trainer_cfg, ctx.epoch, torch.Generator().manual_seed(0))
    assert epochs == ref_epochs
    if case == "target_kl_stops":
        assert epochs == 1 and len(tracked["approx_kl"]) < loop.experience.num_minibatches
    for key, values in tracked.items():
        assert stats[key] == pytest.approx(np.mean(values), rel=1e-5, abs=1e-6), key
    for (name, p), q in zip(loop.policy.named_parameters(), ref_policy.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(loop.experience.buffer["values"], buffer["values"])  # the phase leaves the buffer unchanged
    a0 = advantage_loop(buffer["values"], buffer["rewards"], buffer["dones"], torch.ones(buffer.batch_size),
                        ppo_cfg.gamma, ppo_cfg.gae_lambda, ppo_cfg.vtrace.rho_clip, ppo_cfg.vtrace.c_clip)
    ev = 1 - a0.var(ddof=1) / (a0 + buffer["values"].numpy()).var(ddof=1)
    assert stats["explained_variance"] == pytest.approx(ev, rel=1e-4)


def test_phase_is_deterministic_with_a_generator():
    ppo_cfg, trainer_cfg = CASES["prio_accumulate"]
    results = []
    for _ in range(2):
        loop, ctx = filled_setup(ppo_cfg, trainer_cfg)
        loop.training_phase(ctx, trainer_cfg.update_epochs, ppo_cfg.max_grad_norm)
        results.append([p.detach().clone() for p in loop.policy.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_zero_loss_when_ppo_is_out_of_schedule():
    ppo_cfg = PPOConfig().update({"schedule.start_epoch": 10})
    trainer_cfg = CASES["defaults"][1]
    loop, ctx = filled_setup(ppo_cfg, trainer_cfg)
    before = [p.detach().clone() for p in loop.policy.parameters()]
    stats, _ = loop.training_phase(ctx, 1, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, loop.policy.parameters()))
    assert "policy_loss" not in stats


def test_rollout_skips_burn_in_steps():
    trainer_cfg = TrainerConfig(batch_size=16, bptt_horizon=4, minibatch_size=8, total_timesteps=160)
    policy = ActorCritic(OBS, FakeEnv.single_action_space, (4,))
    policy.burn_in_steps = 3
    ppo = PPO(policy, trainer_cfg, FakeEnv(), "cpu", "ppo", PPOConfig())
    spec = policy.get_agent_experience_spec().merge(ppo.get_experience_spec())
    exp = Experience(2, 16, 4, 8, 8, spec)
    ppo.attach_replay_buffer(exp)
    ctx = ComponentContext(policy=policy, experience=exp, optimizer=None, config=trainer_cfg, training_env_id=slice(0, 2))
    for step in range(5):
        td = TensorDict({"env_obs": torch.randn(2, 3), "rewards": torch.full((2,), float(step)), "dones": torch.zeros(2),
                         "truncateds": torch.zeros(2)}, batch_size=[2])
        ppo.rollout(td, ctx)
        assert "actions" in td.keys() and "values" in td.keys()
    assert exp.buffer["rewards"][0, :2].tolist() == [3.0, 4.0] and exp.ep_lengths.tolist() == [2, 2]
