"""``metta-bridges train --framework rllib``: Metta's PPO on RLlib (and, optionally, RLlib's own PPO).

Ray starts privately on this machine unless ``settings.address`` names a cluster
(``bridges.rllib.cluster``); ``settings.num_learners`` / ``settings.num_env_runners`` scale out
(learners use DDP over gloo on CPU). ``settings`` is an ``RLlibSettings`` (the CLI's rllib flags).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
)

from bridges.rllib.cluster import join_ray
from bridges.rllib.config import metta_ppo_config
from bridges.rllib.module import OrthogonalInitPPOModule
from bridges.rllib.recurrent import MettaRecurrentModule
from metta_core import cartpole_no_velocity
from bridges.rllib.settings import RLlibSettings
from metta_core.envs import is_mettagrid
from metta_core.errors import MettaError
from metta_core.run import (
    ReturnTracker, TrainArgs, checkpoint_header, drive, preflight, refuse_ppo_settings, target_return, verify_header,
)
from metta_core.runlog import REWARD_RATE_KEY, RETURN_KEY

LEARNER_KEYS = (
    "policy_loss", "vf_loss", "entropy", "approx_kl", "clipfrac", "importance", "current_logprobs",
    "explained_variance",
)


EPISODE_RETURNS_KEY = "metta_episode_returns"
"""Env-runner metric: every finished episode's return (an item series), for the 100-episode mean;
per agent for multi-agent episodes (MettaGrid: the core's per-agent episode return)."""
REWARD_SUM_KEY = "metta_reward_sum"
"""Env-runner metric: the rewards of each ``sample()`` call summed over agents and steps (an item series)."""
AGENT_STEPS_KEY = "metta_agent_steps"
"""Env-runner metric: the agent-steps of each ``sample()`` call (an item series)."""

SHARED_MODULE_ID = "shared"
"""The one module every MettaGrid agent maps to (not RLlib's ``default_policy``: with that id alone
RLlib would treat the run as single-agent)."""


def _agent_chunks(chunk) -> dict:
    """``{key: single-agent chunk}``: a multi-agent chunk's agents (key ``(episode id, agent id)``) or
    the chunk itself (key its episode id)."""
    if hasattr(chunk, "agent_episodes"):
        return {(chunk.id_, aid): sa for aid, sa in chunk.agent_episodes.items()}
    return {chunk.id_: chunk}


class EpisodeReturns(RLlibCallback):
    """Report each finished episode's return (each agent's, for a multi-agent episode), so the driver
    keeps the same mean as the core trainer, and per ``sample()`` the rewards and agent-steps (the
    core's ``reward_per_agent_step``).

    An episode longer than a rollout fragment arrives in chunks; ``on_episode_end`` sees only the
    last one, so the returns of its earlier chunks are kept here by episode (and agent) id.
    """

    def __init__(self) -> None:
        super().__init__()
        self._earlier_chunks: dict = {}

    def on_sample_end(self, *, samples, metrics_logger=None, **kwargs) -> None:
        reward_sum, agent_steps = 0.0, 0
        for chunk in samples:
            for key, part in _agent_chunks(chunk).items():
                ret = float(part.get_return())
                reward_sum += ret
                agent_steps += len(part)
                if not chunk.is_done:
                    self._earlier_chunks[key] = self._earlier_chunks.get(key, 0.0) + ret
        if metrics_logger is not None:
            metrics_logger.log_value(REWARD_SUM_KEY, reward_sum, reduce="item_series")
            metrics_logger.log_value(AGENT_STEPS_KEY, agent_steps, reduce="item_series")

    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        for key, part in _agent_chunks(episode).items():
            total = self._earlier_chunks.pop(key, 0.0) + float(part.get_return())
            metrics_logger.log_value(EPISODE_RETURNS_KEY, total, reduce="item_series")


def shared_module(agent_id, episode, **kwargs) -> str:
    """``policy_mapping_fn`` of the MettaGrid runs: every agent to ``SHARED_MODULE_ID``."""
    return SHARED_MODULE_ID


def _series_sum(runners: dict, key: str) -> float:
    """The sum of an item-series metric (a series of one item arrives as a bare number)."""
    return float(np.ravel(np.asarray(runners.get(key, []), dtype=np.float64)).sum())


def _mettagrid_settings(config, args: TrainArgs):
    """A MettaGrid preset: ``MettaGridMultiAgentEnv`` per simulation, every agent mapped to one
    ``GridCNNModule`` (the core's ``GridCNN`` init for ``args.seed``), batch sizes in agent-steps."""
    from bridges.rllib.grid_module import GridCNNModule
    from bridges.rllib.mettagrid_env import MettaGridMultiAgentEnv

    if args.policy != "mlp":
        raise MettaError(f"--policy {args.policy} with --env {args.env}: the RLlib bridge trains MettaGrid with the "
                         f"core's GridCNN only; use --policy mlp")
    probe = MettaGridMultiAgentEnv({"env": args.env})
    scale = probe.feature_scale.tolist()
    agents = len(probe.possible_agents)
    probe.close()
    module = RLModuleSpec(module_class=GridCNNModule, model_config={"seed": args.seed, "feature_scale": scale})
    return (
        # normalize_actions=False: MettaGrid's actions are Discrete, which RLlib's action normalization leaves as
        # they are; it only deep-copies every step's actions (0.1 CPU s of 0.69 per arena-24 iteration)
        config.environment(MettaGridMultiAgentEnv, env_config={"env": args.env, "seed": args.seed},
                           normalize_actions=False)
        .training(lr=learning_rate_setting(args, agents))
        .multi_agent(policies={SHARED_MODULE_ID}, policy_mapping_fn=shared_module, count_steps_by="agent_steps")
        .rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs={SHARED_MODULE_ID: module}))
    )


def module_spec(args: TrainArgs) -> tuple[RLModuleSpec, dict[str, Any]]:
    """The ``--policy`` network as ``(RLModuleSpec, model_config)``: ``OrthogonalInitPPOModule`` (RLlib's
    default PPO module with ``ActorCritic``'s init) for ``mlp``; ``MettaRecurrentModule`` (the core's
    ``RecurrentActorCritic``, drawn with the run's seed as the core draws it) for ``lstm``/``gru``."""
    if args.policy in ("lstm", "gru"):
        return RLModuleSpec(module_class=MettaRecurrentModule), {
            "cell": args.policy, "hidden_size": args.hidden_size, "seed": args.seed, "max_seq_len": args.bptt_horizon,
        }
    return RLModuleSpec(module_class=OrthogonalInitPPOModule), {
        "fcnet_hiddens": [args.hidden_size] * 2,
        "fcnet_activation": "tanh",
        "head_fcnet_hiddens": [],
        "vf_share_layers": False,
    }


def env_id(name: str) -> str:
    """The env id for RLlib's env runners: ``CartPoleNoVel-v1`` as ``module:id``, so a remote runner's
    ``gym.make`` imports the module that registers it."""
    return f"{cartpole_no_velocity.__name__}:{name}" if name == cartpole_no_velocity.ENV_ID else name


def learning_rate_setting(args: TrainArgs, agents_per_env: int = 1) -> float | list[list[float]]:
    """RLlib's ``lr``: ``learning_rate``, or with ``--anneal-lr`` the piecewise-linear schedule from it at
    step 0 to 0 at ``total_timesteps``.

    RLlib sets the rate after each update from the lifetime env steps sampled so far, so an update uses
    the rate at the steps before its rollout, as the core's ``phase_learning_rate``. Those are env steps,
    while a MettaGrid budget counts agent-steps (``agents_per_env`` per env step): the schedule ends at
    ``total_timesteps / agents_per_env`` env steps."""
    if not args.anneal_lr:
        return args.learning_rate
    return [[0, args.learning_rate], [args.total_timesteps / agents_per_env, 0.0]]


def _rllib_settings(config, args: TrainArgs, settings: RLlibSettings | None):
    """Settings shared by the Metta and the native run: env runners, learners, lr, network, seed."""
    settings = settings or RLlibSettings()
    runners = max(1, settings.num_env_runners)
    if args.num_envs % runners:
        fits = sorted({max(1, args.num_envs // runners) * runners, (args.num_envs // runners + 1) * runners})
        raise MettaError(
            f"--num-envs {args.num_envs} with --num-env-runners {settings.num_env_runners}: every runner steps the "
            f"same number of envs, so the run would step {max(1, args.num_envs // runners) * runners}; give a "
            f"--num-envs that is a multiple of --num-env-runners, e.g. {' or '.join(map(str, fits))}")
    config = (
        config.env_runners(
            num_env_runners=settings.num_env_runners,
            num_envs_per_env_runner=max(1, args.num_envs // runners),
            rollout_fragment_length="auto",
        )
        .fault_tolerance(restart_failed_env_runners=settings.restart_failed_env_runners)
        .learners(num_learners=settings.num_learners)
        .training(lr=learning_rate_setting(args))
        .callbacks(EpisodeReturns)
        .debugging(seed=args.seed)
    )
    if is_mettagrid(args.env):
        return _mettagrid_settings(config, args)
    spec, model_config = module_spec(args)
    return config.environment(env_id(args.env)).rl_module(rl_module_spec=spec, model_config=model_config)


def build_config(args: TrainArgs, settings: RLlibSettings | None = None):
    """The Metta-PPO ``PPOConfig`` for ``args`` (Metta's PPO settings plus ``args.ppo`` overrides).

    Each of ``num_learners`` learners trains ``batch_size`` steps per iteration, so the run has
    ``total_timesteps / (learners * batch_size)`` iterations; a learner's ``total_timesteps`` is its
    share, over which its ``anneal_beta`` (SPEC §4.2) reaches 1 as the run ends."""
    refuse_ppo_settings(args, ("schedule",), "RLlib's MettaPPOLearner (it trains at every iteration)",
                        "drop it, or train with --framework core or torchrl, which honour it")
    learners = max(1, (settings or RLlibSettings()).num_learners)
    metta = metta_ppo_config(
        batch_size=args.batch_size,
        bptt_horizon=args.bptt_horizon,
        minibatch_size=args.minibatch_size,
        max_minibatch_size=args.max_minibatch_size,
        update_epochs=args.update_epochs,
        total_timesteps=max(1, args.total_timesteps // learners),
        **args.ppo,
    )
    return _rllib_settings(metta, args, settings)


NATIVE_UNREAD_PPO_SETTINGS = (
    "norm_adv", "vf_clip_coef", "target_kl", "vtrace", "prioritized_experience_replay", "schedule",
)
"""``PPOConfig`` settings RLlib's own PPO cannot express: its GAE connector always normalizes advantages,
``vf_clip_param`` clamps the squared error (Metta clips the value change), no early stop, ratio-free GAE,
uniform minibatches, a loss that trains every iteration. A changed one is refused with ``--compare-native``."""


def check_native_settings(args: TrainArgs) -> None:
    """Refuse what ``build_native_config`` would silently not apply: MettaGrid, gradient accumulation
    (``--max-minibatch-size`` below ``--minibatch-size``) and the ``NATIVE_UNREAD_PPO_SETTINGS``."""
    if is_mettagrid(args.env):
        raise MettaError(f"--compare-native with --env {args.env}: RLlib's own PPO on MettaGrid is not wired up "
                         f"yet; drop --compare-native")
    if args.max_minibatch_size < args.minibatch_size:
        raise MettaError(
            f"--max-minibatch-size {args.max_minibatch_size} < --minibatch-size {args.minibatch_size} with "
            f"--compare-native: RLlib's own PPO has no gradient accumulation and would step every "
            f"{args.minibatch_size} steps; drop --compare-native or use --max-minibatch-size >= --minibatch-size")
    refuse_ppo_settings(args, NATIVE_UNREAD_PPO_SETTINGS, "RLlib's own PPO (--compare-native)",
                        "drop --compare-native, or these --ppo settings for the comparison")


def build_native_config(args: TrainArgs, settings: RLlibSettings | None = None):
    """RLlib's own PPO with the same sizes, lr, network and the Metta coefficients it can express.

    RLlib's ``vf_loss`` is the mean squared error without Metta's 1/2, so ``vf_loss_coeff = vf_coef / 2``;
    ``clip_vloss=False`` is ``vf_clip_param=inf`` (with it, RLlib's own default clamp of the squared
    error stays). Settings it cannot express are refused (``check_native_settings``).
    """
    check_native_settings(args)
    ppo = args.ppo_config()
    native = RLlibPPOConfig().training(
        train_batch_size_per_learner=args.batch_size,
        minibatch_size=args.minibatch_size,
        num_epochs=args.update_epochs,
        gamma=ppo.gamma,
        lambda_=ppo.gae_lambda,
        clip_param=ppo.clip_coef,
        entropy_coeff=ppo.ent_coef,
        vf_loss_coeff=ppo.vf_coef / 2,
        grad_clip=ppo.max_grad_norm,
        use_kl_loss=False,
    )
    if not ppo.clip_vloss:
        native.training(vf_clip_param=float("inf"))
    return _rllib_settings(native, args, settings)


RETURNS_FILE = "metta_returns.json"
"""Saved next to RLlib's checkpoint files: the 100-episode return window, so a resumed run keeps it."""

HEADER_FILE = "metta_checkpoint.json"
"""Saved next to RLlib's checkpoint files: ``metta_core.run.checkpoint_header`` (format, framework,
env id, settings), verified before RLlib restores anything."""


def verify_rllib_checkpoint(path: Path, args: TrainArgs) -> None:
    """Refuse ``--resume path`` before Ray starts unless it is a folder written by ``RLlibRun.save``
    with compatible settings, and ``--trust-checkpoint`` is given: RLlib's ``restore_from_path``
    unpickles the checkpoint's objects, so it runs code from the folder."""
    header_path = path / HEADER_FILE
    if not header_path.is_file():
        raise MettaError(f"--resume {path}: no {HEADER_FILE} in the folder; give a checkpoint folder written by "
                         f"metta-bridges train --framework rllib --save-checkpoint")
    try:
        header = json.loads(header_path.read_text())
    except (OSError, ValueError) as exc:
        raise MettaError(f"--resume {path}: {HEADER_FILE} is unreadable ({exc}); the checkpoint is damaged") from None
    verify_header(header, path, args, "rllib")
    if not args.trust_checkpoint:
        raise MettaError(f"--resume {path}: RLlib restores its checkpoints by unpickling them, which runs code from "
                         f"the folder; pass --trust-checkpoint if you trust it")


class RLlibRun:
    """An RLlib ``Algorithm`` seen as a ``metta_core.run.TrainingRun`` (one ``train()`` per iteration)."""

    def __init__(self, config, args: TrainArgs, resume=None) -> None:
        if resume is not None:
            verify_rllib_checkpoint(Path(resume), args)
        self.args = args
        self.agent_steps = config.count_steps_by == "agent_steps"
        self.module_id = SHARED_MODULE_ID if is_mettagrid(args.env) else DEFAULT_MODULE_ID
        self.curve_key = REWARD_RATE_KEY if is_mettagrid(args.env) else RETURN_KEY
        self.algo = config.build_algo()
        self.returns = ReturnTracker(target_return(args))
        self.env_steps = 0
        if resume is not None:
            self.algo.restore_from_path(os.path.abspath(resume))
            self._apply_learning_rate()
            # RLlib's lifetime step counter is restored; start from it, so the first row's
            # steps_per_second counts only the steps of that iteration
            self.env_steps = self._steps(self.algo.metrics.peek(ENV_RUNNER_RESULTS, default={}))
            if (Path(resume) / RETURNS_FILE).exists():
                self.returns.load_state_dict(json.loads((Path(resume) / RETURNS_FILE).read_text()))
            if is_mettagrid(args.env):
                print("metta-bridges: MettaGrid simulators are not in checkpoints; the resumed run starts fresh "
                      "episodes", file=sys.stderr)

    def _apply_learning_rate(self) -> None:
        """Set this run's rate (``--learning-rate``, ``--anneal-lr`` at the restored step count) in every
        learner's optimizer. RLlib's restore loads the checkpoint's rate into the optimizer and its lr
        schedule only sets the configured one after the next update, so the first update after a resume
        would use the old ``--learning-rate``; with unchanged settings this sets the rate it already has."""
        lifetime = self.algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        results = self.algo.learner_group.foreach_learner(
            lambda learner: learner.after_gradient_based_update(timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: lifetime})
        )
        for result in results:
            result.get()  # raises a learner's error

    def _steps(self, runners: dict) -> int:
        """Lifetime steps sampled: agent-steps (summed over agent ids) when batches count them."""
        if self.agent_steps:
            per_agent = runners.get(NUM_AGENT_STEPS_SAMPLED_LIFETIME, {})
            return int(sum(per_agent.values())) if isinstance(per_agent, dict) else int(per_agent)
        return int(runners.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0))

    def iteration(self) -> dict[str, float]:
        """One ``algo.train()``; ``episode_return_mean`` is the mean of the last 100 episodes (as the
        core's); MettaGrid rows add ``reward_per_agent_step`` over the iteration's samples."""
        started = time.perf_counter()
        result = self.algo.train()
        runners = result.get(ENV_RUNNER_RESULTS, {})
        learner = result.get(LEARNER_RESULTS, {}).get(self.module_id, {})
        steps = self._steps(runners)
        # an item series of one episode arrives as a bare number
        self.returns.add(np.ravel(np.asarray(runners.get(EPISODE_RETURNS_KEY, []), dtype=np.float64)).tolist(), steps)
        row = {
            "env_steps": steps,
            "episode_return_mean": self.returns.mean,
            "episodes": self.returns.episodes,
            "steps_per_second": (steps - self.env_steps) / max(time.perf_counter() - started, 1e-9),
        }
        if self.curve_key == REWARD_RATE_KEY:
            sampled = _series_sum(runners, AGENT_STEPS_KEY)
            row[REWARD_RATE_KEY] = _series_sum(runners, REWARD_SUM_KEY) / sampled if sampled else float("nan")
        self.env_steps = steps
        row.update({k: float(learner[k]) for k in LEARNER_KEYS if k in learner})
        if "vf_loss" in row:
            row["value_loss"] = row["vf_loss"]  # Metta's name, shown by the progress bar
        return row

    def save(self, checkpoint) -> None:
        """RLlib's checkpoint folder plus the return window and the header, swapped in whole: written
        to a temporary sibling folder, then renamed over ``checkpoint`` (the old folder is renamed
        aside first and removed after, as a non-empty folder cannot be replaced in one rename)."""
        target = Path(checkpoint).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            self.algo.save_to_path(str(tmp))
            (tmp / RETURNS_FILE).write_text(json.dumps(self.returns.state_dict()))
            (tmp / HEADER_FILE).write_text(json.dumps(checkpoint_header("rllib", self.args)))
            old = target.with_name(f".{target.name}.old")
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def close(self) -> None:
        self.algo.stop()


def train(args: TrainArgs, settings: RLlibSettings | None = None) -> dict[str, Any]:
    """Train ``args.env`` with Metta's PPO on RLlib; returns a summary (steps, mean return, steps to target).

    Ray: ``settings.address`` (``bridges.rllib.cluster.join_ray``). With ``args.compare_native``
    RLlib's own PPO runs afterwards with the same settings; its summary is under ``"native"`` and
    its metrics in ``out_dir/native``.
    """
    preflight(args)
    if args.resume is not None:
        verify_rllib_checkpoint(Path(args.resume), args)
    settings = settings or RLlibSettings()
    # both configs before Ray starts: a setting they refuse ends the command before any work
    config = build_config(args, settings)
    native_config = build_native_config(args, settings) if args.compare_native else None
    started_ray = join_ray(settings.address)
    try:
        run = RLlibRun(config, args, resume=args.resume)
        summary = drive(run, args, "rllib", checkpoint=args.save_checkpoint, resumed=args.resume is not None)
        if native_config is not None:
            native = RLlibRun(native_config, args)
            summary["native"] = drive(native, args, "rllib-native", out_dir=args.out_dir / "native")
    finally:
        if started_ray:
            ray.shutdown()
    return summary
