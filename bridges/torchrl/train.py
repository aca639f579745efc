"""TorchRL training run: ``metta-bridges train --framework torchrl`` and ``examples/torchrl_cartpole.py``.

Pipeline: a batched gymnasium env wrapped by TorchRL's ``GymWrapper`` -> ``Collector`` with the
actor and critic (the critic records ``state_value`` at collection) -> ``[num_envs, S]`` batch
reshaped into ``[segments, bptt_horizon]`` rows -> ``MettaPPOPhase`` (``MettaSegmentSampler``
minibatches, ``MettaPPOLoss``, Adam with Metta's settings and ``clip_grad_norm_(max_grad_norm)``).
With ``compare_native`` the same pipeline then also trains TorchRL's ``ClipPPOLoss`` + ``GAE``
(summary under ``"native"``, metrics in ``out_dir/native``). ``--anneal-lr`` sets the rate of each
training phase as the core run does (``metta_core.run.phase_learning_rate``), for both losses.
``--ppo schedule.*``: an epoch outside the loss's schedule runs no training phase (``MettaPPOPhase``;
the core's zero loss updates nothing). Settings ``ClipPPOLoss`` cannot express are refused with ``compare_native``
(``check_native_settings``) before the Metta run starts.

``--policy lstm|gru``: the core's ``RecurrentActorCritic`` (built from the run seed, as the core run
builds it) as ``LSTMModule`` / ``GRUModule`` actor and critic holding its parameters, ``InitTracker``
and the modules' primers in the env, and the collector's carried state zeroed after every batch
(Metta zeroes every agent's state when a rollout starts; ``bridges.torchrl.recurrent``).

Checkpoints (``metta_core.run`` format) hold the actor and critic, optimizer, loss ``state_dict``
(coefficients, ``anneal_beta``, stat tracker, config), sampler generator, torch RNG, trainer epoch
and step count, the return window and, pickled apart, the gymnasium sub-envs and the collector's
carried tensordict (current observations and running episode returns). A resumed run with
``trust_checkpoint`` therefore continues exactly like the uninterrupted one (tested bit for bit),
relying on one private TorchRL attribute, ``Collector._carrier``, as TorchRL 0.14 has no public way
to restore it; without it the episodes restart.

MettaGrid presets (``mettagrid:arena-8``) run as ``bridges.torchrl.mettagrid.MettaGridEnv`` (a batch
row per agent) with GridCNN's architecture and init; their checkpoints hold the adapter's episode-seed
generator instead of the simulators (which cannot be pickled): a resumed run starts fresh episodes,
as the core's does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase, TensorDictSequential
from torchrl.collectors import Collector
from torchrl.envs import GymWrapper, RewardSum, TransformedEnv
from torchrl.modules import ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from metta_core.config import ADAM_EPS
from metta_core.envs import is_mettagrid, make_training_env
from metta_core.errors import MettaError
from metta_core.gym_env import check_env_id
from metta_core.phase import PhaseSizes, PhaseStats, clip_and_step, run_phase
from metta_core.policy import mlp
from metta_core.run import (
    ReturnTracker, TrainArgs, announce_untrusted_resume, build_policy, check_shapes, drive, make_checkpoint,
    phase_learning_rate, preflight, read_checkpoint, refuse_ppo_settings, save_checkpoint, set_learning_rate,
    target_return,
)
from metta_core.runlog import REWARD_RATE_KEY, RETURN_KEY

from bridges.torchrl.layout import TIME_DIM_NAME
from bridges.torchrl.loss import MettaPPOLoss
from bridges.torchrl.mettagrid import HIDDEN_KEY, MettaGridEnv, grid_actor_critic
from bridges.torchrl.phase import LOSS_PREFIX, MettaPPOPhase
from bridges.torchrl.recurrent import (
    add_recurrent_transforms, from_recurrent_actor_critic, recurrent_modules, zero_carried_state,
)
from bridges.torchrl.sampler import MettaSegmentSampler


def make_env(env_id: str, num_envs: int, seed: int) -> TransformedEnv:
    """``num_envs`` copies of ``env_id`` stepped in this process, with episode returns.

    gymnasium's ``SyncVectorEnv`` with auto-reset disabled is what TorchRL's ``GymWrapper``
    prefers (TorchRL resets finished copies itself, so ``("next", "observation")`` is the true
    last observation); ``GymEnv(..., num_envs=n)`` would start ``n`` subprocesses instead.
    ``RewardSum`` writes the running episodic return to ``episode_reward``.
    """
    check_env_id(env_id, "--env")  # also registers this package's CartPoleNoVel-v1
    venv = gym.make_vec(
        env_id, num_envs=num_envs, vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED},
    )
    if not isinstance(venv.single_action_space, gym.spaces.Discrete):
        raise MettaError(
            f"bridges.torchrl.train builds a Categorical actor and needs a Discrete action space; {env_id} has "
            f"{venv.single_action_space}. MettaPPOLoss itself takes any actor distribution with log_prob/entropy"
        )
    env = TransformedEnv(GymWrapper(venv, categorical_action_encoding=True), RewardSum())
    env.set_seed(seed)
    return env


def make_actor_critic(env: TransformedEnv, hidden_size: int) -> tuple[ProbabilisticActor, ValueOperator]:
    """Separate tanh MLPs (two hidden layers, the core's init): a Categorical actor and a critic."""
    obs_dim = env.observation_spec["observation"].shape[-1]
    n_actions = env.action_spec.space.n
    hidden = (hidden_size, hidden_size)
    actor = ProbabilisticActor(
        TensorDictModule(mlp(obs_dim, hidden, n_actions, 0.01), in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"], spec=env.full_action_spec, distribution_class=torch.distributions.Categorical,
        return_log_prob=True,
    )
    critic = ValueOperator(mlp(obs_dim, hidden, 1, 1.0), in_keys=["observation"])
    return actor, critic


def make_recurrent_actor_critic(
    env: TransformedEnv, cell: str, hidden_size: int,
) -> tuple[ProbabilisticActor, TensorDictModuleBase]:
    """``RecurrentActorCritic``'s network as TorchRL modules (``LSTMModule`` / ``GRUModule``), with the
    weights of a core ``RecurrentActorCritic`` built here (the core run's init from the same seed);
    ``InitTracker`` and the modules' primers are appended to ``env``."""
    venv = env.base_env._env
    core = build_policy(cell, venv.single_observation_space, venv.single_action_space, hidden_size)
    actor, critic = from_recurrent_actor_critic(core, env.full_action_spec)
    add_recurrent_transforms(env, actor, critic)
    return actor, critic


NATIVE_UNREAD_PPO_SETTINGS = ("target_kl", "vtrace", "prioritized_experience_replay", "schedule")
"""``PPOConfig`` settings ``ClipPPOLoss`` + ``GAE`` cannot express (no early stop, ratio-free GAE, uniform
flat minibatches, a loss that trains every epoch): a changed one is refused with ``--compare-native``."""


def check_native_settings(args: TrainArgs) -> None:
    """Refuse what the native comparison cannot train: MettaGrid, and ``--ppo`` settings ``native_clip_ppo``
    would silently not apply."""
    if is_mettagrid(args.env):
        raise MettaError(f"--compare-native is not available for --env {args.env} (TorchRL's GAE would run the "
                         f"critic on ('next', 'hidden')); train without --compare-native")
    refuse_ppo_settings(args, NATIVE_UNREAD_PPO_SETTINGS, "TorchRL's ClipPPOLoss + GAE (--compare-native)",
                        "drop --compare-native, or these --ppo settings for the comparison")


def native_clip_ppo(actor: ProbabilisticActor, critic: ValueOperator, args: TrainArgs,
                    functional: bool = True) -> ClipPPOLoss:
    """TorchRL's own ``ClipPPOLoss`` + ``GAE`` with Metta's coefficients where they mean the same.

    TorchRL's ``"l2"`` critic loss has no 1/2 factor, so ``critic_coeff = vf_coef / 2``.
    ``functional`` is ``ClipPPOLoss``'s (``False``: no parameter swap per call).
    """
    cfg = args.ppo_config()
    loss = ClipPPOLoss(
        actor, critic, clip_epsilon=cfg.clip_coef, entropy_coeff=cfg.ent_coef, critic_coeff=cfg.vf_coef / 2,
        loss_critic_type="l2", normalize_advantage=cfg.norm_adv,
        clip_value=cfg.vf_clip_coef if cfg.clip_vloss else None, functional=functional,
    )
    # torch.vmap has no batching rule for nn.LSTM/GRU: a recurrent critic is called in a plain loop
    recurrent = bool(recurrent_modules(critic))
    loss.make_value_estimator(GAE(gamma=cfg.gamma, lmbda=cfg.gae_lambda, value_network=critic,
                                  deactivate_vmap=recurrent))
    return loss


UNREAD_GRID_ENTRIES = (("next", "observation"), HIDDEN_KEY, "logits")
"""MettaGrid batch entries Metta's loss never reads: the next grid (as large as the observation; only
TorchRL's own estimators read it) and the collection-time trunk output and logits (recomputed)."""


def make_mettagrid_env(env_id: str, num_envs: int, seed: int) -> MettaGridEnv:
    """``num_envs`` arenas of the MettaGrid preset ``env_id`` (the core's adapter), one batch row per agent."""
    return MettaGridEnv(make_training_env(env_id, num_envs, seed))


class TorchRLRun:
    """Everything a TorchRL training run holds, built from ``TrainArgs``.

    A MettaGrid preset (``mettagrid:arena-8``) runs as ``MettaGridEnv`` (a batch row per agent)
    with GridCNN's architecture and init (``grid_actor_critic``); its rows log
    ``reward_per_agent_step`` and the learning curve plots it against agent steps, as the core's do.
    """

    def __init__(self, args: TrainArgs, native: bool = False) -> None:
        self.args = args
        self.sizes = args.trainer_config().sizes
        self.ppo_cfg = args.ppo_config()
        if args.device != "cpu":
            raise MettaError(f"bridges.torchrl.train runs on CPU only, got device={args.device!r}; use --device cpu")
        self.mettagrid = is_mettagrid(args.env)
        if native:
            check_native_settings(args)
        torch.manual_seed(args.seed)
        if self.mettagrid:
            if args.policy != "mlp":
                raise MettaError(f"--policy {args.policy}: the torchrl bridge trains --env {args.env} with the grid CNN "
                                 f"only; use --policy mlp (recurrent policies train on gymnasium envs)")
            self.env: TransformedEnv | MettaGridEnv = make_mettagrid_env(args.env, args.num_envs, args.seed)
            grid = self.env.environment
            self.actor, self.critic = grid_actor_critic(
                grid.single_observation_space.shape, int(grid.single_action_space.n), grid.feature_scale,
                action_spec=self.env.full_action_spec,
            )
        else:
            self.env = make_env(args.env, args.num_envs, args.seed)
            if args.policy == "mlp":
                self.actor, self.critic = make_actor_critic(self.env, args.hidden_size)
            else:
                self.actor, self.critic = make_recurrent_actor_critic(self.env, args.policy, args.hidden_size)
        self.recurrent = recurrent_modules(self.actor, self.critic)
        self.curve_key = REWARD_RATE_KEY if self.mettagrid else RETURN_KEY
        rows = self.env.batch_size.numel()
        if args.batch_size % (rows * args.bptt_horizon):
            raise MettaError(
                f"--batch-size {args.batch_size} must be a multiple of {rows} rows ("
                f"{'agents' if self.mettagrid else 'envs'}) x --bptt-horizon {args.bptt_horizon} so every row's "
                f"steps split into whole segments; e.g. --batch-size "
                f"{rows * args.bptt_horizon * max(1, args.batch_size // (rows * args.bptt_horizon))}"
            )
        self.policy = TensorDictSequential(self.actor, self.critic)
        self.native = native
        if self.native:
            self.loss: MettaPPOLoss | ClipPPOLoss = native_clip_ppo(self.actor, self.critic, args)
        else:
            self.loss = MettaPPOLoss(self.actor, self.critic, self.ppo_cfg)
        self.optimizer = torch.optim.Adam(self.loss.parameters(), lr=args.learning_rate, eps=ADAM_EPS)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.sampler = MettaSegmentSampler(
            self.loss, minibatch_segments=self.sizes["minibatch_segments"], total_timesteps=args.total_timesteps,
            update_epochs=args.update_epochs, generator=self.generator,
        ) if not self.native else None
        self.train_phase = MettaPPOPhase(
            self.loss, self.optimizer, self.sampler, accumulate_minibatches=self.sizes["accumulate_minibatches"],
        ) if not self.native else None
        self.collector = self._make_collector()
        self._batches = iter(self.collector)
        self.returns = ReturnTracker(target_return(args))
        self.epoch = 0
        self.env_steps = 0

    def _make_collector(self) -> Collector:
        return Collector(
            self.env, self.policy, frames_per_batch=self.args.batch_size, total_frames=-1,
            auto_register_policy_transforms=False,
        )

    def iteration(self) -> dict[str, float]:
        """Collect one batch and train on it; returns the row to log."""
        started = time.perf_counter()
        data = next(self._batches)
        if self.recurrent:  # Metta zeroes every agent's state when a rollout starts (SPEC §5 on_rollout_start)
            zero_carried_state(self.collector, self.recurrent)
        self.env_steps += data.numel()
        reward_rate = {}
        if self.mettagrid:
            self.returns.add(self.env.environment.pop_finished_episodes()[0], self.env_steps)
            reward_rate[REWARD_RATE_KEY] = self.env.environment.pop_reward_rate()
        else:
            done = data["next", "done"]
            self.returns.add(data["next", "episode_reward"][done].tolist(), self.env_steps)
        set_learning_rate(self.optimizer, phase_learning_rate(self.args, self.env_steps - data.numel()))
        stats = self._train_native(data) if self.native else self._train_metta(data)
        self.epoch += 1
        return {
            "env_steps": self.env_steps,
            "epoch": self.epoch,
            "episode_return_mean": self.returns.mean,
            **reward_rate,
            "episodes": self.returns.episodes,
            "steps_per_second": data.numel() / (time.perf_counter() - started),
            **stats,
        }

    def _train_metta(self, data: TensorDictBase) -> dict[str, float]:
        if self.mettagrid:  # entries the loss does not read, which every minibatch would otherwise copy
            data = data.exclude(*UNREAD_GRID_ENTRIES)
        rows = data.reshape(-1, self.args.bptt_horizon)  # each env's steps cut into consecutive rows
        rows.names = [None, TIME_DIM_NAME]
        return self.train_phase(rows, epoch=self.epoch)

    def _train_native(self, data: TensorDictBase) -> dict[str, float]:
        """TorchRL's recipe: GAE over the whole ``[num_envs, S]`` batch, then per update epoch a
        fresh permutation cut into flat minibatches (of whole ``bptt_horizon`` rows for a recurrent
        policy, run in recurrent mode by ``ClipPPOLoss``); Metta's accumulation, clip and step."""
        data = data.exclude(self.loss.tensor_keys.value)  # GAE evaluates the critic on obs and next obs itself
        with torch.no_grad():
            self.loss.value_estimator(data, params=self.loss.critic_network_params.detach())
        # recurrent modules need whole rows (TorchRL's recurrent PPO recipe); an MLP takes single steps
        flat = data.reshape(-1, self.args.bptt_horizon) if self.recurrent else data.reshape(-1)
        mb_size = self.sizes["minibatch_segments"] if self.recurrent else self.sizes["minibatch_size"]
        tracked = PhaseStats()
        order = torch.arange(flat.shape[0])

        def minibatch(_epoch: int, mb_idx: int) -> tuple[torch.Tensor, bool]:
            nonlocal order
            if mb_idx == 0:
                order = torch.randperm(flat.shape[0], generator=self.generator)
            loss_td = self.loss(flat[order[mb_idx * mb_size:(mb_idx + 1) * mb_size]])
            # on [B, T] rows ClipPPOLoss reports explained_variance and ESS per row: logged as their means
            tracked.track({k: float(v.detach().mean()) for k, v in loss_td.items()})
            return sum(v for k, v in loss_td.items() if k.startswith(LOSS_PREFIX)), False

        sizes = PhaseSizes(
            update_epochs=self.args.update_epochs, num_minibatches=flat.shape[0] // mb_size,
            minibatch_segments=self.sizes["minibatch_segments"],
            accumulate_minibatches=self.sizes["accumulate_minibatches"],
        )
        run_phase(sizes, minibatch, zero_grad=self.optimizer.zero_grad,
                  step=clip_and_step(self.loss.parameters(), [self.optimizer], self.ppo_cfg.max_grad_norm))
        return tracked.means()

    def state_dict(self) -> dict[str, Any]:
        """Everything but the env, in types ``torch.load(weights_only=True)`` reads (see ``env_state``)."""
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "env_steps": self.env_steps,
            "returns": self.returns.state_dict(),
        }

    def env_state(self) -> dict[str, Any]:
        """The gymnasium sub-envs and the collector's carried tensordict (current observations, running
        returns): pickled, restored only when trusted. MettaGrid: the adapter's ``state_dict`` (episode-seed
        generator, finished episodes; no simulator, which cannot be pickled)."""
        if self.mettagrid:
            return {"mettagrid": self.env.environment.state_dict()}
        return {"sub_envs": self.env.base_env._env.envs, "carrier": self.collector._carrier.clone()}

    def load_state_dict(self, state: dict[str, Any], env_state: dict[str, Any] | None = None) -> None:
        """Restore ``state``; the env and the collector's carrier too when ``env_state`` is given, else
        they keep their fresh episodes. The learning rate is this run's ``--learning-rate``."""
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_learning_rate(self.optimizer, self.args.learning_rate)
        self.loss.load_state_dict(state["loss"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        self.epoch = state["epoch"]
        self.env_steps = state["env_steps"]
        self.returns.load_state_dict(state["returns"])
        if env_state is not None and self.mettagrid:
            self.env.environment.load_state_dict(env_state["mettagrid"])  # fresh episodes, logged
            self.collector.shutdown(close_env=False)  # a new collector starts from the fresh episodes' observations
            self.collector = self._make_collector()
            self._batches = iter(self.collector)
        elif env_state is not None:
            self.env.base_env._env.envs = env_state["sub_envs"]
            self.collector._carrier = env_state["carrier"].clone()
        torch.set_rng_state(state["torch_rng"])

    def save(self, path: Path) -> None:
        save_checkpoint(make_checkpoint("torchrl", self.args, self.state_dict(), self.env_state()), path)

    def load(self, path: Path, *, trust: bool | None = None) -> None:
        """Resume from ``path`` (verified by ``read_checkpoint``); ``trust`` (default
        ``args.trust_checkpoint``) also restores the pickled env and collector state."""
        args = self.args if trust is None else dataclasses.replace(self.args, trust_checkpoint=trust)
        state, env_state = read_checkpoint(path, args, "torchrl")
        check_shapes(state["policy"], self.policy, path)
        self.load_state_dict(state, env_state)

    def close(self) -> None:
        self.collector.shutdown()


def train(args: TrainArgs) -> dict[str, Any]:
    """Train with Metta's PPO in TorchRL, then (``compare_native``) with TorchRL's ClipPPOLoss; returns a summary."""
    preflight(args)
    if args.compare_native:
        check_native_settings(args)  # before the Metta run, not after it
    run = TorchRLRun(args)
    if args.resume is not None:
        run.load(args.resume)
        announce_untrusted_resume(args.resume, args)
    summary = drive(run, args, "torchrl", checkpoint=args.save_checkpoint, resumed=args.resume is not None)
    if args.compare_native:
        summary["native"] = drive(TorchRLRun(args, native=True), args, "torchrl-native", out_dir=args.out_dir / "native")
    return summary
