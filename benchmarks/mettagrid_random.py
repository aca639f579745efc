"""The random-policy level of a MettaGrid preset: mean reward per agent-step of uniform actions.

    python -m benchmarks.mettagrid_random [--env mettagrid:arena-8] [--num-envs 8] [--seed 0]
                                          [--agent-steps 200000] [--json runs/mettagrid_random.json]

Measured as ``metta-bridges train`` measures a policy's ``reward_per_agent_step``: the same env
(``make_training_env``, same ``--num-envs`` and ``--seed``), total reward over total agent-steps,
reported overall and as the spread over 4096-agent-step chunks (one core rollout each). A trained
policy's level is read against this one (the issue-13 goal is at least 5x).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks import write_json
from metta_core.envs import make_training_env

CHUNK = 4096


def random_level(env_id: str, num_envs: int, seed: int, agent_steps: int) -> dict:
    env = make_training_env(env_id, num_envs, seed)
    rng = np.random.default_rng(seed)
    chunks: list[float] = []
    total, steps, chunk_reward, chunk_steps = 0.0, 0, 0.0, 0
    while steps < agent_steps:
        env.send_actions(rng.integers(0, env.single_action_space.n, env.num_agents))
        reward = float(env.get_observations()[1].sum())
        total, steps = total + reward, steps + env.num_agents
        chunk_reward, chunk_steps = chunk_reward + reward, chunk_steps + env.num_agents
        if chunk_steps >= CHUNK:
            chunks.append(chunk_reward / chunk_steps)
            chunk_reward, chunk_steps = 0.0, 0
    env.close()
    return {
        "env": env_id, "num_envs": num_envs, "seed": seed, "agent_steps": steps,
        "reward_per_agent_step": total / steps,
        "chunk_min": min(chunks), "chunk_median": statistics.median(chunks), "chunk_max": max(chunks),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mettagrid_random", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="mettagrid:arena-8")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--agent-steps", type=int, default=200_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = random_level(args.env, args.num_envs, args.seed, args.agent_steps)
    print(json.dumps(result, indent=2))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
