"""Metta's PPO in your own TorchRL collector loop: ``MettaPPOLoss`` + ``MettaPPOPhase``.

    python examples/torchrl_own_loop.py                  # CartPole-v1, 100k env steps

Everything here is plain TorchRL (env, actor, critic, ``Collector``) except the three Metta
pieces: the loss, the segment sampler and the phase, which runs Metta's training phase on each
collected batch (prioritized whole rows, V-trace recompute, per-minibatch normalization,
gradient clipping, accumulation and the target-KL stop; SPEC §4). Calling ``loss(minibatch)``
and ``.backward()`` yourself would skip the clipping, the optimizer step and the stop.
"""

from __future__ import annotations

import argparse

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torchrl.collectors import Collector
from torchrl.envs import GymEnv, RewardSum, SerialEnv, TransformedEnv
from torchrl.modules import MLP, ProbabilisticActor, ValueOperator

from bridges.torchrl import MettaPPOLoss, MettaPPOPhase, MettaSegmentSampler
from metta_core.config import PPOConfig

NUM_ENVS, STEPS_PER_ENV, BPTT_HORIZON, MINIBATCH_ROWS, UPDATE_EPOCHS = 8, 256, 32, 16, 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-timesteps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    torch.manual_seed(cli.seed)

    env = TransformedEnv(SerialEnv(NUM_ENVS, lambda: GymEnv("CartPole-v1", categorical_action_encoding=True)),
                         RewardSum())
    env.set_seed(cli.seed)
    obs_dim, n_actions = env.observation_spec["observation"].shape[-1], env.action_spec.space.n
    actor = ProbabilisticActor(
        TensorDictModule(MLP(obs_dim, n_actions, num_cells=[64, 64], activation_class=torch.nn.Tanh),
                         in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"], spec=env.full_action_spec, distribution_class=torch.distributions.Categorical,
        return_log_prob=True,
    )
    critic = ValueOperator(MLP(obs_dim, 1, num_cells=[64, 64], activation_class=torch.nn.Tanh), in_keys=["observation"])

    loss = MettaPPOLoss(actor, critic, PPOConfig())  # Metta's defaults for every coefficient
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3, eps=1e-12)
    sampler = MettaSegmentSampler(loss, minibatch_segments=MINIBATCH_ROWS, total_timesteps=cli.total_timesteps,
                                  update_epochs=UPDATE_EPOCHS, generator=torch.Generator().manual_seed(cli.seed))
    train_phase = MettaPPOPhase(loss, optimizer, sampler)

    # the critic runs in the collector too: MettaPPOLoss reads the value recorded at collection
    collector = Collector(env, TensorDictSequential(actor, critic), frames_per_batch=NUM_ENVS * STEPS_PER_ENV,
                          total_frames=cli.total_timesteps)
    returns: list[float] = []
    for epoch, data in enumerate(collector):                    # [NUM_ENVS, STEPS_PER_ENV]
        returns += data["next", "episode_reward"][data["next", "done"]].tolist()
        stats = train_phase(data.reshape(-1, BPTT_HORIZON), epoch=epoch)  # whole rows of each env's steps
        recent = returns[-100:]
        print(f"epoch {epoch:3d}  mean return (last {len(recent)}) {sum(recent) / max(1, len(recent)):6.1f}  "
              f"policy_loss {stats['policy_loss']:+.4f}  approx_kl {stats['approx_kl']:.4f}")
    collector.shutdown()


if __name__ == "__main__":
    main()
