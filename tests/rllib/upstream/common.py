"""Shared pieces of the ported RLlib tests: tiny Metta configs and RLlib's result values."""

from __future__ import annotations

import gymnasium as gym

from bridges.rllib import metta_ppo_config

ENV = gym.make("CartPole-v1")


def tiny_config(env: str | None = "CartPole-v1", **metta_fields):
    """Metta's PPO on RLlib at test size: rows of 8, one 32-step minibatch per 64-step update."""
    fields = dict(batch_size=64, bptt_horizon=8, minibatch_size=32, update_epochs=1)
    fields.update(metta_fields)
    return (
        metta_ppo_config(env, **fields)
        .rl_module(model_config={"fcnet_hiddens": [10, 10], "fcnet_activation": "linear", "head_fcnet_hiddens": []})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=1)
        .debugging(seed=0)
    )


def value(x):
    """A reduced metric: RLlib 2.60's ``MetricsLogger.reduce()`` returns Stats objects."""
    return x.peek() if hasattr(x, "peek") else x
