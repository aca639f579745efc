"""A corpus of bad inputs (issue 16): every one must get a *clear* error.

Clear means: the documented error type (``MettaError``; pydantic's ``ValidationError`` for a
config model built directly; ``CaseError`` for case files), and a message naming the offending
key or setting. For the CLI: exit status 2, exactly one line on stderr naming the flag, no
traceback. A case is *silent* when nothing is raised (or the CLI exits 0), *unclear* otherwise.

``pytest tests/test_bad_inputs.py`` asserts every case is clear; ``python -m tests.test_bad_inputs``
prints the clear / unclear / silent counts and each case that is not clear.

Counts of these 167 cases: on the code before issue 16's fixes (commit 3ea23be) 70 clear, 56
unclear, 41 silent (argparse's own usage errors count as unclear: several lines); after: 167 clear.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from metta_core.errors import MettaError


@dataclass
class BadInput:
    """One bad input: ``run(tmp)`` feeds it (or, for ``cli``, returns the argv); the error must be
    ``error`` and its message must contain every string of ``names`` (case-insensitive)."""

    id: str
    run: Callable[[Path], Any]
    names: tuple[str, ...]
    error: type | tuple[type, ...] = MettaError
    cli: bool = False


CASES: list[BadInput] = []


def case(id: str, *names: str, error: type | tuple[type, ...] = MettaError, cli: bool = False):
    def register(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        CASES.append(BadInput(id, fn, names, error, cli))
        return fn
    return register


def add(id: str, run: Callable[[Path], Any], *names: str, error: type | tuple[type, ...] = MettaError) -> None:
    CASES.append(BadInput(id, run, names, error))


# -- metta_core: ppo_minibatch_loss, compute_advantage, normalize_advantage, configs ----------------

def core_minibatch(**changes: Any) -> dict[str, Any]:
    """Valid ``ppo_minibatch_loss`` inputs ``[4, 8]`` with ``changes`` applied (a callable gets the tensor)."""
    g = torch.Generator().manual_seed(0)
    shape = (4, 8)
    kw: dict[str, Any] = {
        "old_logprob": -torch.rand(shape, generator=g), "new_logprob": -torch.rand(shape, generator=g),
        "entropy": torch.rand(shape, generator=g), "new_values": torch.randn(shape, generator=g),
        "values": torch.randn(shape, generator=g), "rewards": torch.randn(shape, generator=g),
        "dones": (torch.rand(shape, generator=g) < 0.2).float(), "advantages": torch.randn(shape, generator=g),
    }
    for key, value in changes.items():
        kw[key] = value(kw.get(key)) if callable(value) else value
    return kw


def put(index: tuple, value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[index] = value
        return x
    return edit


def ppo_loss(**changes: Any) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        from metta_core.config import PPOConfig
        from metta_core.ppo_math import ppo_minibatch_loss

        cfg = changes.pop("cfg", None) or PPOConfig()
        return ppo_minibatch_loss(cfg, **core_minibatch(**changes))
    return run


add("core/loss: dones = 2.0", ppo_loss(dones=put((1, 3), 2.0)), "dones")
add("core/loss: dones = -1", ppo_loss(dones=put((0, 1), -1.0)), "dones")
add("core/loss: dones = 0.5", ppo_loss(dones=put((2, 2), 0.5)), "dones")
add("core/loss: NaN in dones", ppo_loss(dones=put((0, 5), float("nan"))), "dones")
add("core/loss: NaN in rewards", ppo_loss(rewards=put((1, 1), float("nan"))), "rewards")
add("core/loss: inf in rewards", ppo_loss(rewards=put((1, 1), float("inf"))), "rewards")
add("core/loss: finite but huge rewards (1e38)", ppo_loss(rewards=lambda r: r.abs() * 1e38 + 1e37), "rewards")
add("core/loss: finite but huge values (3e38)", ppo_loss(values=lambda v: v.sign() * 3e38), "values")
add("core/loss: NaN in new_logprob", ppo_loss(new_logprob=put((3, 7), float("nan"))), "new_logprob")
add("core/loss: NaN in advantages", ppo_loss(advantages=put((0, 0), float("nan"))), "advantages")
add("core/loss: old_logprob of another shape", ppo_loss(old_logprob=lambda x: x[:, :-1]), "old_logprob")
add("core/loss: values 1-D", ppo_loss(**{k: (lambda x: x.reshape(-1)) for k in
                                        ("old_logprob", "new_logprob", "entropy", "new_values", "values", "rewards",
                                         "dones", "advantages")}), "values")
add("core/loss: entropy a list", ppo_loss(entropy=lambda x: x.tolist()), "entropy")
add("core/loss: negative prio_weights", ppo_loss(prio_weights=-torch.ones(4, 1)), "prio_weights")
add("core/loss: NaN prio_weights", ppo_loss(prio_weights=torch.full((4, 1), float("nan"))), "prio_weights")
add("core/loss: prio_weights [4]", ppo_loss(prio_weights=torch.ones(4)), "prio_weights")
add("core/loss: mask selects nothing", ppo_loss(mask=torch.zeros(4, 8, dtype=torch.bool)), "mask")
add("core/loss: mask selects one element", ppo_loss(mask=put((0, 0), True)(torch.zeros(4, 8, dtype=torch.bool))),
    "mask")
add("core/loss: float mask", ppo_loss(mask=torch.ones(4, 8)), "mask")


def advantage(**changes: Any) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        from metta_core.advantage import compute_advantage

        hyper = {k: changes.pop(k) for k in ("gamma", "gae_lambda", "rho_clip", "c_clip") if k in changes}
        kw = core_minibatch(**changes)
        return compute_advantage(kw["values"], kw["rewards"], kw["dones"], changes.get("ratio", torch.ones(4, 8)),
                                 **{"gamma": 0.99, "gae_lambda": 0.95, **hyper})
    return run


add("core/advantage: dones = 2.0", advantage(dones=put((1, 1), 2.0)), "dones")
add("core/advantage: NaN in dones", advantage(dones=put((1, 1), float("nan"))), "dones")
add("core/advantage: NaN in rewards", advantage(rewards=put((1, 1), float("nan"))), "rewards")
add("core/advantage: huge rewards (1e38)", advantage(rewards=lambda r: r.abs() * 1e38 + 1e37), "rewards")
add("core/advantage: float64 values", advantage(values=lambda v: v.double()), "values")
add("core/advantage: negative ratio", advantage(ratio=-torch.ones(4, 8)), "importance_sampling_ratio")
add("core/advantage: gamma 1.5", advantage(gamma=1.5), "gamma")
add("core/advantage: gae_lambda -0.5", advantage(gae_lambda=-0.5), "gae_lambda")
add("core/advantage: rho_clip 0", advantage(rho_clip=0.0), "rho_clip")
add("core/advantage: values [32]", advantage(values=lambda v: v.reshape(-1)), "values")


def normalize(adv: torch.Tensor, **kw: Any) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        from metta_core.advantage import normalize_advantage

        return normalize_advantage(adv, **kw)
    return run


add("core/normalize: one element", normalize(torch.ones(1, 1)), "at least 2 elements")
add("core/normalize: mask of another shape", normalize(torch.ones(4, 8), mask=torch.ones(4, 7, dtype=torch.bool)),
    "mask")
add("core/normalize: empty mask", normalize(torch.ones(4, 8), mask=torch.zeros(4, 8, dtype=torch.bool)), "mask")


def config(build: Callable[[], Any]) -> Callable[[Path], Any]:
    return lambda _: build()


def _ppo(**kw: Any) -> Any:
    from metta_core.config import PPOConfig

    return PPOConfig(**kw)


def _override(key: str, value: Any) -> Any:
    from metta_core.config import PPOConfig

    return PPOConfig().override(key, value)


CONFIG_ERRORS = (MettaError, ValidationError)
add("core/config: target_kl -1", config(lambda: _ppo(target_kl=-1.0)), "target_kl", error=CONFIG_ERRORS)
add("core/config: target_kl 0", config(lambda: _ppo(target_kl=0.0)), "target_kl", error=CONFIG_ERRORS)
add("core/config: clip_coef 0", config(lambda: _ppo(clip_coef=0.0)), "clip_coef", error=CONFIG_ERRORS)
add("core/config: gamma 1.5", config(lambda: _ppo(gamma=1.5)), "gamma", error=CONFIG_ERRORS)
add("core/config: NaN ent_coef", config(lambda: _ppo(ent_coef=float("nan"))), "ent_coef", error=CONFIG_ERRORS)
add("core/config: unknown field", config(lambda: _ppo(clip_cof=0.2)), "clip_cof", error=CONFIG_ERRORS)
add("core/config: override unknown nested", config(lambda: _override("vtrace.rho_clp", 1.0)), "rho_clp",
    error=CONFIG_ERRORS)
add("core/config: override prio_alpha 2", config(lambda: _override("prioritized_experience_replay.prio_alpha", 2.0)),
    "prio_alpha", error=CONFIG_ERRORS)


def _trainer(**kw: Any) -> Any:
    from metta_core.config import TrainerConfig

    return TrainerConfig(**kw)


add("core/config: minibatch not a multiple of horizon",
    config(lambda: _trainer(batch_size=256, bptt_horizon=16, minibatch_size=40)), "minibatch_size",
    error=CONFIG_ERRORS)
add("core/config: batch_size 0", config(lambda: _trainer(batch_size=0)), "batch_size", error=CONFIG_ERRORS)


def _experience(_: Path) -> Any:
    from metta_core.experience import Experience, ExperienceSpec

    return Experience(16, 64, 16, 32, 32, ExperienceSpec())


add("core/experience: more agents than rows", _experience, "batch_size")


def _gym_env(env_id: str) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        from metta_core.gym_env import GymVectorEnvironment

        return GymVectorEnvironment(env_id, 2, 0)
    return run


add("core/env: unknown env id", _gym_env("NoSuchEnv-v9"), "NoSuchEnv-v9")


def _actor_critic(obs: torch.Tensor, action: torch.Tensor | None = None) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        import gymnasium as gym
        from tensordict import TensorDict

        from metta_core.policy import ActorCritic

        policy = ActorCritic(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2), (8, 8))
        return policy.forward(TensorDict({"env_obs": obs}, batch_size=[obs.shape[0]]), action=action)
    return run


add("core/policy: observation width 5 for a (4,) space", _actor_critic(torch.zeros(3, 5)), "env_obs")
add("core/policy: action 7 of Discrete(2)", _actor_critic(torch.zeros(3, 4), torch.tensor([0, 1, 7])), "action")


# -- TorchRL bridge: MettaPPOLoss, MettaAdvantage -----------------------------------------------

@cache
def _torchrl_modules():
    from tests.torchrl.helpers import make_modules

    return make_modules()


def torchrl_loss(edit: Callable[[Any], None], setup: Callable[[Any], None] | None = None) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        from bridges.torchrl.loss import MettaPPOLoss
        from tests.torchrl.helpers import make_batch

        actor, critic = _torchrl_modules()
        loss = MettaPPOLoss(actor, critic)
        if setup is not None:
            setup(loss)
        td = make_batch(actor, critic)
        edit(td)
        return loss(td)
    return run


def setter(key: Any, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Any], None]:
    return lambda td: td.set(key, value(td.get(key)))


NEXT_TERM, NEXT_REW = ("next", "terminated"), ("next", "reward")
add("torchrl/loss: terminated = 2.0", torchrl_loss(setter(NEXT_TERM, lambda t: put((1, 2, 0), 2.0)(t.float()))),
    "terminated")
add("torchrl/loss: terminated = -1", torchrl_loss(setter(NEXT_TERM, lambda t: put((0, 0, 0), -1.0)(t.float()))),
    "terminated")
add("torchrl/loss: NaN in terminated", torchrl_loss(setter(NEXT_TERM, lambda t: put((0, 3, 0), float("nan"))(t.float()))),
    "terminated")
add("torchrl/loss: integer terminated = 3", torchrl_loss(setter(NEXT_TERM, lambda t: put((0, 3, 0), 3)(t.long()))),
    "terminated")
add("torchrl/loss: NaN in reward", torchrl_loss(setter(NEXT_REW, put((1, 1, 0), float("nan")))), "reward")
add("torchrl/loss: inf in reward", torchrl_loss(setter(NEXT_REW, put((1, 1, 0), float("inf")))), "reward")
add("torchrl/loss: huge rewards (1e38)", torchrl_loss(setter(NEXT_REW, lambda r: r.abs() * 1e38 + 1e37)), "reward")
add("torchrl/loss: float64 reward", torchrl_loss(setter(NEXT_REW, lambda r: r.double())), "reward")
add("torchrl/loss: NaN in state_value", torchrl_loss(setter("state_value", put((2, 2, 0), float("nan")))),
    "state_value")
add("torchrl/loss: NaN in sample log-prob", torchrl_loss(setter("action_log_prob", put((2, 2), float("nan")))),
    "action_log_prob")
add("torchrl/loss: NaN in a given advantage",
    torchrl_loss(lambda td: td.set("advantage", put((0, 0), float("nan"))(torch.zeros(4, 8)))), "advantage")
add("torchrl/loss: negative priority_weight", torchrl_loss(lambda td: td.set("priority_weight", -torch.ones(4, 8))),
    "priority_weight")
add("torchrl/loss: NaN priority_weight",
    torchrl_loss(lambda td: td.set("priority_weight", torch.full((4, 8), float("nan")))), "priority_weight")
add("torchrl/loss: priority_weight [4, 8, 2]", torchrl_loss(lambda td: td.set("priority_weight", torch.ones(4, 8, 2))),
    "priority_weight")
add("torchrl/loss: action [B, T, 1] for a Categorical actor", torchrl_loss(setter("action", lambda a: a.unsqueeze(-1))),
    "action")
add("torchrl/loss: action out of range", torchrl_loss(setter("action", put((0, 0), 7))), "action")
add("torchrl/loss: float64 observation", torchrl_loss(setter("observation", lambda o: o.double())), "observation")
add("torchrl/loss: observation width 5", torchrl_loss(setter("observation", lambda o: torch.zeros(4, 8, 5))),
    "observation")
add("torchrl/loss: missing reward", torchrl_loss(lambda td: td.del_(NEXT_REW)), "reward")
add("torchrl/loss: missing action", torchrl_loss(lambda td: td.del_("action")), "action")
add("torchrl/loss: state_value of shape [B, T, 2]", torchrl_loss(setter("state_value", lambda v: v.expand(4, 8, 2))),
    "state_value")


def _flat(td: Any) -> Any:
    return td.reshape(-1)


def torchrl_whole(edit: Callable[[Any], Any]) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        from bridges.torchrl.loss import MettaPPOLoss
        from tests.torchrl.helpers import make_batch

        actor, critic = _torchrl_modules()
        return MettaPPOLoss(actor, critic)(edit(make_batch(actor, critic)))
    return run


add("torchrl/loss: a flat [B*T] batch", torchrl_whole(_flat), "[B, T]")
add("torchrl/loss: a [T, B] batch named time first",
    torchrl_whole(lambda td: td.transpose(0, 1).refine_names("time", None)), "time")


def torchrl_setting(build: Callable[[Any, Any], Any]) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        actor, critic = _torchrl_modules()
        return build(actor, critic)
    return run


def _loss(actor: Any, critic: Any, **kw: Any) -> Any:
    from bridges.torchrl.loss import MettaPPOLoss

    return MettaPPOLoss(actor, critic, **kw)


def _estimator(actor: Any, critic: Any, value_type: str, **hp: Any) -> Any:
    from torchrl.objectives.utils import ValueEstimators

    return _loss(actor, critic).make_value_estimator(getattr(ValueEstimators, value_type), **hp)


add("torchrl/settings: target_kl -1", torchrl_setting(lambda a, c: _loss(a, c, target_kl=-1.0)), "target_kl")
add("torchrl/settings: clip_epsilon -0.1", torchrl_setting(lambda a, c: _loss(a, c, clip_epsilon=-0.1)), "clip_coef")
add("torchrl/settings: unknown override", torchrl_setting(lambda a, c: _loss(a, c, clip_epsilonn=0.1)), "clip_epsilonn")
add("torchrl/settings: GAE lmbda -1", torchrl_setting(lambda a, c: _estimator(a, c, "GAE", lmbda=-1.0)), "lmbda")
add("torchrl/settings: GAE gamma 2", torchrl_setting(lambda a, c: _estimator(a, c, "GAE", gamma=2.0)), "gamma")
add("torchrl/settings: TDLambda lmbda 1.5", torchrl_setting(lambda a, c: _estimator(a, c, "TDLambda", lmbda=1.5)),
    "lmbda")
add("torchrl/settings: MettaAdvantage gae_lambda 2",
    torchrl_setting(lambda a, c: _loss(a, c).make_value_estimator(None, gae_lambda=2.0)), "gae_lambda")
add("torchrl/settings: set_keys unknown name", torchrl_setting(lambda a, c: _loss(a, c).set_keys(rewardd="r")),
    "rewardd")


def _sampler(actor: Any, critic: Any) -> Any:
    from bridges.torchrl.sampler import MettaSegmentSampler

    return MettaSegmentSampler(_loss(actor, critic), minibatch_segments=0, total_timesteps=100)


add("torchrl/settings: sampler minibatch_segments 0", torchrl_setting(_sampler), "minibatch_segments")


def torchrl_estimator(edit: Callable[[Any], None]) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        from bridges.torchrl.estimator import MettaAdvantage
        from tests.torchrl.helpers import make_batch

        actor, critic = _torchrl_modules()
        td = make_batch(actor, critic)
        edit(td)
        return MettaAdvantage(gamma=0.99, gae_lambda=0.95)(td)
    return run


add("torchrl/estimator: terminated = 2.0", torchrl_estimator(setter(NEXT_TERM, lambda t: put((1, 2, 0), 2.0)(t.float()))),
    "terminated")
add("torchrl/estimator: NaN terminated",
    torchrl_estimator(setter(NEXT_TERM, lambda t: put((1, 2, 0), float("nan"))(t.float()))), "terminated")
add("torchrl/estimator: NaN reward", torchrl_estimator(setter(NEXT_REW, put((1, 1, 0), float("nan")))), "reward")


# -- RLlib bridge: Metta-layout batches, settings, connector --------------------------------------

def _rllib_learner():
    """A fresh learner (an update with bad data may leave NaN weights behind)."""
    from tests.rllib.conftest import build, make_config

    return build(make_config())


def rllib_batch(edit: Callable[[dict], None]) -> Callable[[Path], Any]:
    def run(_: Path) -> Any:
        from tests.rllib.conftest import as_multi_agent, layout_batch

        learner = _rllib_learner()
        batch = layout_batch(learner)
        edit(batch)
        return learner.update(batch=as_multi_agent(batch))
    return run


def col(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda batch: batch.__setitem__(name, value(batch[name]))


add("rllib/batch: terminateds = 2.0", rllib_batch(col("terminateds", put(5, 2.0))), "terminateds")
add("rllib/batch: NaN terminateds", rllib_batch(col("terminateds", put(5, float("nan")))), "terminateds")
add("rllib/batch: NaN rewards", rllib_batch(col("rewards", put(5, float("nan")))), "rewards")
add("rllib/batch: huge rewards (1e38)", rllib_batch(col("rewards", lambda r: r.abs() * 1e38 + 1e37)), "rewards")
add("rllib/batch: float64 rewards", rllib_batch(col("rewards", lambda r: r.double())), "rewards")
add("rllib/batch: rewards [32, 2]", rllib_batch(col("rewards", lambda r: r.reshape(-1, 1).expand(-1, 2))), "rewards")
add("rllib/batch: missing vf_preds", rllib_batch(lambda b: b.pop("vf_preds")), "vf_preds")
add("rllib/batch: 29 slots", rllib_batch(lambda b: b.update({k: v[:-3] for k, v in b.items()})), "bptt_horizon")
add("rllib/batch: loss_mask selects nothing", rllib_batch(col("loss_mask", torch.zeros_like)), "loss_mask")
add("rllib/batch: float loss_mask", rllib_batch(col("loss_mask", lambda m: m.float())), "loss_mask")
add("rllib/batch: action out of range", rllib_batch(col("actions", put(4, 9))), "actions")
add("rllib/batch: actions [32, 1]", rllib_batch(col("actions", lambda a: a.unsqueeze(-1))), "actions")
add("rllib/batch: float64 obs", rllib_batch(col("obs", lambda o: o.double())), "obs")
add("rllib/batch: obs width 5", rllib_batch(col("obs", lambda o: torch.zeros(len(o), 5))), "obs")
add("rllib/batch: NaN advantages", rllib_batch(col("advantages", put(7, float("nan")))), "advantages")


def rllib_setting(build: Callable[[], Any]) -> Callable[[Path], Any]:
    return lambda _: build()


def _metta_ppo_config(**kw: Any) -> Any:
    from bridges.rllib import metta_ppo_config

    return metta_ppo_config(**kw)


def _rllib_lr(lr: float) -> Any:
    from tests.rllib.conftest import build, make_config

    return build(make_config().training(lr=lr))


add("rllib/settings: target_kl -1", rllib_setting(lambda: _metta_ppo_config(target_kl=-1.0)), "target_kl")
add("rllib/settings: gamma 1.5", rllib_setting(lambda: _metta_ppo_config(gamma=1.5)), "gamma")
add("rllib/settings: unknown field", rllib_setting(lambda: _metta_ppo_config(clip_cof=0.2)), "clip_cof")
add("rllib/settings: minibatch not whole rows",
    rllib_setting(lambda: _metta_ppo_config(batch_size=96, bptt_horizon=16, minibatch_size=40)), "minibatch_size")
add("rllib/settings: negative lr", rllib_setting(lambda: _rllib_lr(-1e-3)), "lr")


def _episode_without_logp(_: Path) -> Any:
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from bridges.rllib import MettaLayoutConnector
    from tests.rllib.conftest import make_config

    ep = SingleAgentEpisode(observations=[[0.0] * 4] * 3, actions=[0, 1], rewards=[1.0, 1.0],
                            len_lookback_buffer=0).to_numpy()
    return MettaLayoutConnector.from_config(make_config())(rl_module=_rllib_learner().module, batch={}, episodes=[ep])


def _episode_with_nan_reward(_: Path) -> Any:
    from bridges.rllib import MettaLayoutConnector
    from tests.rllib.conftest import episode, make_config

    ep = episode(5, True, 0, bad_reward_at=(2, float("nan")))
    return MettaLayoutConnector.from_config(make_config())(rl_module=_rllib_learner().module, batch={}, episodes=[ep])


add("rllib/connector: episode without action_logp", _episode_without_logp, "action_logp")
add("rllib/connector: episode with a NaN reward", _episode_with_nan_reward, "rewards")


# -- conformance case files -----------------------------------------------------------------------

def case_file(damage: str) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        from bridges.conformance.cases import load_case
        from tests.conformance.conftest import copy_case
        from tests.conformance.test_cases import BAD_FILES

        path = copy_case("defaults_discrete_mlp", tmp / "cases")
        BAD_FILES[damage][0](path)
        return load_case(path)
    return run


def _case_field(damage: str) -> str:
    from tests.conformance.test_cases import BAD_FILES

    return BAD_FILES[damage][1]


def _case_error() -> type:
    from bridges.conformance.cases import CaseError

    return CaseError


for _damage in ("truncated npz", "truncated json", "NaN in values", "rewards shape", "missing weight",
                "manifest mismatch", "unknown ppo field", "out-of-range gamma", "indivisible sizes",
                "unsupported action kind", "missing expected term"):
    add(f"case file: {_damage}", case_file(_damage), _case_field(_damage), error=_case_error())


def _case_edit_npz(field: str, edit: Callable[[np.ndarray], None]) -> Callable[[Path], Any]:
    def run(tmp: Path) -> Any:
        from bridges.conformance.cases import load_case, write_npz
        from tests.conformance.conftest import copy_case

        path = copy_case("defaults_discrete_mlp", tmp / "cases")
        with np.load(path.with_suffix(".npz")) as archive:
            arrays = dict(archive)
        edit(arrays[field])
        write_npz(path.with_suffix(".npz"), arrays)
        return load_case(path)
    return run


add("case file: dones = 2", _case_edit_npz("data/dones", lambda a: a.__setitem__((0, 1), 2.0)), "data/dones",
    error=_case_error())
add("case file: action out of range", _case_edit_npz("data/actions", lambda a: a.__setitem__((0, 1), 99)),
    "data/actions", error=_case_error())


# -- CLI ------------------------------------------------------------------------------------------

TINY = ["--no-progress", "--num-envs", "2", "--batch-size", "64", "--bptt-horizon", "16", "--minibatch-size", "32",
        "--update-epochs", "1", "--hidden-size", "8", "--total-timesteps", "64"]


def train_argv(tmp: Path, *extra: str, framework: str = "core") -> list[str]:
    return ["train", "--framework", framework, "--out-dir", str(tmp / "out"), *TINY, *extra]


def cli(id: str, *extra: str, names: tuple[str, ...], framework: str = "core") -> None:
    CASES.append(BadInput(id, lambda tmp: train_argv(tmp, *extra, framework=framework), names, cli=True))


for _fw in ("core", "torchrl"):
    cli(f"cli/{_fw}: --env NoSuchEnv-v9", "--env", "NoSuchEnv-v9", names=("--env", "NoSuchEnv-v9"), framework=_fw)
    cli(f"cli/{_fw}: --num-envs 0", "--num-envs", "0", names=("--num-envs",), framework=_fw)
    cli(f"cli/{_fw}: --hidden-size 0", "--hidden-size", "0", names=("--hidden-size",), framework=_fw)
    cli(f"cli/{_fw}: --batch-size 48 (not a multiple of num_envs*bptt_horizon)", "--batch-size", "48", "--minibatch-size", "16",
        names=("--batch-size",), framework=_fw)
    cli(f"cli/{_fw}: --device bogus", "--device", "bogus", names=("--device",), framework=_fw)
    cli(f"cli/{_fw}: --learning-rate -1", "--learning-rate", "-1", names=("--learning-rate",), framework=_fw)
    cli(f"cli/{_fw}: --ppo target_kl=-1", "--ppo", "target_kl=-1", names=("target_kl",), framework=_fw)
cli("cli: --num-envs -2", "--num-envs", "-2", names=("--num-envs",))
cli("cli: --checkpoint-every -1", "--checkpoint-every", "-1", names=("--checkpoint-every",))
cli("cli: --checkpoint-every 2 without --save-checkpoint", "--checkpoint-every", "2", names=("--checkpoint-every",))
cli("cli: --learning-rate 0", "--learning-rate", "0", names=("--learning-rate",))
cli("cli: --learning-rate nan", "--learning-rate", "nan", names=("--learning-rate",))
cli("cli: --ppo gamma=2", "--ppo", "gamma=2", names=("gamma",))
cli("cli: --ppo clip_cof=0.2", "--ppo", "clip_cof=0.2", names=("clip_cof",))
cli("cli: --ppo gamma (no value)", "--ppo", "gamma", names=("--ppo",))
cli("cli: --total-timesteps 0", "--total-timesteps", "0", names=("--total-timesteps",))
cli("cli: --update-epochs 0", "--update-epochs", "0", names=("--update-epochs",))
cli("cli: --bptt-horizon 0", "--bptt-horizon", "0", names=("--bptt-horizon",))
cli("cli: --minibatch-size 24 (not whole rows)", "--minibatch-size", "24", names=("--minibatch-size",))
cli("cli: --max-minibatch-size 0", "--max-minibatch-size", "0", names=("--max-minibatch-size",))
cli("cli: --seed -1", "--seed", "-1", names=("--seed",))
cli("cli: --metrics-format xml", "--metrics-format", "xml", names=("--metrics-format",))
cli("cli: --framework jax", "--framework", "jax", names=("--framework",))
cli("cli: --num-envs two", "--num-envs", "two", names=("--num-envs",))
cli("cli: --target-return nan", "--target-return", "nan", names=("--target-return",))
cli("cli: --compare-native with core", "--compare-native", names=("--compare-native",))
cli("cli: --env with a Discrete observation space (FrozenLake-v1)", "--env", "FrozenLake-v1", names=("FrozenLake-v1",))


@case("cli: --out-dir is a file", "--out-dir", cli=True)
def _out_dir_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x")
    return ["train", *TINY, "--out-dir", str(tmp / "file")]


@case("cli: --save-checkpoint under a file", "--save-checkpoint", cli=True)
def _save_under_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x")
    return train_argv(tmp, "--save-checkpoint", str(tmp / "file" / "ckpt.pt"))


@case("cli: --save-checkpoint is a directory", "--save-checkpoint", cli=True)
def _save_is_dir(tmp: Path) -> list[str]:
    (tmp / "dir").mkdir()
    return train_argv(tmp, "--save-checkpoint", str(tmp / "dir"))


@case("cli: --resume missing", "--resume", cli=True)
def _resume_missing(tmp: Path) -> list[str]:
    return train_argv(tmp, "--resume", str(tmp / "nope.pt"))


@case("cli: --resume a directory", "--resume", cli=True)
def _resume_dir(tmp: Path) -> list[str]:
    (tmp / "dir").mkdir()
    return train_argv(tmp, "--resume", str(tmp / "dir"))


@case("cli: --resume a text file", "--resume", cli=True)
def _resume_text(tmp: Path) -> list[str]:
    (tmp / "notes.pt").write_text("not a checkpoint")
    return train_argv(tmp, "--resume", str(tmp / "notes.pt"))


@case("cli: --resume a foreign torch file", "--resume", cli=True)
def _resume_foreign(tmp: Path) -> list[str]:
    torch.save({"model": torch.zeros(3)}, tmp / "foreign.pt")
    return train_argv(tmp, "--resume", str(tmp / "foreign.pt"))


@cache
def _checkpoint(framework: str) -> Path:
    """A checkpoint of a tiny run (made once per process, with the CLI)."""
    from bridges.cli import main

    folder = Path(tempfile.mkdtemp(prefix=f"bad-inputs-{framework}-"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(train_argv(folder, "--save-checkpoint", str(folder / "ckpt.pt"), framework=framework))
    assert code == 0, f"could not make a {framework} checkpoint"
    return folder / "ckpt.pt"


def _copy_checkpoint(tmp: Path, framework: str = "core") -> Path:
    target = tmp / "ckpt.pt"
    shutil.copy(_checkpoint(framework), target)
    return target


@case("cli: --resume a truncated checkpoint", "--resume", cli=True)
def _resume_truncated(tmp: Path) -> list[str]:
    path = _copy_checkpoint(tmp)
    path.write_bytes(path.read_bytes()[:2000])
    return train_argv(tmp, "--resume", str(path))


@case("cli: --resume a core checkpoint with another --env", "--env", cli=True)
def _resume_other_env(tmp: Path) -> list[str]:
    return train_argv(tmp, "--resume", str(_copy_checkpoint(tmp)), "--env", "Acrobot-v1", "--total-timesteps", "128")


@case("cli: --resume a core checkpoint with another --hidden-size", "--hidden-size", cli=True)
def _resume_other_hidden(tmp: Path) -> list[str]:
    return train_argv(tmp, "--resume", str(_copy_checkpoint(tmp)), "--hidden-size", "16", "--total-timesteps", "128")


@case("cli: --resume a core checkpoint with another --num-envs", "--num-envs", cli=True)
def _resume_other_envs(tmp: Path) -> list[str]:
    return train_argv(tmp, "--resume", str(_copy_checkpoint(tmp)), "--num-envs", "4", "--total-timesteps", "128")


@case("cli: --resume a core checkpoint with --framework torchrl", "--framework", cli=True)
def _resume_core_as_torchrl(tmp: Path) -> list[str]:
    return train_argv(tmp, "--resume", str(_copy_checkpoint(tmp)), "--total-timesteps", "128", framework="torchrl")


@case("cli: --resume a torchrl checkpoint with --framework core", "--framework", cli=True)
def _resume_torchrl_as_core(tmp: Path) -> list[str]:
    return train_argv(tmp, "--resume", str(_copy_checkpoint(tmp, "torchrl")), "--total-timesteps", "128")


@case("cli: --resume a torchrl checkpoint with another --env", "--env", cli=True)
def _resume_torchrl_other_env(tmp: Path) -> list[str]:
    return train_argv(tmp, "--resume", str(_copy_checkpoint(tmp, "torchrl")), "--env", "Acrobot-v1",
                      "--total-timesteps", "128", framework="torchrl")


@case("cli: conformance --out-dir is a file", "--out-dir", cli=True)
def _conformance_out_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x")
    return ["conformance", "--case", "horizon_2", "--framework", "core", "--no-progress", "--out-dir", str(tmp / "file")]


@case("cli: conformance --case unknown", "nosuchcase", cli=True)
def _conformance_unknown_case(tmp: Path) -> list[str]:
    return ["conformance", "--case", "nosuchcase", "--framework", "core", "--no-progress", "--out-dir", str(tmp)]


@case("cli: conformance --cases-dir missing", "--cases-dir", cli=True)
def _conformance_missing_dir(tmp: Path) -> list[str]:
    return ["conformance", "--cases-dir", str(tmp / "nope"), "--no-progress", "--out-dir", str(tmp)]


# -- classification -------------------------------------------------------------------------------

def _names_in(message: str, names: tuple[str, ...]) -> bool:
    return all(name.lower() in message.lower() for name in names)


def classify(bad: BadInput, tmp: Path) -> tuple[str, str]:
    """``("clear" | "unclear" | "silent", what happened)``."""
    if bad.cli:
        from bridges.cli import main

        argv = bad.run(tmp)
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
        except Exception as exc:  # a traceback would have reached the user
            return "unclear", f"traceback: {type(exc).__name__}: {exc}"
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        if code == 0:
            return "silent", "exit 0"
        if code == 2 and len(lines) == 1 and "Traceback" not in lines[0] and _names_in(lines[0], bad.names):
            return "clear", lines[0]
        return "unclear", f"exit {code}: {err.getvalue()!r}"
    try:
        bad.run(tmp)
    except bad.error as exc:
        if _names_in(str(exc), bad.names):
            return "clear", str(exc)
        return "unclear", f"{type(exc).__name__} not naming {bad.names}: {exc}"
    except Exception as exc:
        return "unclear", f"{type(exc).__name__}: {exc}"
    return "silent", "no error"


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_error(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    verdict, detail = classify(bad, tmp_path)
    assert verdict == "clear", f"{verdict}: {detail}"


def test_corpus_is_large_and_covers_every_boundary():
    prefixes = {c.id.split("/")[0].split(":")[0] for c in CASES}
    assert len(CASES) >= 100
    assert {"core", "torchrl", "rllib", "case file", "cli"} <= prefixes


def main() -> int:
    counts = {"clear": 0, "unclear": 0, "silent": 0}
    for bad in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            verdict, detail = classify(bad, Path(tmp))
        counts[verdict] += 1
        if verdict != "clear":
            print(f"{verdict:8s} {bad.id}: {detail[:300]!s}".replace("\n", " "))
    print(json.dumps({"cases": len(CASES), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
