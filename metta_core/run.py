"""The core framework's training run: a gymnasium env, ``ActorCritic``, ``PPO`` and ``CoreTrainingLoop``.

``metta-bridges train --framework core`` calls ``train``. A checkpoint holds the policy,
optimizer, loss state, experience bookkeeping, env state, RNG states and trainer epoch, so a
resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from metta_core.config import ADAM_EPS, PPOConfig, TrainerConfig
from metta_core.errors import MettaError
from metta_core.experience import Experience
from metta_core.gym_env import GymVectorEnvironment
from metta_core.policy import ActorCritic
from metta_core.ppo import PPO
from metta_core.runlog import RunLogger
from metta_core.loop import ComponentContext, CoreTrainingLoop

RETURN_WINDOW = 100
"""Episodes in the moving window behind ``episode_return_mean`` (as in CleanRL and RLlib)."""


def setting(default: Any, help: str) -> Any:
    """A ``TrainArgs`` field with its one-line help (shown by ``metta-bridges train --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArgs:
    """Settings of one ``metta-bridges train`` run (shared by all frameworks).

    Settings only one framework reads live with its bridge (``bridges.rllib.settings.RLlibSettings``);
    ``compare_native`` stays here because TorchRL and RLlib both read it."""

    framework: str = setting("core", "core, torchrl or rllib.")
    env: str = setting("CartPole-v1", 'A gymnasium env id with a Box observation space.')
    seed: int = setting(0, 'Seeds the env, the policy init and every sampler.')
    total_timesteps: int = setting(500_000, 'Env-step budget of the run.')
    out_dir: Path = setting(Path("runs/train"), 'Where metrics, the learning curve and checkpoints go.')
    metrics_format: str = setting("jsonl", 'jsonl or csv.')
    save_checkpoint: Path | None = setting(None, 'Write a checkpoint here at the end (and every ``checkpoint_every`` iterations).')
    checkpoint_every: int = setting(0, 'Iterations between checkpoints; 0 saves only at the end.')
    resume: Path | None = setting(None, 'Continue from this checkpoint.')
    num_envs: int = setting(8, 'Parallel env copies (agents).')
    batch_size: int = setting(2048, 'Env steps per rollout phase.')
    bptt_horizon: int = setting(32, 'Steps per buffer row.')
    minibatch_size: int = setting(512, 'Env steps per minibatch.')
    max_minibatch_size: int = setting(32768, 'Largest minibatch run at once (larger requests accumulate gradients).')
    update_epochs: int = setting(4, 'Passes over the buffer per training phase.')
    learning_rate: float = setting(1e-3, 'Adam learning rate.')
    anneal_lr: bool = setting(False, "Decay the learning rate linearly to 0 over total_timesteps (as CleanRL does).")
    hidden_size: int = setting(64, 'Width of the two hidden layers of actor and critic.')
    target_return: float | None = setting(475.0, 'Mean episodic return (over the last 100 episodes) that counts as solved.')
    stop_at_target: bool = setting(True, 'End the run as soon as ``target_return`` is reached.')
    progress: bool = setting(True, 'Show a progress bar.')
    device: str = setting("cpu", 'Torch device of the learner.')
    ppo: dict[str, Any] = field(default_factory=dict, metadata={"help": 'PPOConfig overrides by dotted path, e.g. {"vtrace.rho_clip": 0.8}.'})
    compare_native: bool = setting(False, "torchrl/rllib: also train the framework's own PPO with the same settings.")

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig(
            batch_size=self.batch_size, bptt_horizon=self.bptt_horizon, minibatch_size=self.minibatch_size,
            max_minibatch_size=self.max_minibatch_size, update_epochs=self.update_epochs,
            total_timesteps=self.total_timesteps,
        )

    def ppo_config(self) -> PPOConfig:
        return PPOConfig().update(self.ppo)  # type: ignore[return-value]


class ReturnTracker:
    """Moving mean of the last ``RETURN_WINDOW`` episodic returns, and when it first hit the target."""

    def __init__(self, target: float | None) -> None:
        self.window: deque[float] = deque(maxlen=RETURN_WINDOW)
        self.episodes = 0
        self.target = target
        self.steps_to_target: int | None = None

    def add(self, returns: list[float], env_steps: int) -> None:
        self.window.extend(returns)
        self.episodes += len(returns)
        if self.reached and self.steps_to_target is None:
            self.steps_to_target = env_steps

    @property
    def mean(self) -> float:
        return sum(self.window) / len(self.window) if self.window else float("nan")

    @property
    def reached(self) -> bool:
        return self.target is not None and len(self.window) == RETURN_WINDOW and self.mean >= self.target

    def state_dict(self) -> dict:
        return {"window": list(self.window), "episodes": self.episodes, "steps_to_target": self.steps_to_target}

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(state["window"])
        self.episodes = state["episodes"]
        self.steps_to_target = state["steps_to_target"]


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write a run's ``state_dict`` with ``torch.save``, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; a missing file names ``--resume``."""
    if not Path(path).exists():
        raise MettaError(f"checkpoint {path} does not exist; check --resume")
    return torch.load(path, weights_only=False)  # our own files: RNG states and pickled envs


class CoreRun:
    """Everything a core training run holds, built from ``TrainArgs``."""

    def __init__(self, args: TrainArgs) -> None:
        self.args = args
        self.trainer_cfg = args.trainer_config()
        self.ppo_cfg = args.ppo_config()
        torch.manual_seed(args.seed)
        self.device = torch.device(args.device)
        self.env = GymVectorEnvironment(args.env, args.num_envs, args.seed)
        self.policy = ActorCritic(
            self.env.single_observation_space, self.env.single_action_space, (args.hidden_size,) * 2
        ).to(self.device)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=args.learning_rate, eps=ADAM_EPS)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.ppo = PPO(self.policy, self.trainer_cfg, self.env, self.device, "ppo", self.ppo_cfg, self.generator)
        spec = self.policy.get_agent_experience_spec().merge(self.ppo.get_experience_spec())
        self.experience = Experience(
            self.env.num_agents, args.batch_size, args.bptt_horizon, args.minibatch_size,
            args.max_minibatch_size, spec, self.device,
        )
        self.context = ComponentContext(
            policy=self.policy, experience=self.experience, optimizer=self.optimizer,
            config=self.trainer_cfg, device=self.device,
        )
        self.loop = CoreTrainingLoop(
            self.policy, self.experience, {"ppo": self.ppo}, self.optimizer, self.device, self.context
        )
        self.returns = ReturnTracker(args.target_return)
        self.ppo.on_new_training_run(self.context)

    def iteration(self) -> dict[str, float]:
        """One trainer epoch: rollout, training phase; returns the row to log."""
        ctx = self.context
        started = time.perf_counter()
        self.loop.on_epoch_start(ctx)
        rollout = self.loop.rollout_phase(self.env, ctx)
        ctx.agent_step += rollout.agent_steps
        self.returns.add(rollout.episode_returns, ctx.agent_step)
        if self.args.anneal_lr:
            remaining = max(0.0, 1.0 - (ctx.agent_step - rollout.agent_steps) / self.args.total_timesteps)
            for group in self.optimizer.param_groups:
                group["lr"] = self.args.learning_rate * remaining
        stats, epochs = self.loop.training_phase(ctx, self.trainer_cfg.update_epochs, self.ppo_cfg.max_grad_norm)
        ctx.epoch += 1
        return {
            "env_steps": ctx.agent_step,
            "epoch": ctx.epoch,
            "episode_return_mean": self.returns.mean,
            "episodes": self.returns.episodes,
            "update_epochs_trained": epochs,
            "steps_per_second": rollout.agent_steps / (time.perf_counter() - started),
            **stats,
        }

    def state_dict(self) -> dict:
        return {
            "args": dataclasses.asdict(self.args),
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "losses": {"ppo": self.ppo.state_dict()},
            "epoch": self.context.epoch,
            "agent_step": self.context.agent_step,
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "env": self.env.state_dict(),
            "experience": self.experience.state_dict(),
            "returns": self.returns.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ppo.load_state_dict(state["losses"]["ppo"])
        self.context.epoch = state["epoch"]
        self.context.agent_step = state["agent_step"]
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        self.env.load_state_dict(state["env"])
        self.experience.load_state_dict(state["experience"])
        self.returns.load_state_dict(state["returns"])

    @property
    def env_steps(self) -> int:
        return self.context.agent_step

    def close(self) -> None:
        self.env.close()

    def save(self, path: Path) -> None:
        save_checkpoint(self.state_dict(), path)

    def load(self, path: Path) -> None:
        self.load_state_dict(load_checkpoint(path))


class TrainingRun(Protocol):
    """What ``drive`` needs from a framework's run: one iteration at a time, save, close."""

    returns: ReturnTracker

    @property
    def env_steps(self) -> int: ...

    def iteration(self) -> dict[str, float]:
        """Collect and train once; the row to log (with cumulative ``env_steps``)."""
        ...

    def save(self, path: Path) -> None: ...

    def close(self) -> None: ...


def drive(
    run: TrainingRun, args: TrainArgs, label: str, *, out_dir: Path | None = None,
    checkpoint: Path | None = None, resumed: bool = False,
) -> dict[str, Any]:
    """The training loop every framework shares: log each iteration, checkpoint every
    ``args.checkpoint_every`` iterations and at the end, stop at the budget or (with
    ``args.stop_at_target``) at the target return; returns the run's summary."""
    logger = RunLogger(
        out_dir or args.out_dir, args.total_timesteps, metrics_format=args.metrics_format,
        progress=args.progress, resume=resumed, title=f"{label} {args.env} seed {args.seed}",
    )
    started = time.perf_counter()
    iteration = 0
    try:
        while run.env_steps < args.total_timesteps:
            logger.log(run.iteration())
            iteration += 1
            if checkpoint and args.checkpoint_every and iteration % args.checkpoint_every == 0:
                run.save(checkpoint)
            if args.stop_at_target and run.returns.reached:
                break
        if checkpoint:
            run.save(checkpoint)
    finally:
        curve = logger.close()
        run.close()
    return {
        "framework": label,
        "env_steps": run.env_steps,
        "episode_return_mean": run.returns.mean,
        "steps_to_target": run.returns.steps_to_target,
        "wall_time_s": time.perf_counter() - started,
        "metrics": str(logger.metrics_path),
        "learning_curve": str(curve),
    }


def train(args: TrainArgs) -> dict[str, Any]:
    """Run the core trainer; returns a summary (env steps, final mean return, steps to target)."""
    run = CoreRun(args)
    if args.resume is not None:
        run.load(args.resume)
    return drive(run, args, "core", checkpoint=args.save_checkpoint, resumed=args.resume is not None)
