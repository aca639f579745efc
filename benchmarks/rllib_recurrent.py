"""Recurrent training phase on RLlib: ``MettaPPOLearner`` vs RLlib's ``PPOTorchLearner`` vs the core.

    python -m benchmarks.rllib_recurrent [--repeats 10] [--threads 1] [--clock cpu] [--json runs/bench_rllib_recurrent.json]

Problem: CartPole-like (4 floats, 2 actions), the core's ``RecurrentActorCritic`` (LSTM, separate
actor and critic trunks, ``hidden``) in all three, minibatches of ``[S, T]`` rows, one epoch of
``RLLIB_MINIBATCHES`` minibatches over a batch of ``RLLIB_MINIBATCHES * S`` rows.

- ``rllib PPOTorchLearner`` (the anchor): RLlib's own PPO learner with ``MettaRecurrentModule`` and
  ``max_seq_len = T``; its default learner pipeline (``AddStatesFromEpisodesToBatch``,
  ``AddTimeDimToBatchAndZeroPad``, one extra timestep per episode, value forward, GAE), then its
  minibatch loop over ``[B, T]`` sequences.
- ``rllib MettaPPOLearner``: the bridge with the same module, lr, clip and coefficients:
  ``MettaLayoutConnector`` (stored states, rows, value forward on the rows, first-pass advantage)
  and Metta's phase (prioritized segments, row forward from the stored states, Metta's loss).
- ``core``: ``CoreTrainingLoop.training_phase`` on an ``Experience`` holding the same number of
  ``[T]`` rows with stored states (no connector: the values were stored at rollout).

Episodes: terminated chunks of ``T - 1`` steps with random stored states, so each one is exactly
one row in the Metta layout (``L + 1`` slots) and one ``max_seq_len`` sequence in RLlib's (one
extra timestep): neither side trains on padding. One sample = one update on fresh copies of the
episodes (copied outside the timer). Times are medians of interleaved repeats, CPU time by default;
ratios against ``PPOTorchLearner`` (goal of issue 12: <= 1.10). No assertion on time.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from benchmarks import write_json
from benchmarks.overhead import CLOCKS, RLLIB_MINIBATCHES, measure, set_threads, timing_parser, update_cases
from metta_core.config import PPOConfig, TrainerConfig

SHAPES = [(16, 32, 64), (64, 32, 64), (64, 64, 128)]
"""``(S rows per minibatch, T = bptt_horizon, hidden)``."""

OBS_DIM, N_ACTIONS = 4, 2


def episodes_for(shape: tuple[int, int, int], seed: int = 0) -> list:
    """``RLLIB_MINIBATCHES * S`` terminated chunks of ``T - 1`` steps with random ``STATE_OUT``."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    s, t, hidden = shape
    rng = np.random.default_rng(seed)
    length = t - 1
    keys = ("actor_lstm_h", "actor_lstm_c", "critic_lstm_h", "critic_lstm_c")
    episodes = []
    for _ in range(RLLIB_MINIBATCHES * s):
        states = [{k: rng.normal(0, 0.1, (1, hidden)).astype(np.float32) for k in keys} for _ in range(length)]
        episodes.append(SingleAgentEpisode(
            observations=list(rng.normal(size=(length + 1, OBS_DIM)).astype(np.float32)),
            actions=list(rng.integers(0, N_ACTIONS, length)),
            rewards=list(np.ones(length, dtype=np.float32)),
            extra_model_outputs={
                Columns.ACTION_LOGP: list(rng.normal(-0.7, 0.1, length).astype(np.float32)),
                Columns.ACTION_DIST_INPUTS: list(rng.normal(0.0, 0.1, (length, N_ACTIONS)).astype(np.float32)),
                Columns.STATE_OUT: states,
            },
            terminated=True,
            len_lookback_buffer=0,
        ).to_numpy())
    return episodes


def learners(shape: tuple[int, int, int]) -> dict:
    """``MettaPPOLearner`` and ``PPOTorchLearner`` with ``MettaRecurrentModule`` and the same settings."""
    from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from bridges.rllib import metta_ppo_config
    from bridges.rllib.recurrent import MettaRecurrentModule

    s, t, hidden = shape
    minibatch, ppo = s * t, PPOConfig()
    metta = metta_ppo_config("CartPole-v1", batch_size=RLLIB_MINIBATCHES * minibatch, minibatch_size=minibatch,
                             bptt_horizon=t, update_epochs=1)
    native = RLlibPPOConfig().environment("CartPole-v1").training(
        train_batch_size_per_learner=RLLIB_MINIBATCHES * minibatch, minibatch_size=minibatch, num_epochs=1,
        gamma=ppo.gamma, lambda_=ppo.gae_lambda, clip_param=ppo.clip_coef, entropy_coeff=ppo.ent_coef,
        vf_loss_coeff=ppo.vf_coef, grad_clip=ppo.max_grad_norm, grad_clip_by="global_norm", use_kl_loss=False,
        kl_coeff=0.0, shuffle_batch_per_epoch=False,
    )
    spec = RLModuleSpec(module_class=MettaRecurrentModule)
    model = {"cell": "lstm", "hidden_size": hidden, "max_seq_len": t}
    return {
        name: config.training(lr=3e-4).rl_module(rl_module_spec=spec, model_config=model).debugging(seed=0)
        .build_learner(env=gym.make("CartPole-v1"))
        for name, config in (("rllib MettaPPOLearner", metta), ("rllib PPOTorchLearner", native))
    }


def rllib_cases(shape, clock) -> dict[str, Callable[[], float]]:
    return update_cases(episodes_for(shape), learners(shape), shape[0] * shape[1], clock)


def core_case(shape, clock) -> Callable[[], float]:
    """``CoreTrainingLoop.training_phase`` on ``RLLIB_MINIBATCHES * S`` stored-state rows of ``T``."""
    from metta_core.experience import Experience
    from metta_core.loop import ComponentContext, CoreTrainingLoop
    from metta_core.ppo import PPO
    from metta_core.recurrent_policy import RecurrentActorCritic

    s, t, hidden = shape
    rows = RLLIB_MINIBATCHES * s
    obs_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
    act_space = gym.spaces.Discrete(N_ACTIONS)
    torch.manual_seed(0)
    policy = RecurrentActorCritic(obs_space, act_space, hidden)
    trainer = TrainerConfig(batch_size=rows * t, minibatch_size=s * t, bptt_horizon=t, update_epochs=1)
    ppo_cfg = PPOConfig()
    env = SimpleNamespace(single_observation_space=obs_space, single_action_space=act_space)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4, eps=1e-12)
    loss = PPO(policy, trainer, env, "cpu", "ppo", ppo_cfg, torch.Generator().manual_seed(0))
    spec = policy.get_agent_experience_spec().merge(loss.get_experience_spec())
    experience = Experience(1, trainer.batch_size, t, trainer.minibatch_size, trainer.max_minibatch_size, spec)
    g = torch.Generator().manual_seed(0)
    buffer = experience.buffer
    buffer["env_obs"] = torch.randn(rows, t, OBS_DIM, generator=g)
    buffer["actions"] = torch.randint(0, N_ACTIONS, (rows, t), generator=g)
    buffer["act_log_prob"] = -0.7 + 0.1 * torch.randn(rows, t, generator=g)
    buffer["values"] = torch.randn(rows, t, generator=g)
    buffer["rewards"] = torch.ones(rows, t)
    dones = torch.zeros(rows, t)
    dones[:, 0] = 1.0  # each row is one episode, as the RLlib chunks
    buffer["dones"] = dones
    buffer["truncateds"] = torch.zeros(rows, t)
    for key in policy.state_keys:
        buffer[key] = 0.1 * torch.randn(rows, t, 1, hidden, generator=g)
    context = ComponentContext(policy=policy, experience=experience, optimizer=optimizer, config=trainer, epoch=0)
    loop = CoreTrainingLoop(policy, experience, {"ppo": loss}, optimizer, "cpu", context)

    def sample() -> float:
        start = clock()
        loop.training_phase(context, 1, ppo_cfg.max_grad_norm)
        return clock() - start

    return sample


def main(argv=None) -> dict:
    args = timing_parser(__doc__, repeats=10).parse_args(argv)
    clock = CLOCKS[args.clock]
    set_threads(args.threads)
    results = []
    for shape in SHAPES:
        samples = {"core": core_case(shape, clock), **rllib_cases(shape, clock)}
        med = measure(samples, args.repeats)
        anchor = med["rllib PPOTorchLearner"]
        for case, seconds in med.items():
            results.append({"shape": list(shape), "case": case, "ms": seconds * 1e3,
                            "vs PPOTorchLearner": seconds / anchor, "vs core": seconds / med["core"]})
    print(f"threads={args.threads} repeats={args.repeats} clock={args.clock}; ms per phase "
          f"({RLLIB_MINIBATCHES} minibatches of [S, T] rows, LSTM hidden H)")
    print(f"{'[S, T, H]':>14}  {'case':<24} {'ms':>9}  {'vs PPOTorchLearner':>18}  {'vs core':>8}")
    for r in results:
        print(f"{str(r['shape']):>14}  {r['case']:<24} {r['ms']:>9.2f}  {r['vs PPOTorchLearner']:>18.3f}  "
              f"{r['vs core']:>8.3f}")
    write_json(args.json, {"threads": args.threads, "repeats": args.repeats, "clock": args.clock, "results": results})
    return {"results": results}


if __name__ == "__main__":
    main()
