"""The core trainer against a plain PyTorch PPO loop doing the same work with the same network.

    python -m benchmarks.trainer [--busy] [--repeats 5] [--iterations 8] [--threads 1] [--clock wall] [--json out.json]

Both sides, on CartPole-v1 with the ``metta-bridges train`` defaults (8 envs, 2048 env steps per
iteration, 4 epochs x 4 minibatches of 512, tanh MLPs 64x64, Adam lr 1e-3, grad-norm clip 0.5):

* ``core``: ``metta_core.run.CoreRun``, one ``iteration()`` at a time; the rollout phase
  (``CoreTrainingLoop.rollout_phase``) is timed on its own, the rest of the iteration is the phase.
* ``plain``: what a CleanRL-style script does: a gymnasium sync vector env (same autoreset mode),
  the same ``ActorCritic`` actor and critic MLPs called on plain tensors under ``no_grad``
  (``Categorical`` sample and log-prob, value), stores into preallocated ``[256, 8]`` tensors;
  the phase is CleanRL's GAE loop over time, then 4 epochs x 4 shuffled minibatches of 512
  (clipped policy and value losses, entropy bonus, per-minibatch advantage normalization, the
  approx-KL and clip-fraction statistics, backward, clip, Adam step).

Each side runs in its own process (``--worker``), ``--iterations`` timed iterations after one
warm-up; processes alternate (core, plain, plain, core, ...) ``--repeats`` times, and every cell
is the median over processes of the per-process median. ``--threads`` sets both sides' torch
threads (``OMP_NUM_THREADS`` too). ``--busy`` runs everything beside one spinning process per
core (``benchmarks.busy``). Ratios are core / plain: env steps/s (higher is faster, target
>= 0.7) and phase time (lower is faster, target <= 1.2). No assertion on time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import write_json
from benchmarks.busy import busy_machine, load_label

TARGETS = {"steps_per_s": 0.7, "phase": 1.2}
CLOCK = time.perf_counter
"""The workers' clock: wall time, or this process's CPU time with ``--clock cpu``."""
SIDES = ("core", "plain")


def run_core(iterations: int, num_envs: int = 8, batch_size: int = 2048) -> list[dict]:
    """``CoreRun`` with the CLI defaults; per iteration: env steps, rollout seconds, phase seconds."""
    from metta_core.run import CoreRun, TrainArgs

    run = CoreRun(TrainArgs(progress=False, target_return=None, stop_at_target=False,
                            num_envs=num_envs, batch_size=batch_size))
    rollout_phase = run.loop.rollout_phase
    timed: dict[str, float] = {}

    def timed_rollout(*args, **kwargs):
        start = CLOCK()
        result = rollout_phase(*args, **kwargs)
        timed["rollout"] = CLOCK() - start
        return result

    run.loop.rollout_phase = timed_rollout
    rows = []
    for i in range(iterations + 1):
        start = CLOCK()
        before = run.env_steps
        run.iteration()
        total = CLOCK() - start
        if i:  # the first iteration is the warm-up
            rows.append({"steps": run.env_steps - before, "rollout": timed["rollout"], "phase": total - timed["rollout"]})
    run.close()
    return rows


def run_plain(iterations: int, num_envs: int = 8, batch_size: int = 2048, seed: int = 0) -> list[dict]:
    """A CleanRL-style PPO loop (see the module docstring) on the core's network."""
    import gymnasium as gym
    import numpy as np
    import torch
    from torch.distributions import Categorical

    from metta_core.config import ADAM_EPS, PPOConfig
    from metta_core.policy import ActorCritic

    cfg = PPOConfig()  # Metta's coefficients, so both sides optimize the same objective sizes
    gamma, gae_lambda, clip, vf_clip = cfg.gamma, cfg.gae_lambda, cfg.clip_coef, cfg.vf_clip_coef
    vf_coef, ent_coef, max_grad_norm = cfg.vf_coef, cfg.ent_coef, cfg.max_grad_norm
    epochs, minibatch = 4, 512
    torch.manual_seed(seed)
    envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    net = ActorCritic(envs.single_observation_space, envs.single_action_space, (64, 64))
    actor, critic = net.actor, net.critic
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, eps=ADAM_EPS)
    steps = batch_size // num_envs
    obs_buf = torch.zeros(steps, num_envs, 4)
    actions = torch.zeros(steps, num_envs, dtype=torch.long)
    logprobs, rewards, dones, values = (torch.zeros(steps, num_envs) for _ in range(4))
    next_obs = torch.from_numpy(envs.reset(seed=seed)[0]).float()
    next_done = torch.zeros(num_envs)

    def rollout() -> None:
        nonlocal next_obs, next_done
        for t in range(steps):
            obs_buf[t] = next_obs
            dones[t] = next_done
            with torch.no_grad():
                dist = Categorical(logits=actor(next_obs))
                action = dist.sample()
                logprobs[t] = dist.log_prob(action)
                values[t] = critic(next_obs).flatten()
            actions[t] = action
            obs, reward, terminated, truncated, _ = envs.step(action.numpy())
            rewards[t] = torch.from_numpy(reward)
            next_obs = torch.from_numpy(obs).float()
            next_done = torch.from_numpy(np.logical_or(terminated, truncated)).float()

    def phase() -> None:
        with torch.no_grad():
            next_value = critic(next_obs).flatten()
            advantages = torch.zeros_like(rewards)
            last = torch.zeros(num_envs)
            for t in reversed(range(steps)):
                nonterminal = 1.0 - (next_done if t == steps - 1 else dones[t + 1])
                next_v = next_value if t == steps - 1 else values[t + 1]
                delta = rewards[t] + gamma * next_v * nonterminal - values[t]
                last = delta + gamma * gae_lambda * nonterminal * last
                advantages[t] = last
            returns = advantages + values
        b_obs, b_actions = obs_buf.reshape(-1, 4), actions.reshape(-1)
        b_logprobs, b_adv, b_returns, b_values = (x.reshape(-1) for x in (logprobs, advantages, returns, values))
        clipfracs = []
        for _ in range(epochs):
            order = torch.randperm(batch_size)
            for start in range(0, batch_size, minibatch):
                mb = order[start:start + minibatch]
                dist = Categorical(logits=actor(b_obs[mb]))
                new_logprob, entropy = dist.log_prob(b_actions[mb]), dist.entropy()
                new_value = critic(b_obs[mb]).flatten()
                log_ratio = new_logprob - b_logprobs[mb]
                ratio = log_ratio.exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                    clipfracs.append(((ratio - 1.0).abs() > clip).float().mean().item())
                adv = b_adv[mb]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                v_clipped = b_values[mb] + (new_value - b_values[mb]).clamp(-vf_clip, vf_clip)
                v_loss = 0.5 * torch.max((new_value - b_returns[mb]) ** 2, (v_clipped - b_returns[mb]) ** 2).mean()
                loss = pg_loss - ent_coef * entropy.mean() + vf_coef * v_loss
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
                optimizer.step()
        approx_kl.item()

    rows = []
    for i in range(iterations + 1):
        start = CLOCK()
        rollout()
        mid = CLOCK()
        phase()
        end = CLOCK()
        if i:
            rows.append({"steps": batch_size, "rollout": mid - start, "phase": end - mid})
    envs.close()
    return rows


def summarize(rows: list[dict]) -> dict[str, float]:
    """Per-process medians: env steps/s over whole iterations, rollout steps/s, phase ms."""
    return {
        "steps_per_s": statistics.median(r["steps"] / (r["rollout"] + r["phase"]) for r in rows),
        "rollout_steps_per_s": statistics.median(r["steps"] / r["rollout"] for r in rows),
        "phase_ms": statistics.median(r["phase"] for r in rows) * 1e3,
    }


def spawn(side: str, iterations: int, threads: int, sizes: dict, clock: str) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "benchmarks.trainer", "--worker", side, "--iterations", str(iterations),
           "--threads", str(threads), "--num-envs", str(sizes["num_envs"]), "--batch-size", str(sizes["batch_size"]), "--clock", clock]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(repeats: int, iterations: int, threads: int, sizes: dict, clock: str) -> dict[str, dict[str, float]]:
    samples: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(repeats):
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            samples[side].append(spawn(side, iterations, threads, sizes, clock))
    return {side: {k: statistics.median(s[k] for s in rows) for k in rows[0]} for side, rows in samples.items()}


def table(med: dict[str, dict[str, float]], title: str) -> tuple[str, dict[str, float]]:
    core, plain = med["core"], med["plain"]
    ratios = {
        "steps_per_s": core["steps_per_s"] / plain["steps_per_s"],
        "rollout_steps_per_s": core["rollout_steps_per_s"] / plain["rollout_steps_per_s"],
        "phase": core["phase_ms"] / plain["phase_ms"],
    }
    lines = [f"core trainer vs plain PyTorch loop, {title}",
             f"{'':<28}{'core':>12}{'plain':>12}{'core/plain':>12}{'target':>10}",
             f"{'env steps/s (iteration)':<28}{core['steps_per_s']:>12.0f}{plain['steps_per_s']:>12.0f}"
             f"{ratios['steps_per_s']:>12.2f}{'>= 0.7':>10}",
             f"{'rollout env steps/s':<28}{core['rollout_steps_per_s']:>12.0f}{plain['rollout_steps_per_s']:>12.0f}"
             f"{ratios['rollout_steps_per_s']:>12.2f}{'':>10}",
             f"{'training phase ms':<28}{core['phase_ms']:>12.1f}{plain['phase_ms']:>12.1f}"
             f"{ratios['phase']:>12.2f}{'<= 1.2':>10}"]
    return "\n".join(lines), ratios


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="processes per side")
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--busy", action="store_true", help="one spinning process per core beside every timing")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time, less disturbed by other jobs on a shared machine")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = {"num_envs": args.num_envs, "batch_size": args.batch_size}
    if args.worker:
        import torch

        global CLOCK
        CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
        torch.set_num_threads(args.threads)
        rows = (run_core if args.worker == "core" else run_plain)(args.iterations, **sizes)
        print(json.dumps(summarize(rows)))
        return {}
    with busy_machine(enabled=args.busy):
        label = load_label()
        med = measure(args.repeats, args.iterations, args.threads, sizes, args.clock)
    text, ratios = table(med, f"{label}, {args.threads} torch thread(s), {args.clock} clock, medians of {args.repeats} processes per side")
    print(text)
    result = {"load": label, "threads": args.threads, "clock": args.clock, "sides": med, "ratios": ratios}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
