"""Throughput on a MettaGrid arena: raw random stepping, a plain PyTorch PPO loop, the core trainer, TorchRL.

    python -m benchmarks.mettagrid_throughput [--env mettagrid:arena-24] [--num-envs 2]
                                              [--iterations 2] [--repeats 3] [--json runs/mg_throughput.json]

Agent-steps per second of wall time and per CPU-second of this process (``time.process_time``,
which other processes' load disturbs less), median over ``--repeats`` rounds that run the three
in turn (four, each with its own env):

* ``random``: ``MettaGridEnvironment`` stepped with uniform random actions (no policy), the
  ceiling of any trainer on this env;
* ``plain loop``: the same rollout (``GridCNN`` forward per step into ``[horizon, rows]`` tensors)
  and a CleanRL-style PPO phase (GAE, clipped surrogate, value and entropy terms, same epochs,
  minibatch size, Adam and gradient clip) written as one plain function, no ``Experience``,
  ``Loss`` or ``TensorDict`` plumbing;
* ``core``: ``CoreRun.iteration`` (``CoreTrainingLoop`` + ``PPO``) with the same sizes and network;
* ``torchrl``: ``TorchRLRun.iteration`` (``MettaGridEnv`` + ``Collector`` + ``MettaPPOPhase``) with
  the same network; its batch is the smallest multiple of both ``rows x horizon`` and the minibatch
  size that is >= ``BATCH`` (TorchRL rows are whole: 6144 on arena-24 with 2 envs), the same
  minibatch size and epochs;
* ``rllib``: ``algo.train()`` of ``metta-bridges train --framework rllib`` (``MettaGridMultiAgentEnv``
  per simulation, ``GridCNNModule``, ``MettaPPOLearner``; env runner and learner in this process, so
  the CPU time is comparable). ``rllib_breakdown`` says where its time goes, in CPU seconds per
  iteration: sampling (of which env steps and the module's forward; the rest is RLlib's episode,
  connector and metrics bookkeeping) and the learner update (of which the layout connector: stream
  layout, and a value pass over the slots that are not rollout steps, the rollout's values coming
  from the episodes; the rest is the training phase).

The issue-13 goal is core and bridges >= 0.7x the plain loop. No assertion: read the table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from benchmarks import write_json
from metta_core.cnn_policy import GridCNN
from metta_core.config import ADAM_EPS, PPOConfig
from metta_core.envs import make_training_env
from metta_core.run import CoreRun, TrainArgs
from bridges.torchrl.train import TorchRLRun

BATCH, HORIZON, MINIBATCH, EPOCHS = 4096, 32, 1024, 2


def timed(fn, agent_steps: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return agent_steps / (time.perf_counter() - wall), agent_steps / (time.process_time() - cpu)


class RandomStepping:
    def __init__(self, env_id: str, num_envs: int) -> None:
        self.env = make_training_env(env_id, num_envs, 0)
        self.rng = np.random.default_rng(0)

    def iteration(self) -> None:
        for _ in range(BATCH // self.env.num_agents):
            self.env.get_observations()
            self.env.send_actions(self.rng.integers(0, self.env.single_action_space.n, self.env.num_agents))


class PlainLoop:
    """Rollout of ``BATCH // rows`` steps, then ``EPOCHS`` passes of shuffled minibatches."""

    def __init__(self, env_id: str, num_envs: int) -> None:
        torch.manual_seed(0)
        self.env = make_training_env(env_id, num_envs, 0)
        self.policy = GridCNN(self.env.single_observation_space, self.env.single_action_space, self.env.feature_scale)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=1e-3, eps=ADAM_EPS)
        self.cfg = PPOConfig()
        self.steps = BATCH // self.env.num_agents

    def iteration(self) -> None:
        n, t_max, cfg = self.env.num_agents, self.steps, self.cfg
        obs = torch.zeros(t_max, n, *self.env.single_observation_space.shape, dtype=torch.uint8)
        actions = torch.zeros(t_max, n, dtype=torch.long)
        logp, values, rewards, dones = (torch.zeros(t_max, n) for _ in range(4))
        for t in range(t_max):
            o, r, d, _, _ = self.env.get_observations()
            obs[t], rewards[t], dones[t] = torch.as_tensor(o), torch.as_tensor(r), torch.as_tensor(d)
            with torch.no_grad():
                td = self.policy(TensorDict({"env_obs": obs[t]}, [n]))
            actions[t], logp[t], values[t] = td["actions"], td["act_log_prob"], td["values"]
            self.env.send_actions(td["actions"].numpy())
        advantages = torch.zeros(t_max, n)
        last = torch.zeros(n)
        for t in reversed(range(t_max - 1)):  # rewards[t + 1] follows the action at t
            not_done = 1.0 - dones[t + 1]
            delta = rewards[t + 1] + cfg.gamma * values[t + 1] * not_done - values[t]
            last = delta + cfg.gamma * cfg.gae_lambda * not_done * last
            advantages[t] = last
        returns = advantages + values
        flat = [x.reshape(t_max * n, *x.shape[2:]) for x in (obs, actions, logp, values, advantages, returns)]
        for _ in range(EPOCHS):
            for idx in torch.randperm(t_max * n).split(MINIBATCH):
                b_obs, b_act, b_logp, b_val, b_adv, b_ret = (x[idx] for x in flat)
                td = self.policy(TensorDict({"env_obs": b_obs}, [len(idx)]), action=b_act)
                b_adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)
                ratio = (td["act_log_prob"] - b_logp).exp()
                pg = torch.max(-b_adv * ratio, -b_adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                v_clipped = b_val + (td["values"] - b_val).clamp(-cfg.vf_clip_coef, cfg.vf_clip_coef)
                v_loss = 0.5 * torch.max((td["values"] - b_ret) ** 2, (v_clipped - b_ret) ** 2).mean()
                loss = pg + cfg.vf_coef * v_loss - cfg.ent_coef * td["entropy"].mean()
                self.optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()


class RLlibBridge:
    """``metta-bridges train --framework rllib``'s algorithm, one ``algo.train()`` per iteration.

    ``breakdown`` holds, per iteration, the CPU seconds of this process spent in the env runner's
    ``sample()`` (of which the vector env's ``step`` and the module's forward) and in the learner's
    ``update()`` (of which the layout connector, ``_make_batch_if_necessary``)."""

    def __init__(self, env_id: str, num_envs: int) -> None:
        from bridges.rllib.cluster import init_private_ray
        from bridges.rllib.train import build_config

        init_private_ray()
        args = TrainArgs(framework="rllib", env=env_id, num_envs=num_envs, batch_size=BATCH, bptt_horizon=HORIZON,
                         minibatch_size=MINIBATCH, update_epochs=EPOCHS, progress=False)
        self.algo = build_config(args).build_algo()
        self.breakdown: list[dict[str, float]] = []
        self._cpu: dict[str, float] = {}
        runner, learner = self.algo.env_runner, self.algo.learner_group._learner
        for obj, method, key in ((runner, "sample", "sampling"), (runner.env, "step", "env_step"),
                                 (runner.module, "forward_exploration", "module_forward"),
                                 (learner, "update", "learner_update"),
                                 (learner, "_make_batch_if_necessary", "layout_connector")):
            self._time(obj, method, key)

    def _time(self, obj, method: str, key: str) -> None:
        """Replace ``obj.method`` by a wrapper adding its CPU time to ``self._cpu[key]``."""
        inner = getattr(obj, method)

        def timed_call(*args, **kwargs):
            started = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self._cpu[key] = self._cpu.get(key, 0.0) + time.process_time() - started

        setattr(obj, method, timed_call)

    def iteration(self) -> None:
        self._cpu = {}
        self.algo.train()
        self.breakdown.append({f"{k}_cpu_s": v for k, v in self._cpu.items()})

    def close(self) -> None:
        import ray

        self.algo.stop()
        ray.shutdown()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mettagrid_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="mettagrid:arena-24")
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    core = CoreRun(TrainArgs(env=args.env, num_envs=args.num_envs, batch_size=BATCH, bptt_horizon=HORIZON,
                             minibatch_size=MINIBATCH, update_epochs=EPOCHS, progress=False))
    block = math.lcm(core.env.num_agents * HORIZON, MINIBATCH)  # TorchRL rows are whole, minibatches too
    torchrl_batch = -(-BATCH // block) * block
    torchrl = TorchRLRun(TrainArgs(framework="torchrl", env=args.env, num_envs=args.num_envs, batch_size=torchrl_batch,
                                   bptt_horizon=HORIZON, minibatch_size=MINIBATCH, update_epochs=EPOCHS, progress=False))
    rllib = RLlibBridge(args.env, args.num_envs)
    runs = {"random": RandomStepping(args.env, args.num_envs), "plain loop": PlainLoop(args.env, args.num_envs),
            "core": core, "torchrl": torchrl, "rllib": rllib}
    batches = {name: torchrl_batch if name == "torchrl" else BATCH for name in runs}
    for run in runs.values():  # warm-up
        run.iteration()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            samples[name].append(timed(lambda: [run.iteration() for _ in range(args.iterations)],
                                       args.iterations * batches[name]))
    table = {
        name: {"agent_steps_per_s": statistics.median(s[0] for s in rows),
               "agent_steps_per_cpu_s": statistics.median(s[1] for s in rows)}
        for name, rows in samples.items()
    }
    plain = table["plain loop"]
    result = {"env": args.env, "rows": core.env.num_agents, "batch": BATCH, "torchrl_batch": torchrl_batch,
              "minibatch": MINIBATCH, "epochs": EPOCHS, "table": table,
              **{f"{name}_over_plain_{unit}": table[name][f"agent_steps_per_{key}"] / plain[f"agent_steps_per_{key}"]
                 for name in ("core", "torchrl", "rllib") for unit, key in (("wall", "s"), ("cpu", "cpu_s"))},
              "rllib_breakdown": {k: statistics.median(b[k] for b in rllib.breakdown[1:]) for k in rllib.breakdown[0]}}
    rllib.close()
    print(json.dumps(result, indent=2))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
