"""Recurrent training-phase benchmark: the TorchRL bridge vs the core and vs TorchRL's own recurrent PPO.

    python -m benchmarks.recurrent_phase [--repeats 15] [--threads 1] [--clock cpu] [--json runs/bench_recurrent_phase.json]

Problem: CartPole-like (observation 4 floats, 2 discrete actions), the core's recurrent network
(``RecurrentActorCritic``: Linear+Tanh encoder, LSTM with Metta's init, ``[encoded, cell]``
features, separate actor and critic trunks, hidden 64), stored input states for every step,
resets (``dones or truncateds`` / ``is_init``) with probability 1/50 per step, stored log-probs
and values near the network's. One sample = forward + backward of one minibatch of
``[segments, horizon]`` rows (``INNER`` calls, gradients cleared outside the timer):

- ``core``: ``RecurrentActorCritic.forward`` on the rows (SPEC §6 unroll from the stored state
  of column 0, fused at reset columns) with the stored actions, then ``ppo_minibatch_loss``.
- ``torchrl MettaPPOLoss``: the same network as ``LSTMModule`` actor and critic
  (``bridges.torchrl.recurrent.from_recurrent_actor_critic``, the same weights), ``loss(rows)``
  (stored states checked and zeroed at ``is_init``, recurrent mode, V-trace recompute), sum of
  ``loss_*``. Same numbers as ``core`` (checked before timing).
- ``torchrl ClipPPOLoss``: TorchRL's ``ClipPPOLoss`` with Metta's coefficients
  (``bridges.torchrl.train.native_clip_ppo``) on the same modules and rows in recurrent mode,
  with ``advantage`` / ``value_target`` given (no advantage work timed), sum of ``loss_*``.

Times are medians of interleaved repeats in process CPU time (``--clock wall`` for elapsed
time); ratios are against the anchor named on the row; the goal of issue 12 is ``MettaPPOLoss``
<= 1.10x ``ClipPPOLoss``. No assertion on time.
"""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import torch
from tensordict import TensorDict

from benchmarks import write_json
from benchmarks.overhead import CLOCKS, measure, print_ratio_table, ratio_result, set_threads, timed_backward, timing_parser
from bridges.torchrl import MettaPPOLoss
from bridges.torchrl.recurrent import from_recurrent_actor_critic
from metta_core.advantage import compute_advantage
from metta_core.config import PPOConfig
from metta_core.ppo_math import ppo_minibatch_loss
from metta_core.recurrent_policy import RecurrentActorCritic

OBS_DIM, N_ACTIONS, HIDDEN = 4, 2, 64
SHAPES = [(16, 32), (64, 64)]
"""``(segments, horizon)``: the CLI's default minibatch and a larger one."""
RESET_P = 1 / 50
TARGET = 1.10


def make_rows(policy: RecurrentActorCritic, shape: tuple[int, int], cfg: PPOConfig, seed: int = 0) -> dict:
    """One minibatch of rows in Metta's layout (``rewards[:, t+1]`` followed the action at ``t``)."""
    g = torch.Generator().manual_seed(seed)
    s, t = shape
    obs = torch.randn(s, t, OBS_DIM, generator=g)
    resets = torch.rand(s, t, generator=g) < RESET_P
    dones = (resets & (torch.rand(s, t, generator=g) < 0.7)).float()
    truncateds = (resets & (dones == 0)).float()
    states = {k: 0.5 * torch.randn(s, t, *policy.state_shape, generator=g) for k in policy.state_keys}
    rows = TensorDict({"env_obs": obs, "dones": dones, "truncateds": truncateds, **states}, [s, t])
    with torch.no_grad():
        out = policy(rows.clone())
    values = out["values"] + 0.1 * torch.randn(s, t, generator=g)
    rewards = torch.randn(s, t, generator=g)
    return {
        "rows": rows, "actions": out["actions"], "act_log_prob": out["act_log_prob"] + 0.05 * torch.randn(s, t, generator=g),
        "values": values, "rewards": rewards, "dones": dones, "truncateds": truncateds, "states": states,
        "advantages": compute_advantage(values, rewards, dones, torch.ones_like(values),
                                        gamma=cfg.gamma, gae_lambda=cfg.gae_lambda),
    }


def torchrl_rows(mb: dict, log_prob_key: str) -> TensorDict:
    """The rows in TorchRL's layout: ``is_init = dones or truncateds``, ``("next", x)[:, t]`` = Metta's ``x[:, t+1]``."""
    s, t = mb["values"].shape

    def shifted(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, 1:], torch.zeros(s, 1)], dim=1).unsqueeze(-1)

    return TensorDict(
        {
            "observation": mb["rows"]["env_obs"],
            "is_init": (mb["dones"] + mb["truncateds"]).bool().unsqueeze(-1),
            **mb["states"],
            "action": mb["actions"],
            log_prob_key: mb["act_log_prob"],
            "state_value": mb["values"].unsqueeze(-1),
            "advantage": mb["advantages"].unsqueeze(-1),
            "value_target": (mb["advantages"] + mb["values"]).unsqueeze(-1),
            "next": {"reward": shifted(mb["rewards"]), "terminated": shifted(mb["dones"]).bool(),
                     "done": shifted(mb["dones"] + mb["truncateds"]).bool()},
        },
        batch_size=[s, t],
    )


def cases(shape: tuple[int, int]) -> tuple[dict[str, Callable[[], torch.Tensor]], list[torch.nn.Module]]:
    """Loss callables of each case (same network, same rows) and the modules holding their parameters."""
    from bridges.torchrl.train import native_clip_ppo
    from metta_core.run import TrainArgs

    torch.manual_seed(0)
    env = gym.make("CartPole-v1")
    policy = RecurrentActorCritic(env.observation_space, env.action_space, HIDDEN)
    cfg = PPOConfig()
    mb = make_rows(policy, shape, cfg)
    actor, critic = from_recurrent_actor_critic(policy)
    metta = MettaPPOLoss(actor, critic, cfg)
    native = native_clip_ppo(actor, critic, TrainArgs())
    metta_td = torchrl_rows(mb, metta.tensor_keys.sample_log_prob)
    native_td = torchrl_rows(mb, native.tensor_keys.sample_log_prob)
    spec_fields = list(policy.get_agent_experience_spec().fields)

    def core() -> torch.Tensor:
        out = policy(mb["rows"].select(*spec_fields).clone(), action=mb["actions"])
        terms = ppo_minibatch_loss(
            cfg, old_logprob=mb["act_log_prob"], new_logprob=out["act_log_prob"], entropy=out["entropy"],
            new_values=out["values"], values=mb["values"], rewards=mb["rewards"], dones=mb["dones"],
            advantages=mb["advantages"],
        )
        terms.stats()
        return terms.loss

    def loss_sum(out: TensorDict) -> torch.Tensor:
        return sum(v for k, v in out.items() if k.startswith("loss_"))

    found = {
        "core": core,
        "torchrl MettaPPOLoss": lambda: loss_sum(metta(metta_td)),
        "torchrl ClipPPOLoss": lambda: loss_sum(native(native_td)),
    }
    expected, got = float(found["core"]().detach()), float(found["torchrl MettaPPOLoss"]().detach())
    assert abs(expected - got) <= 1e-4 * max(1.0, abs(expected)), (expected, got)
    return found, [policy, metta, native]


COMPARISONS = [
    ("core", None),
    ("torchrl ClipPPOLoss", None),
    ("torchrl MettaPPOLoss", "torchrl ClipPPOLoss"),
    ("torchrl MettaPPOLoss", "core"),
    ("torchrl ClipPPOLoss", "core"),
]


def main(argv=None) -> dict:
    args = timing_parser(__doc__, repeats=15).parse_args(argv)
    set_threads(args.threads)
    clock = CLOCKS[args.clock]
    results = []
    for shape in SHAPES:
        loss_fns, holders = cases(shape)
        zero_all = torch.nn.ModuleList(holders)
        med = measure({name: timed_backward(zero_all, fn, clock) for name, fn in loss_fns.items()}, args.repeats)
        for case, anchor in COMPARISONS:
            target = TARGET if (case, anchor) == ("torchrl MettaPPOLoss", "torchrl ClipPPOLoss") else None
            results.append(ratio_result(shape, case, med[case], anchor, med.get(anchor), target))
    print(f"threads={args.threads} repeats={args.repeats} clock={args.clock}; ms per minibatch (forward + backward), "
          f"LSTM hidden {HIDDEN}, resets p={RESET_P:.3f}")
    print_ratio_table(results, case_width=22, anchor_width=22)
    summary = {"threads": args.threads, "repeats": args.repeats, "clock": args.clock, "results": results}
    write_json(args.json, summary)
    return summary

if __name__ == "__main__":
    main()
