"""The core framework's training run: a gymnasium env, ``ActorCritic``, ``PPO`` and ``CoreTrainingLoop``.

``metta-bridges train --framework core`` calls ``train``. A checkpoint holds the policy,
optimizer, loss state, experience bookkeeping, env state, RNG states and trainer epoch, so a
resumed run continues exactly as the uninterrupted one would have.

Also the pieces every framework's run shares: ``TrainArgs`` and its validation (``validate``,
``preflight``), the checkpoint file format (``save_checkpoint``, ``read_checkpoint``: written
atomically, loadable with ``torch.load(weights_only=True)``, the pickled env state opt-in with
``trust_checkpoint``) and ``drive``, the loop of iterations, logging and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from pydantic import ValidationError

from metta_core.config import ADAM_EPS, PPOConfig, TrainerConfig
from metta_core.errors import MettaError
from metta_core.experience import Experience
from metta_core.cnn_policy import GridCNN
from metta_core.envs import check_mettagrid_id, is_mettagrid, make_training_env
from metta_core.gym_env import TrainingEnvironment, check_env_id
from metta_core.policy import ActorCritic
from metta_core.recurrent_policy import RecurrentActorCritic
from metta_core.ppo import PPO
from metta_core.runlog import REWARD_RATE_KEY, RETURN_KEY, RunLogger
from metta_core.loop import ComponentContext, CoreTrainingLoop

log = logging.getLogger(__name__)

RETURN_WINDOW = 100
"""Episodes in the moving window behind ``episode_return_mean`` (as in CleanRL and RLlib)."""
CARTPOLE_TARGET = 475.0
"""The default ``target_return``: CartPole-v1's solved level (ignored for MettaGrid unless changed)."""


def setting(default: Any, help: str) -> Any:
    """A ``TrainArgs`` field with its one-line help (shown by ``metta-bridges train --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArgs:
    """Settings of one ``metta-bridges train`` run (shared by all frameworks).

    Settings only one framework reads live with its bridge (``bridges.rllib.settings.RLlibSettings``);
    ``compare_native`` stays here because TorchRL and RLlib both read it."""

    framework: str = setting("core", "core, torchrl or rllib.")
    env: str = setting("CartPole-v1", 'A gymnasium env id with a Box observation space, or mettagrid:arena-8 / mettagrid:arena-24.')
    seed: int = setting(0, 'Seeds the env, the policy init and every sampler.')
    total_timesteps: int = setting(500_000, 'Env-step budget of the run (agent-steps for MettaGrid).')
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
    hidden_size: int = setting(64, 'Width of the two hidden layers of actor and critic (mlp), or of the encoder and recurrent state (lstm, gru).')
    policy: str = setting("mlp", 'mlp (ActorCritic), lstm or gru (RecurrentActorCritic, SPEC §6; every framework).')
    target_return: float | None = setting(CARTPOLE_TARGET, 'Mean episodic return (over the last 100 episodes) that counts as solved; MettaGrid: per-agent episode return, no target unless set.')
    stop_at_target: bool = setting(True, 'End the run as soon as ``target_return`` is reached.')
    progress: bool = setting(True, 'Show a progress bar.')
    device: str = setting("cpu", 'Torch device of the learner.')
    ppo: dict[str, Any] = field(default_factory=dict, metadata={"help": 'PPOConfig overrides by dotted path, e.g. {"vtrace.rho_clip": 0.8}.'})
    compare_native: bool = setting(False, "torchrl/rllib: also train the framework's own PPO with the same settings.")
    trust_checkpoint: bool = setting(
        False, "Unpickle the environment state of --resume (exact continuation; runs code from the file: "
        "only for checkpoints you trust). Without it policy, optimizer and loss state load safely and episodes restart.")

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig(
            batch_size=self.batch_size, bptt_horizon=self.bptt_horizon, minibatch_size=self.minibatch_size,
            max_minibatch_size=self.max_minibatch_size, update_epochs=self.update_epochs,
            total_timesteps=self.total_timesteps,
        )

    def ppo_config(self) -> PPOConfig:
        """``PPOConfig`` with the ``ppo`` overrides; a bad override is a ``MettaError`` naming ``--ppo KEY``."""
        try:
            return PPOConfig().update(self.ppo)  # type: ignore[return-value]
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            if isinstance(err.get("input"), dict):  # a rule across a nested config's fields (schedule's cycle):
                given = ", ".join(f"{k}={v!r}" for k, v in self.ppo.items() if k == key or k.startswith(key + "."))
            else:
                given = f"{key}={err.get('input')!r}"
            raise MettaError(
                f"--ppo {given}: {err['msg'].removeprefix('Value error, ')} (PPOConfig.{key}: {_field_help(key)})"
            ) from None
        except MettaError as exc:
            raise MettaError(f"--ppo: {exc}") from None

    def validate(self) -> None:
        """Check every setting without touching the file system (see ``preflight``); raise a
        ``MettaError`` naming the command-line flag, what was expected and the fix."""
        if self.framework not in FRAMEWORKS:
            raise MettaError(f"--framework {self.framework!r}: expected one of {', '.join(FRAMEWORKS)}")
        for name in POSITIVE_SETTINGS:
            _require_int(self, name, 1)
        for name in NON_NEGATIVE_SETTINGS:
            _require_int(self, name, 0)
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise MettaError(f"--learning-rate must be a finite number > 0, got {self.learning_rate!r}")
        if self.target_return is not None and not math.isfinite(self.target_return):
            raise MettaError(f"--target-return must be a finite number (or unset), got {self.target_return!r}")
        if self.metrics_format not in ("jsonl", "csv"):
            raise MettaError(f"--metrics-format {self.metrics_format!r}: expected jsonl or csv")
        if self.checkpoint_every and self.save_checkpoint is None:
            raise MettaError(
                f"--checkpoint-every {self.checkpoint_every} needs --save-checkpoint PATH (where to write them)"
            )
        if self.compare_native and self.framework == "core":
            raise MettaError("--compare-native compares with TorchRL's or RLlib's own PPO: use it with --framework "
                             "torchrl or rllib")
        if self.policy not in POLICIES:
            raise MettaError(f"--policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if is_mettagrid(self.env):
            check_mettagrid_id(self.env, "--env")
            if self.policy == "mlp" and self.hidden_size != _default("hidden_size"):
                raise MettaError(
                    f"--hidden-size {self.hidden_size} with --env {self.env}: the MettaGrid policy is the core's "
                    f"GridCNN, whose layer widths are Metta's and fixed; drop --hidden-size (it sizes --policy lstm|gru, "
                    f"which --framework core trains on MettaGrid)")
        else:
            check_env_id(self.env, "--env")
        self._validate_sizes()
        self._validate_device()
        self.ppo_config()

    def _validate_sizes(self) -> None:
        flags = (f"--batch-size {self.batch_size}, --bptt-horizon {self.bptt_horizon}, --minibatch-size "
                 f"{self.minibatch_size}, --max-minibatch-size {self.max_minibatch_size}")
        try:
            self.trainer_config()
        except ValidationError as exc:
            reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise MettaError(f"{flags} do not fit: {reason}") from None
        row_block = self.num_envs * self.bptt_horizon
        if self.framework in ("core", "torchrl") and self.batch_size % row_block:
            fits = sorted({max(1, self.batch_size // row_block) * row_block, (self.batch_size // row_block + 1) * row_block})
            raise MettaError(
                f"--batch-size {self.batch_size} must be a multiple of --num-envs x --bptt-horizon "
                f"({self.num_envs} x {self.bptt_horizon} = {row_block}) so that every env's steps fill whole rows "
                f"(otherwise steps are silently dropped); e.g. --batch-size {' or '.join(map(str, fits))}"
            )

    def _validate_device(self) -> None:
        try:
            device = torch.device(self.device)
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MettaError(f"--device {self.device!r} is not a usable torch device ({reason}); use e.g. --device cpu") from None
        if self.framework == "torchrl" and device.type != "cpu":
            raise MettaError(f"--device {self.device!r}: the torchrl framework runs on CPU only; use --device cpu")
        if self.framework == "rllib" and device.type != "cpu":
            raise MettaError(f"--device {self.device!r}: the rllib framework places its learners itself (RLlib's "
                             f"num_gpus_per_learner, not wired up here) and trains on CPU; use --device cpu")

    def settings(self) -> dict[str, Any]:
        """The settings as plain values (paths as strings), as a checkpoint records them."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


FRAMEWORKS = ("core", "torchrl", "rllib")
POSITIVE_SETTINGS = ("total_timesteps", "num_envs", "batch_size", "bptt_horizon", "minibatch_size",
                     "max_minibatch_size", "update_epochs", "hidden_size")
"""``TrainArgs`` integers that must be >= 1."""
NON_NEGATIVE_SETTINGS = ("seed", "checkpoint_every")
"""``TrainArgs`` integers that must be >= 0."""


def flag(name: str) -> str:
    """The command-line flag of ``TrainArgs`` field ``name``: ``hidden_size`` -> ``--hidden-size``."""
    return "--" + name.replace("_", "-")


def _default(name: str) -> Any:
    """The default value of ``TrainArgs`` field ``name``."""
    return TrainArgs.__dataclass_fields__[name].default


def _require_int(args: TrainArgs, name: str, minimum: int) -> None:
    value = getattr(args, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MettaError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")


def _field_help(dotted: str) -> str:
    model: Any = PPOConfig
    *parents, leaf = dotted.split(".")
    for name in parents:
        model = model.model_fields[name].annotation if name in model.model_fields else model
    info = getattr(model, "model_fields", {}).get(leaf)
    return (info.description or "see PPOConfig") if info is not None else "see PPOConfig"


def preflight(args: TrainArgs) -> None:
    """``args.validate()``, then the file system, before any work starts: ``--out-dir`` is (or can
    be made) a writable folder, ``--save-checkpoint``'s folder is writable and the path is a file
    (a folder for rllib), ``--resume`` exists and has the right kind. Errors name the flag."""
    args.validate()
    _check_env_spaces(args)
    require_writable_dir(Path(args.out_dir), "--out-dir")
    rllib = args.framework == "rllib"
    if args.save_checkpoint is not None:
        path = Path(args.save_checkpoint)
        if not rllib and path.is_dir():
            raise MettaError(f"--save-checkpoint {path} is a directory; give a file path such as {path / 'ckpt.pt'}")
        if rllib and path.exists() and not path.is_dir():
            raise MettaError(f"--save-checkpoint {path} is a file; RLlib checkpoints are folders: give a folder path")
        require_writable_dir(path.parent, "--save-checkpoint", what=f"the folder of {path}")
    if args.resume is not None:
        path = Path(args.resume)
        if not path.exists():
            raise MettaError(f"--resume {path}: no such checkpoint; check the path")
        if rllib and not path.is_dir():
            raise MettaError(f"--resume {path} is a file; an RLlib checkpoint is the folder --save-checkpoint wrote")
        if not rllib and path.is_dir():
            raise MettaError(f"--resume {path} is a directory; a {args.framework} checkpoint is the file "
                             f"--save-checkpoint wrote (a folder is an RLlib checkpoint: --framework rllib)")


def _check_env_spaces(args: TrainArgs) -> None:
    """The networks of every framework read a flat Box observation; core and rllib act in Discrete or
    Box spaces, the torchrl run in Discrete ones. MettaGrid presets are checked when built (every framework)."""
    import gymnasium as gym

    if is_mettagrid(args.env):
        return

    try:
        env = gym.make(args.env)
    except gym.error.Error as exc:
        raise MettaError(f"--env {args.env!r} cannot be made ({exc})") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise MettaError(f"--env {args.env!r} has observation space {obs_space}; the policies need a Box "
                         f"(flat vector) observation, shape (features,): wrap the env (e.g. gymnasium's "
                         f"FlattenObservation) or pick another")
    allowed = (gym.spaces.Discrete,) if args.framework == "torchrl" else (gym.spaces.Discrete, gym.spaces.Box)
    if not isinstance(act_space, allowed):
        kinds = " or ".join(t.__name__ for t in allowed)
        raise MettaError(f"--env {args.env!r} has action space {act_space}; --framework {args.framework} needs {kinds}")


def require_writable_dir(path: Path, flag_name: str, *, what: str | None = None) -> None:
    """Make ``path`` (a folder) if needed and check a file can be created in it; a ``MettaError``
    naming ``flag_name`` otherwise. Called before any work so that no result is lost at the end."""
    what = what or str(path)
    if path.exists() and not path.is_dir():
        raise MettaError(f"{flag_name}: {what} is a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise MettaError(f"{flag_name}: cannot write to {what} ({exc.strerror or exc}); choose a writable path") from None


POLICIES = ("mlp", "lstm", "gru")
"""Values of ``TrainArgs.policy``."""


def build_policy(
    name: str, observation_space: Any, action_space: Any, hidden_size: int, feature_scale: Any = None
) -> torch.nn.Module:
    """The ``--policy`` network: ``ActorCritic`` with two hidden layers (``GridCNN`` for a
    ``(features, height, width)`` grid such as MettaGrid's), or ``RecurrentActorCritic``."""
    if name == "mlp" and len(getattr(observation_space, "shape", ()) or ()) == 3:
        return GridCNN(observation_space, action_space, feature_scale)
    if name == "mlp":
        return ActorCritic(observation_space, action_space, (hidden_size,) * 2)
    if name in ("lstm", "gru"):
        return RecurrentActorCritic(observation_space, action_space, hidden_size, cell=name)
    raise MettaError(f"policy must be one of {list(POLICIES)}, got {name!r}; set --policy")


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


CHECKPOINT_FORMAT = "metta-bridges-checkpoint"
CHECKPOINT_VERSION = 1
"""Written into every checkpoint; ``read_checkpoint`` refuses other formats and versions."""

INCOMPATIBLE_SETTINGS = ("framework", "env", "num_envs", "batch_size", "bptt_horizon", "hidden_size", "policy", "ppo")
"""Settings a resume must keep: they fix the networks' and buffers' shapes, the env, or (``ppo``) the
loss config a checkpoint restores. Others (budget, output paths, minibatch size, learning rate, ...)
may change: a resumed run uses the new values."""

PAUSE_BEFORE_RENAME_ENV = "METTA_CHECKPOINT_PAUSE_BEFORE_RENAME"
"""Test hook: seconds ``save_checkpoint`` sleeps between writing the temporary file and renaming it
into place (announced on stderr), so a fault test can kill the process exactly mid-save."""


def make_checkpoint(framework: str, args: TrainArgs, state: dict, env_state: Any) -> dict:
    """A checkpoint of a run: header (format, version, framework, env id, settings, policy shapes),
    ``state`` (tensors, numbers, strings, lists and dicts only, so ``torch.load(weights_only=True)``
    reads it) and ``env_state`` pickled into bytes (unpickled only with ``trust_checkpoint``)."""
    return {
        **checkpoint_header(framework, args),
        "shapes": {name: list(t.shape) for name, t in state["policy"].items()},
        "state": state,
        "env_state": pickle.dumps(env_state),
    }


def checkpoint_header(framework: str, args: TrainArgs) -> dict[str, Any]:
    """What every checkpoint records about itself: format, version, framework, env id and settings."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "framework": framework, "env": args.env,
            "settings": args.settings()}


def verify_header(header: Any, path: str | Path, args: TrainArgs, framework: str) -> None:
    """Refuse a checkpoint ``header`` of another format, version or framework, or made with settings
    in ``INCOMPATIBLE_SETTINGS`` that differ from ``args``; the message names the flag and the fix."""
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        keys = sorted(header)[:8] if isinstance(header, dict) else type(header).__name__
        raise MettaError(f"--resume {path}: not a metta-bridges checkpoint (found {keys}); give a file written by "
                         f"--save-checkpoint")
    if header.get("version") != CHECKPOINT_VERSION:
        raise MettaError(f"--resume {path}: checkpoint format version {header.get('version')!r}, this version "
                         f"reads {CHECKPOINT_VERSION}; resume it with the metta-bridges that wrote it")
    if header.get("framework") != framework:
        raise MettaError(f"--resume {path}: the checkpoint was made by --framework {header.get('framework')}, this "
                         f"run is --framework {framework}; resume it with --framework {header.get('framework')}")
    saved, current = header.get("settings") or {}, args.settings()
    recorded = {"policy": "mlp", **saved}  # checkpoints from before --policy existed hold an MLP
    changed = [name for name in INCOMPATIBLE_SETTINGS if recorded.get(name) != current.get(name)]
    if changed:
        diff = ", ".join(f"{flag(n)} {recorded.get(n)!r} (this run: {current.get(n)!r})" for n in changed)
        raise MettaError(f"--resume {path}: the checkpoint was made with {diff}; resume with the checkpoint's "
                         f"settings, or start a new run without --resume")


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write ``checkpoint`` atomically: a temporary file in the same folder, flushed and fsynced, then
    ``os.replace``d onto ``path``; a crash at any point leaves the previous file at ``path`` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        pause = os.environ.get(PAUSE_BEFORE_RENAME_ENV)
        if pause:
            print(f"checkpoint test hook: {tmp_name} written, pausing {pause}s before rename", file=sys.stderr, flush=True)
            time.sleep(float(pause))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def read_checkpoint(path: str | Path, args: TrainArgs, framework: str) -> tuple[dict, Any]:
    """Load and verify ``path`` for a ``framework`` run with ``args``: returns ``(state, env_state)``.

    Reads with ``torch.load(weights_only=True)`` (no code runs); refuses, naming the problem and the
    fix, a missing, truncated or foreign file, another format version or framework, and settings in
    ``INCOMPATIBLE_SETTINGS`` that differ from ``args``. ``env_state`` is unpickled only with
    ``args.trust_checkpoint``; otherwise it is ``None`` (the run restarts its episodes).
    """
    path = Path(path)
    if not path.is_file():
        raise MettaError(f"--resume {path}: " + ("is a directory, not a checkpoint file" if path.is_dir()
                                                else "no such checkpoint; check the path"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MettaError(
            f"--resume {path}: cannot read it as a metta-bridges checkpoint ({reason}); the file is truncated, "
            f"damaged, not a checkpoint, or holds objects that are unsafe to unpickle"
        ) from None
    verify_header(checkpoint, path, args, framework)
    env_state = None
    if args.trust_checkpoint:
        try:
            env_state = pickle.loads(checkpoint["env_state"])
        except Exception as exc:
            raise MettaError(f"--resume {path}: the environment state cannot be unpickled ({exc}); resume without "
                             f"--trust-checkpoint to restart the episodes") from None
    return checkpoint["state"], env_state


def check_shapes(state: dict, module: torch.nn.Module, path: str | Path) -> None:
    """Refuse a checkpoint whose policy parameters do not have ``module``'s names and shapes."""
    current = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state.items()}
    if current != saved:
        diff = [k for k in sorted(current.keys() | saved.keys()) if current.get(k) != saved.get(k)]
        raise MettaError(
            f"--resume {path}: the checkpoint's policy does not fit this run's network: "
            + ", ".join(f"{k} {saved.get(k)} (this run: {current.get(k)})" for k in diff[:4])
            + "; resume with the settings the checkpoint was made with"
        )


def announce_untrusted_resume(path: str | Path, args: TrainArgs) -> None:
    """One stderr line saying what a resume without ``--trust-checkpoint`` leaves out."""
    if args.resume is not None and not args.trust_checkpoint:
        print(f"metta-bridges: resuming {path} without its pickled environment state: episodes restart (pass "
              f"--trust-checkpoint for an exact continuation, only for checkpoints you trust)", file=sys.stderr)


def phase_learning_rate(args: TrainArgs, steps_before_rollout: int) -> float:
    """The learning rate of the training phase that follows a rollout which began after
    ``steps_before_rollout`` env steps (agent-steps for MettaGrid).

    With ``--anneal-lr``: ``learning_rate * max(0, 1 - steps_before_rollout / total_timesteps)``
    (CleanRL's linear decay, evaluated once per training phase); else ``learning_rate``."""
    if not args.anneal_lr:
        return args.learning_rate
    return args.learning_rate * max(0.0, 1.0 - steps_before_rollout / args.total_timesteps)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` in every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def refuse_ppo_settings(args: TrainArgs, unread: Iterable[str], reader: str, fix: str) -> None:
    """Raise a ``MettaError`` if a ``--ppo`` setting that ``reader`` does not read differs from its default.

    ``unread`` holds dotted ``PPOConfig`` paths; a nested config (``"vtrace"``) covers its fields. The
    message names each such setting with its value, ``reader`` (which would silently train without
    it) and ``fix``."""
    values, defaults = _leaves(args.ppo_config().model_dump()), _leaves(PPOConfig().model_dump())
    prefixes = tuple(unread)
    refused = [key for key, value in values.items() if value != defaults[key]
               and any(key == p or key.startswith(p + ".") for p in prefixes)]
    if refused:
        listed = ", ".join(f"{key}={values[key]!r}" for key in refused)
        raise MettaError(f"--ppo {listed}: not read by {reader}, which would train as if it were unset; {fix}")


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"vtrace": {"rho_clip": 1.0}}`` -> ``{"vtrace.rho_clip": 1.0}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def target_return(args: TrainArgs) -> float | None:
    """``args.target_return``, except that CartPole's default means no target for MettaGrid."""
    if is_mettagrid(args.env) and args.target_return == CARTPOLE_TARGET:
        log.info("MettaGrid: no target return (the default %s is CartPole's); the run uses its whole budget", CARTPOLE_TARGET)
        return None
    return args.target_return


class CoreRun:
    """Everything a core training run holds, built from ``TrainArgs``.

    ``env`` (any ``TrainingEnvironment``) replaces the one ``args.env`` names; its ``num_agents``
    rows fill the buffer. An env with ``pop_reward_rate`` (MettaGrid) adds the mean reward per
    agent-step of each rollout to the logged row, and the learning curve plots it.
    """

    def __init__(self, args: TrainArgs, env: TrainingEnvironment | None = None) -> None:
        args.validate()
        self.args = args
        self.trainer_cfg = args.trainer_config()
        self.ppo_cfg = args.ppo_config()
        torch.manual_seed(args.seed)
        self.device = torch.device(args.device)
        self.env = env if env is not None else make_training_env(args.env, args.num_envs, args.seed)
        self.curve_key = REWARD_RATE_KEY if hasattr(self.env, "pop_reward_rate") else RETURN_KEY
        self.policy = build_policy(
            args.policy, self.env.single_observation_space, self.env.single_action_space, args.hidden_size,
            getattr(self.env, "feature_scale", None),
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
        self.returns = ReturnTracker(target_return(args))
        self.ppo.on_new_training_run(self.context)

    def iteration(self) -> dict[str, float]:
        """One trainer epoch: rollout, training phase; returns the row to log."""
        ctx = self.context
        started = time.perf_counter()
        self.loop.on_epoch_start(ctx)
        rollout = self.loop.rollout_phase(self.env, ctx)
        ctx.agent_step += rollout.agent_steps
        self.returns.add(rollout.episode_returns, ctx.agent_step)
        set_learning_rate(self.optimizer, phase_learning_rate(self.args, ctx.agent_step - rollout.agent_steps))
        reward_rate = {REWARD_RATE_KEY: self.env.pop_reward_rate()} if self.curve_key == REWARD_RATE_KEY else {}
        stats, epochs = self.loop.training_phase(ctx, self.trainer_cfg.update_epochs, self.ppo_cfg.max_grad_norm)
        ctx.epoch += 1
        return {
            "env_steps": ctx.agent_step,
            "epoch": ctx.epoch,
            "episode_return_mean": self.returns.mean,
            **reward_rate,
            "episodes": self.returns.episodes,
            "update_epochs_trained": epochs,
            "steps_per_second": rollout.agent_steps / (time.perf_counter() - started),
            **stats,
        }

    def state_dict(self) -> dict:
        """Everything but the env, in types ``torch.load(weights_only=True)`` reads (see ``env_state``)."""
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "losses": {"ppo": self.ppo.state_dict()},
            "epoch": self.context.epoch,
            "agent_step": self.context.agent_step,
            "torch_rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "experience": self.experience.state_dict(),
            "returns": self.returns.state_dict(),
            "last_action": self.loop.last_action,
        }

    def env_state(self) -> dict:
        """The env's mid-episode state (pickled gymnasium envs, numpy arrays): restored only when trusted."""
        return self.env.state_dict()

    def load_state_dict(self, state: dict, env_state: dict | None = None) -> None:
        """Restore ``state``; the env too when ``env_state`` is given, else it keeps its fresh episodes.

        Checkpoints are written between iterations, when every buffer row is complete, so a fresh
        env only restarts episodes. The optimizer's learning rate is this run's ``--learning-rate``.
        """
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_learning_rate(self.optimizer, self.args.learning_rate)
        self.ppo.load_state_dict(state["losses"]["ppo"])
        self.context.epoch = state["epoch"]
        self.context.agent_step = state["agent_step"]
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        if env_state is not None:
            self.env.load_state_dict(env_state)
        self.experience.load_state_dict(state["experience"])
        self.returns.load_state_dict(state["returns"])
        self.loop.last_action = state.get("last_action")  # absent in checkpoints from before last_actions

    @property
    def env_steps(self) -> int:
        return self.context.agent_step

    def close(self) -> None:
        self.env.close()

    def save(self, path: Path) -> None:
        save_checkpoint(make_checkpoint("core", self.args, self.state_dict(), self.env_state()), path)

    def load(self, path: Path, *, trust: bool | None = None) -> None:
        """Resume from ``path`` (verified by ``read_checkpoint``); ``trust`` (default
        ``args.trust_checkpoint``) also restores the env's pickled mid-episode state."""
        args = self.args if trust is None else dataclasses.replace(self.args, trust_checkpoint=trust)
        state, env_state = read_checkpoint(path, args, "core")
        check_shapes(state["policy"], self.policy, path)
        self.load_state_dict(state, env_state)


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
        curve_key=getattr(run, "curve_key", RETURN_KEY),
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
    preflight(args)
    run = CoreRun(args)
    if args.resume is not None:
        run.load(args.resume)
        announce_untrusted_resume(args.resume, args)
    return drive(run, args, "core", checkpoint=args.save_checkpoint, resumed=args.resume is not None)
