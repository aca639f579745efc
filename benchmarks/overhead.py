"""Bridge overhead benchmark: the bridges' loss and update cost against anchors measured in the same run.

    python -m benchmarks.overhead [--repeats 20] [--threads 1] [--clock cpu] [--json runs/bench_overhead.json]

Problem: CartPole-like (observation 4 floats, 2 discrete actions), the core's network
(``metta_core.policy.ActorCritic``: separate tanh MLPs 64x64 for actor and critic; RLlib's
default PPO module with ``fcnet_hiddens=[64, 64]``), random observations, stored log-probs and
values near the network's (ratios != 1), 15% terminal steps. Minibatch shapes
``[segments, horizon]``: ``[16, 32]`` (512 rows), ``[64, 64]`` (4096 rows) and ``[256, 64]`` (16384 rows,
Metta's default ``minibatch_size``).

Loss cases (one sample = ``INNER`` calls on the same minibatch, gradients cleared outside the timer):

- ``core``: what ``metta_core.ppo.PPO.run_train`` does once it holds the minibatch: select and
  clone the policy inputs, ``ActorCritic.forward`` with the stored actions, ``ppo_minibatch_loss``
  (V-trace recompute, normalization, priority weights), track the stats, then ``loss.backward()``.
- ``torchrl MettaPPOLoss``: ``loss(td)`` on the ``[S, T]`` tensordict ``MettaSegmentSampler``
  yields (``advantage`` and ``priority_weight`` set), sum of ``loss_*``, backward. Same network
  (the actor/critic wrap the core policy's MLPs), same numbers (checked before timing).
- ``torchrl modules + core loss``: the actor/critic calls ``MettaPPOLoss`` makes (TorchRL's
  functional parameter swap, ``get_dist``, the critic ``ValueOperator``) feeding
  ``ppo_minibatch_loss`` directly: the cost of TorchRL's module machinery with no bridge code, so
  ``MettaPPOLoss`` against it is the bridge's own overhead.
- ``torchrl ClipPPOLoss``: TorchRL's ``ClipPPOLoss`` with Metta's coefficients
  (``bridges.torchrl.train.native_clip_ppo``) on the same ``[S, T]`` tensordict, forward + backward;
  its ``GAE`` advantage is computed beforehand, not timed. ``ClipPPOLoss + GAE`` times GAE on the
  minibatch too (for information; it runs the critic on ``observation`` and ``("next", observation)``).

RLlib cases (one sample = one ``learner.update(episodes=...)`` on fresh copies of the same episodes):
both learners from ``config.build_learner()`` (no Ray cluster), same module config, lr, clip and
coefficients, one epoch, 4 minibatches of ``S * T`` rows over a batch of ``4 * S * T`` rows. The
episodes are terminated chunks of random length 8-64 whose slots fill the rows exactly, so Metta's
layout and RLlib's (one extra timestep per episode) have the same number of rows and neither side
trains on padding. Inside the timer, for both: the learner connector pipeline (Metta's
``MettaLayoutConnector``: episodes to rows, value forward, first-pass advantage; RLlib's default
pipeline: one extra timestep per episode, value forward, GAE, batching), then the minibatch loop
(forward, loss, backward, global-norm clip, Adam step) and the metrics reduce. Metta samples
segments by priority; RLlib slices the batch in order (``shuffle_batch_per_epoch=False``).

Times are medians of interleaved repeats, in process CPU time by default (``--clock cpu``: on a
machine shared with other jobs, wall time mostly measures how often this process was descheduled;
``--clock wall`` measures wall time). Ratios are against the anchor named on the row (lower is
faster); the targets of issue 6 are printed next to them. No assertion on time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numba
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.modules import ProbabilisticActor, ValueOperator
from tensordict.nn import TensorDictModule

from benchmarks import write_json
from bridges.torchrl import MettaPPOLoss
from metta_core.advantage import compute_advantage
from metta_core.config import PPOConfig
from metta_core.policy import ActorCritic
from metta_core.ppo_math import ppo_minibatch_loss

OBS_DIM, N_ACTIONS, HIDDEN = 4, 2, (64, 64)
SHAPES = [(16, 32), (64, 64), (256, 64)]
INNER = 5
"""Loss calls per timed sample (one call at 512 rows is about a millisecond)."""
RLLIB_MINIBATCHES = 4
TERMINAL_P = 0.15
TARGETS = {"core": 1.05, "ClipPPOLoss": 1.10, "PPOTorchLearner": 1.10}
"""Issue 6 targets: MettaPPOLoss vs core, MettaPPOLoss vs ClipPPOLoss, MettaPPOLearner vs PPOTorchLearner."""


# -- loss level ------------------------------------------------------------------------------------

def make_minibatch(policy: ActorCritic, shape: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Metta-layout minibatch tensors ``[S, T]``: stored log-probs and values near the policy's."""
    g = torch.Generator().manual_seed(seed)
    s, t = shape
    obs = torch.randn(s, t, OBS_DIM, generator=g)
    with torch.no_grad():
        out = policy.forward(TensorDict({"env_obs": obs}, [s, t]))
    dones = (torch.rand(s, t, generator=g) < TERMINAL_P).float()
    dones[:, 0] = 0.0
    rewards = torch.randn(s, t, generator=g)
    rewards[:, 0] = 0.0
    values = out["values"] + 0.2 * torch.randn(s, t, generator=g)
    cfg = PPOConfig()
    return {
        "env_obs": obs,
        "actions": out["actions"],
        "act_log_prob": out["act_log_prob"] + 0.3 * torch.randn(s, t, generator=g),
        "values": values,
        "rewards": rewards,
        "dones": dones,
        "advantages": compute_advantage(values, rewards, dones, torch.ones_like(values),
                                        gamma=cfg.gamma, gae_lambda=cfg.gae_lambda),
        "prio_weights": 0.5 + torch.rand(s, 1, generator=g),
    }


def core_loss(policy: ActorCritic, cfg: PPOConfig, mb: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``PPO.run_train`` from the sampled minibatch on: policy forward, ``ppo_minibatch_loss``."""
    minibatch = TensorDict({k: v for k, v in mb.items() if k not in ("advantages", "prio_weights")},
                           batch_size=mb["values"].shape)
    spec_fields = policy.get_agent_experience_spec().fields

    def run() -> torch.Tensor:
        flat = minibatch.reshape(-1)
        policy_td = policy.forward(flat.select(*spec_fields).clone(), action=flat["actions"])
        shape = minibatch.batch_size
        terms = ppo_minibatch_loss(
            cfg, old_logprob=minibatch["act_log_prob"], new_logprob=policy_td["act_log_prob"].reshape(shape),
            entropy=policy_td["entropy"].reshape(shape), new_values=policy_td["values"].reshape(shape),
            values=minibatch["values"], rewards=minibatch["rewards"], dones=minibatch["dones"],
            advantages=mb["advantages"], prio_weights=mb["prio_weights"],
        )
        terms.stats()  # PPO._track reads the stats as floats every minibatch
        return terms.loss

    return run


def torchrl_modules(policy: ActorCritic) -> tuple[ProbabilisticActor, ValueOperator]:
    """TorchRL actor and critic around the core policy's own MLPs (shared parameters)."""
    actor = ProbabilisticActor(
        TensorDictModule(policy.actor, in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"], distribution_class=torch.distributions.Categorical, return_log_prob=True,
    )
    return actor, ValueOperator(policy.critic, in_keys=["observation"])


def torchrl_td(mb: dict[str, torch.Tensor], log_prob_key: str) -> TensorDict:
    """The minibatch in TorchRL's layout: ``("next", reward/terminated)[:, t]`` = Metta's ``[:, t+1]``."""
    s, t = mb["values"].shape
    next_reward = torch.cat([mb["rewards"][:, 1:], torch.zeros(s, 1)], dim=1)
    next_term = torch.cat([mb["dones"][:, 1:], torch.zeros(s, 1)], dim=1).bool()
    return TensorDict(
        {
            "observation": mb["env_obs"],
            "action": mb["actions"],
            log_prob_key: mb["act_log_prob"],
            "state_value": mb["values"].unsqueeze(-1),
            "advantage": mb["advantages"].unsqueeze(-1),
            "priority_weight": mb["prio_weights"].expand(s, t).contiguous(),
            "next": {
                "observation": torch.cat([mb["env_obs"][:, 1:], mb["env_obs"][:, -1:]], dim=1),
                "reward": next_reward.unsqueeze(-1),
                "terminated": next_term.unsqueeze(-1),
                "done": next_term.unsqueeze(-1),
            },
        },
        batch_size=[s, t],
    )


def torchrl_modules_core_loss(loss: MettaPPOLoss, cfg: PPOConfig, mb: dict[str, torch.Tensor],
                              td: TensorDict) -> Callable[[], torch.Tensor]:
    """The TorchRL module calls ``MettaPPOLoss`` makes (functional actor and critic on ``observation``)
    feeding ``ppo_minibatch_loss`` directly: the floor of any TorchRL loss on these modules."""

    def run() -> torch.Tensor:
        with loss.actor_network_params.to_module(loss.actor_network):
            dist = loss.actor_network.get_dist(td.select("observation"))
        with loss.critic_network_params.to_module(loss.critic_network):
            new_values = loss.critic_network(td.select("observation"))["state_value"].squeeze(-1)
        return ppo_minibatch_loss(
            cfg, old_logprob=mb["act_log_prob"], new_logprob=dist.log_prob(mb["actions"]), entropy=dist.entropy(),
            new_values=new_values, values=mb["values"], rewards=mb["rewards"], dones=mb["dones"],
            advantages=mb["advantages"], prio_weights=mb["prio_weights"],
        ).loss

    return run


def loss_cases(shape: tuple[int, int]) -> tuple[dict[str, Callable[[], torch.Tensor]], torch.nn.Module]:
    """Callables returning the differentiable loss of each loss-level case, and the shared policy."""
    from bridges.torchrl.train import native_clip_ppo
    from metta_core.run import TrainArgs

    torch.manual_seed(0)
    env = gym.make("CartPole-v1")
    policy = ActorCritic(env.observation_space, env.action_space, HIDDEN)
    cfg = PPOConfig()
    mb = make_minibatch(policy, shape)
    actor, critic = torchrl_modules(policy)
    metta = MettaPPOLoss(actor, critic, cfg)
    metta_plain = MettaPPOLoss(actor, critic, cfg, functional=False)
    metta_td = torchrl_td(mb, metta.tensor_keys.sample_log_prob)
    native = native_clip_ppo(actor, critic, TrainArgs())
    native_plain = native_clip_ppo(actor, critic, TrainArgs(), functional=False)
    native_td = torchrl_td(mb, native.tensor_keys.sample_log_prob).exclude("advantage", "state_value")
    with torch.no_grad():
        native.value_estimator(native_td, params=native.critic_network_params.detach())
    gae_input = native_td.exclude("advantage", "value_target", "state_value", ("next", "state_value"))

    def loss_sum(out: TensorDict) -> torch.Tensor:
        return sum(v for k, v in out.items() if k.startswith("loss_"))

    def native_with_gae() -> torch.Tensor:
        td = gae_input.clone(False)
        with torch.no_grad():
            native.value_estimator(td, params=native.critic_network_params.detach())
        return loss_sum(native(td))

    cases = {
        "core": core_loss(policy, cfg, mb),
        "torchrl modules + core loss": torchrl_modules_core_loss(metta, cfg, mb, metta_td),
        "torchrl MettaPPOLoss": lambda: loss_sum(metta(metta_td)),
        "torchrl ClipPPOLoss": lambda: loss_sum(native(native_td)),
        "torchrl ClipPPOLoss + GAE": native_with_gae,
        "torchrl MettaPPOLoss functional=False": lambda: loss_sum(metta_plain(metta_td)),
        "torchrl ClipPPOLoss functional=False": lambda: loss_sum(native_plain(native_td)),
    }
    core_value = float(cases["core"]().detach())
    for name in ("torchrl MettaPPOLoss", "torchrl MettaPPOLoss functional=False"):
        value = float(cases[name]().detach())
        assert abs(core_value - value) <= 1e-5 * max(1.0, abs(core_value)), (name, core_value, value)
    native_values = [float(cases[n]().detach()) for n in ("torchrl ClipPPOLoss", "torchrl ClipPPOLoss functional=False")]
    assert abs(native_values[0] - native_values[1]) <= 1e-6 * max(1.0, abs(native_values[0])), native_values
    return cases, policy


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def timed_backward(policy: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
                   clock: Callable[[], float]) -> Callable[[], float]:
    """One sample: ``INNER`` times (loss, backward); gradients are cleared before the timer starts."""

    def sample() -> float:
        policy.zero_grad(set_to_none=True)
        start = clock()
        for _ in range(INNER):
            loss_fn().backward()
        return (clock() - start) / INNER

    return sample


# -- RLlib -----------------------------------------------------------------------------------------

def rllib_episodes(shape: tuple[int, int], seed: int = 0) -> list:
    """Terminated episode chunks of 8-64 steps whose ``L + 1`` slots fill ``RLLIB_MINIBATCHES * S`` rows of ``T``."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    rng = np.random.default_rng(seed)
    total = RLLIB_MINIBATCHES * shape[0] * shape[1]
    lengths = []
    while total > 0:
        slots = min(int(rng.integers(9, 66)), total)
        if 0 < total - slots < 9:  # leave room for one more chunk of at least 8 steps
            slots = total
        lengths.append(slots - 1)
        total -= slots
    episodes = []
    for length in lengths:
        logits = rng.normal(0.0, 0.1, (length, N_ACTIONS)).astype(np.float32)
        episodes.append(SingleAgentEpisode(
            observations=list(rng.normal(size=(length + 1, OBS_DIM)).astype(np.float32)),
            actions=list(rng.integers(0, N_ACTIONS, length)),
            rewards=list(np.ones(length, dtype=np.float32)),
            extra_model_outputs={
                Columns.ACTION_LOGP: list(rng.normal(-0.7, 0.1, length).astype(np.float32)),
                Columns.ACTION_DIST_INPUTS: list(logits),
            },
            terminated=True,
            len_lookback_buffer=0,
        ).to_numpy())
    return episodes


def rllib_learners(shape: tuple[int, int]) -> dict:
    """``MettaPPOLearner`` and RLlib's ``PPOTorchLearner`` with the same sizes, module and coefficients."""
    from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig

    from bridges.rllib import metta_ppo_config

    s, t = shape
    minibatch = s * t
    batch = RLLIB_MINIBATCHES * minibatch
    ppo = PPOConfig()
    model = {"fcnet_hiddens": list(HIDDEN), "fcnet_activation": "tanh", "head_fcnet_hiddens": [],
             "vf_share_layers": False}
    metta = metta_ppo_config("CartPole-v1", batch_size=batch, minibatch_size=minibatch, bptt_horizon=t,
                             update_epochs=1)
    native = RLlibPPOConfig().environment("CartPole-v1").training(
        train_batch_size_per_learner=batch, minibatch_size=minibatch, num_epochs=1, gamma=ppo.gamma,
        lambda_=ppo.gae_lambda, clip_param=ppo.clip_coef, entropy_coeff=ppo.ent_coef, vf_loss_coeff=ppo.vf_coef,
        grad_clip=ppo.max_grad_norm, grad_clip_by="global_norm", use_kl_loss=False, kl_coeff=0.0,
        shuffle_batch_per_epoch=False,
    )
    learners = {}
    for name, config in (("rllib MettaPPOLearner", metta), ("rllib PPOTorchLearner", native)):
        config = config.training(lr=3e-4).rl_module(model_config=model).debugging(seed=0)
        learners[name] = config.build_learner(env=gym.make("CartPole-v1"))
    return learners


def count_minibatches(learner, update: Callable[[], None]) -> int:
    """How many minibatch losses one ``update`` computes (checks both sides do the same number)."""
    calls = []
    original = learner.compute_losses

    def counting(**kwargs):
        calls.append(1)
        return original(**kwargs)

    learner.compute_losses = counting
    try:
        update()
    finally:
        del learner.compute_losses
    return len(calls)


def rllib_cases(shape: tuple[int, int], clock: Callable[[], float]) -> dict[str, Callable[[], float]]:
    """One sample per case: one ``update`` on fresh copies of the episodes (copied outside the timer)."""
    return update_cases(rllib_episodes(shape), rllib_learners(shape), shape[0] * shape[1], clock)


def update_cases(episodes: list, learners: dict, minibatch: int,
                 clock: Callable[[], float]) -> dict[str, Callable[[], float]]:
    """Per learner, a sample function timing one ``update`` (one epoch of ``RLLIB_MINIBATCHES``
    minibatches of ``minibatch`` steps) on a fresh copy of ``episodes`` made outside the timer."""
    cases = {}
    for name, learner in learners.items():
        def update(learner=learner, eps=None):
            learner.update(episodes=eps if eps is not None else copy.deepcopy(episodes), minibatch_size=minibatch,
                           num_epochs=1, shuffle_batch_per_epoch=False)

        count = count_minibatches(learner, update)
        assert count == RLLIB_MINIBATCHES, f"{name}: {count} minibatches per update, expected {RLLIB_MINIBATCHES}"

        def sample(update=update) -> float:
            eps = copy.deepcopy(episodes)
            start = clock()
            update(eps=eps)
            return clock() - start

        cases[name] = sample
    return cases


# -- measurement -----------------------------------------------------------------------------------

def timing_parser(doc: str | None, repeats: int) -> argparse.ArgumentParser:
    """The options every timing benchmark shares: ``--repeats``, ``--threads``, ``--clock``, ``--json``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and numba threads (default 1: spinning worker threads distort times on a busy machine)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (default, steadier on a shared machine); wall: elapsed time")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def set_threads(threads: int) -> None:
    """numba's then torch's thread count (launching numba's OpenMP layer resets torch's to numba's)."""
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)


def ratio_result(shape: tuple, case: str, seconds: float, anchor: str | None, anchor_seconds: float | None,
                 target: float | None, **extra) -> dict:
    """One row of a ratio table: ``case``'s time (ms) and ``seconds / anchor_seconds`` (lower is faster)
    against ``target`` (``met``); ``extra`` fields go after the shape."""
    ratio = seconds / anchor_seconds if anchor else None
    return {"shape": list(shape), **extra, "case": case, "ms": seconds * 1e3, "anchor": anchor, "ratio": ratio,
            "target": target, "met": None if target is None else ratio <= target}


def print_ratio_table(results: list[dict], case_width: int, anchor_width: int) -> None:
    """The rows of ``ratio_result`` as a table (ratio, target and whether it is met)."""
    print(f"{'minibatch':>9}  {'case':<{case_width}} {'ms':>8}  {'vs anchor':<{anchor_width}} {'ratio':>6} {'target':>7}")
    for r in results:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else ""
        target = f"<={r['target']:.2f}" if r["target"] is not None else ""
        met = "" if r["met"] is None else (" met" if r["met"] else " NOT met")
        print(f"{str(tuple(r['shape'])):>9}  {r['case']:<{case_width}} {r['ms']:>8.3f}  "
              f"{r['anchor'] or '(anchor)':<{anchor_width}} {ratio:>6} {target:>7}{met}")


def measure(samples: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds per case over ``repeats`` interleaved rounds (after one warm-up round)."""
    for sample in samples.values():
        sample()
    times: dict[str, list[float]] = {k: [] for k in samples}
    for _ in range(repeats):
        for name, sample in samples.items():
            times[name].append(sample())
    return {k: statistics.median(v) for k, v in times.items()}


COMPARISONS = [
    # (case, anchor, target key)
    ("core", None, None),
    ("torchrl MettaPPOLoss", "core", "core"),
    ("torchrl modules + core loss", "core", None),
    ("torchrl MettaPPOLoss", "torchrl modules + core loss", None),
    ("torchrl ClipPPOLoss", None, None),
    ("torchrl MettaPPOLoss", "torchrl ClipPPOLoss", "ClipPPOLoss"),
    ("torchrl ClipPPOLoss + GAE", "torchrl ClipPPOLoss", None),
    ("torchrl MettaPPOLoss", "torchrl ClipPPOLoss + GAE", None),
    ("torchrl MettaPPOLoss functional=False", "core", "core"),
    ("torchrl ClipPPOLoss functional=False", None, None),
    ("torchrl MettaPPOLoss functional=False", "torchrl ClipPPOLoss functional=False", "ClipPPOLoss"),
    ("rllib PPOTorchLearner", None, None),
    ("rllib MettaPPOLearner", "rllib PPOTorchLearner", "PPOTorchLearner"),
]


def main(argv=None) -> dict:
    args = timing_parser(__doc__, repeats=20).parse_args(argv)
    clock = CLOCKS[args.clock]
    set_threads(args.threads)
    results = []
    for shape in SHAPES:
        loss_fns, policy = loss_cases(shape)
        samples = {name: timed_backward(policy, fn, clock) for name, fn in loss_fns.items()}
        samples.update(rllib_cases(shape, clock))
        med = measure(samples, args.repeats)
        for case, anchor, target_key in COMPARISONS:
            target = TARGETS.get(target_key) if target_key else None
            results.append(ratio_result(shape, case, med[case], anchor, med.get(anchor), target,
                                        rows=shape[0] * shape[1]))
    print(f"threads={args.threads} repeats={args.repeats} clock={args.clock}; loss rows: ms per minibatch (forward + backward); "
          f"rllib rows: ms per update ({RLLIB_MINIBATCHES} minibatches)")
    print_ratio_table(results, case_width=38, anchor_width=36)
    write_json(args.json, {"threads": args.threads, "repeats": args.repeats, "clock": args.clock, "results": results})
    return {"results": results}

if __name__ == "__main__":
    main()
