"""Native equivalence matrix: TorchRL's ``ClipPPOLoss`` + ``GAE`` and RLlib's ``PPOTorchLearner`` + its GAE
connector against Metta's loss (the separate reference of SPEC §1-§4).

One *problem* is one minibatch made of a whole case buffer (all rows, in order, no segment
sampling). The equivalence mapping, under which a native loss computes Metta's numbers:

- data: values stored at rollout equal the current critic's (the natives recompute them), every
  ratio ``>= 1`` with ``vtrace.rho_clip = c_clip = 1`` (Metta's V-trace advantage is then GAE with
  ratio 1), no truncation, ``prio_alpha = 0`` and no priority weights;
- layout: ``native.reward[:, t] = rewards[:, t+1]`` and ``terminated[:, t] = dones[:, t+1]``; the last
  step of a row is marked terminal with reward ``V(o_{T-1})``, which makes its native advantage 0
  and its value target ``V``, as Metta's last column (SPEC §2);
- TorchRL: ``clip_epsilon = clip_coef``, ``entropy_coeff = ent_coef``, ``loss_critic_type="l2"``,
  ``critic_coeff = 0.5 * vf_coef``, ``clip_value = vf_clip_coef`` (or None), ``normalize_advantage = norm_adv``;
- RLlib: ``clip_param``, ``entropy_coeff``, ``vf_loss_coeff = 0.5 * vf_coef``, ``vf_clip_param = inf``
  (``clip_vloss=False``), ``use_kl_loss=False``, ``lambda_``/``gamma``; one minibatch, one epoch.
  RLlib's GAE connector always normalizes the advantages, batch-wide, with the population std
  and over statistics that include one artificial bootstrap step per episode: its policy loss
  never equals Metta's, so for RLlib only the value loss and the entropy are equivalent.

Every divergence is a *probe*: the equivalence problem changed in one respect (the minimal
case), and the size of the resulting difference, attributed to the piece of Metta's loss
(``metta_core.advantage``, ``metta_core.ppo_math``) where the framework computes something else.
``native_markdown()`` renders the mapping, the pieces, and both tables.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from bridges.conformance import reference
from bridges.conformance.cases import Case

MAPPING = (
    "| Metta | TorchRL `ClipPPOLoss` + `GAE` | RLlib `PPOTorchLearner` + GAE connector |",
    "|---|---|---|",
    "| `rewards[:, t+1]`, `dones[:, t+1]` | `(\"next\", reward/terminated)[:, t]` | episode `rewards[t]`, `terminated` |",
    "| last column: advantage 0, return `V` | last step terminal with reward `V(o_{T-1})` | same (the episode ends terminated) |",
    "| truncation ignored | none allowed (TorchRL cuts the trace) | none allowed (RLlib cuts the episode) |",
    "| ratio-1 advantages (`rho_clip = c_clip = 1`, every ratio >= 1) | GAE ignores ratios | GAE ignores ratios |",
    "| values stored at rollout | must equal the current critic (GAE recomputes them) | same (the connector recomputes) |",
    "| `clip_coef` | `clip_epsilon` | `clip_param` |",
    "| `ent_coef` | `entropy_coeff` | `entropy_coeff` |",
    "| `vf_coef` (with the 0.5) | `critic_coeff = 0.5 * vf_coef`, `loss_critic_type=\"l2\"` | `vf_loss_coeff = 0.5 * vf_coef` |",
    "| `clip_vloss`, `vf_clip_coef` | `clip_value = vf_clip_coef` (or None) | only `clip_vloss=False` (`vf_clip_param=inf`) |",
    "| `norm_adv` | `normalize_advantage` (eps differs) | always on, different formula and scope: policy_loss never equal |",
    "| `gamma`, `gae_lambda` | `GAE(gamma, lmbda)` | `gamma`, `lambda_` |",
    "| `target_kl` | none (stop in the caller) | `use_kl_loss=False`; no stop |",
    "| `prio_alpha = 0`, no priority weights | none | none |",
    "| recurrent: row from column 0's stored state, zeroed at `dones` | - | `MettaRecurrentModule`; episodes split at "
    "`dones`, a row that starts inside an episode has a lookback `STATE_OUT` = the stored state; `max_seq_len = T + 1` |",
)
"""The settings and data mapping, as Markdown table lines."""

PIECES = (
    "| piece of Metta's loss | Metta (SPEC) | TorchRL `ClipPPOLoss` + `GAE` | RLlib `PPOTorchLearner` + GAE connector |",
    "|---|---|---|---|",
    "| `importance_ratio` | `exp(clamp(new - old logprob, -10, 10))` | log-ratio not clamped | log-ratio not clamped |",
    "| `compute_advantage` | V-trace GAE on the stored values, reward `rewards[:, t+1]`, last step 0, truncation "
    "ignored | ratio-free GAE on the current critic's values, reward at the action's index, last step bootstrapped, "
    "trace cut at truncations | same as TorchRL |",
    "| `normalize_advantage` | per minibatch, `(A - mean) / (std + 1e-8)` (Bessel std) | `std.clamp_min(1e-6)` "
    "instead of `std + 1e-8` | always on, batch-wide in the GAE connector, population std, `max(1e-4, std)`, one "
    "artificial bootstrap step per episode in the statistics |",
    "| `prioritized_sample` | advantages times `(S * p[idx]) ** -beta` | no priority weights | no priority weights |",
    "| `clipped_surrogate_pg_loss` | `mean(max(-A r, -A clamp(r, 1 - clip_coef, 1 + clip_coef)))` | same "
    "(`clip_epsilon`) | same (`clip_param`) |",
    "| `clipped_value_loss` | `0.5 * mean(max(...))`, `vf_clip_coef` clips the value change | the `l2` critic has no "
    "1/2 factor (`critic_coeff = 0.5 * vf_coef`), the default critic is smooth-L1; `clip_value` clips the value "
    "change as Metta | `vf_loss` has no 1/2 factor (`vf_loss_coeff = 0.5 * vf_coef`); `vf_clip_param` clamps the "
    "squared error |",
    "| `entropy_loss` | `-mean(entropy)` | same (`entropy_coeff`) | same (`entropy_coeff`) |",
    "| `approx_kl` | `mean((r - 1) - log r)` | `mean(old - new logprob)` | 0 with `use_kl_loss=False` |",
    "| `unroll` | recurrent policies (SPEC §6): each row from the stored state of column 0, state zeroed at every "
    "`dones or truncateds` column | `LSTMModule`/`GRUModule` recurrent mode: rows cut at `is_init`, each piece "
    "from its first column's *stored* state (zero only when the primer stored zeros there) | each `max_seq_len` sequence "
    "from its stored `STATE_OUT` (the row's column 0 when `max_seq_len = bptt_horizon`) |",
)
"""Where each framework differs, piece by piece of ``ppo_minibatch_loss`` (Markdown table lines)."""

EQUIVALENCE_TOLERANCE = 1e-6
"""Largest accepted difference where the mapping claims equivalence."""

COMPARED = ("policy_loss", "value_loss", "entropy", "approx_kl")
"""Scalars compared (native values mapped to Metta's definitions); ``grad:<param>`` are the gradients."""


@dataclass
class Problem:
    """A case buffer as one minibatch; ``final_obs[:, t]`` is the observation that followed action ``t``
    (``env_obs[:, t+1]`` except after a truncation); ``prio_weights`` ``[S, 1]`` or None."""

    case: Case
    final_obs: np.ndarray
    prio_weights: np.ndarray | None = None

    def edit(self, *, data: dict | None = None, ppo: dict | None = None, **changes) -> "Problem":
        """A copy with some ``data`` arrays, ``ppo`` settings (nested dicts merged) or fields replaced."""
        config = {**self.case.config, "ppo": _merge(self.case.config["ppo"], ppo or {})}
        case = dataclasses.replace(self.case, config=config, data={**self.case.data, **(data or {})})
        return dataclasses.replace(self, case=case, **changes)


def _merge(base: dict, updates: dict) -> dict:
    out = dict(base)
    for key, value in updates.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return out


def _current(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs of the stored actions and values under the case's initial weights, ``[S, T]`` each
    (a recurrent policy unrolls each row from its stored state, SPEC §6)."""
    s, t = case.data["values"].shape
    params = {k: torch.from_numpy(v) for k, v in case.weights.items()}
    with torch.no_grad():
        if case.policy_kind != "mlp":
            logprob, _, value = reference.recurrent_policy_forward(params, case.config["policy"], case.tensors())
        else:
            actions = torch.from_numpy(case.data["actions"]).reshape(s * t, *case.data["actions"].shape[2:])
            logprob, _, value = reference.policy_forward(params, case.config["policy"],
                                                         torch.from_numpy(case.data["env_obs"]).reshape(s * t, -1),
                                                         actions)
    return logprob.numpy().reshape(s, t), value.numpy().reshape(s, t)


def equivalence_problem(case: Case, ratio_noise: float = 0.3, seed: int = 0) -> Problem:
    """The case's observations, actions, rewards and terminals under the equivalence mapping (module docstring)."""
    final_obs = np.concatenate([case.data["env_obs"][:, 1:], case.data["env_obs"][:, -1:]], axis=1)
    problem = Problem(case, final_obs).edit(data={"truncateds": np.zeros_like(case.data["values"])})
    logprob, value = _current(problem.case)
    rng = np.random.default_rng(seed)
    return problem.edit(
        data={"act_log_prob": (logprob - np.abs(rng.normal(0.0, ratio_noise, logprob.shape))).astype(np.float32),
              "values": value},
        ppo={"vtrace": {"rho_clip": 1.0, "c_clip": 1.0}, "target_kl": None,
             "prioritized_experience_replay": {"prio_alpha": 0.0}},
    )


# -- Metta (the reference) ---------------------------------------------------------------------

def metta(problem: Problem) -> dict[str, Any]:
    """Metta's terms and gradients on the whole buffer (SPEC §4.4-4.6, no sampling)."""
    config = problem.case.config
    data = problem.case.tensors()
    params = {k: torch.tensor(v, requires_grad=True) for k, v in problem.case.weights.items()}
    s = data["values"].shape[0]
    prio = torch.ones(s, 1) if problem.prio_weights is None else torch.from_numpy(problem.prio_weights)
    terms = reference.minibatch_terms(config["ppo"], params, config["policy"], data,
                                      reference.first_pass(config["ppo"], data), prio)
    grads = torch.autograd.grad(terms["loss"], list(params.values()))
    out: dict[str, Any] = {k: float(terms[k].detach()) for k in COMPARED}
    out.update({f"grad:{k}": g.numpy() for k, g in zip(params, grads)})
    return out


# -- TorchRL -----------------------------------------------------------------------------------

def torchrl_batch(problem: Problem, *, shift_rewards: bool = True, terminal_last_step: bool = True,
                  zero_reset_states: bool = True):
    """The problem as a TorchRL ``[S, T]`` batch (see the module docstring for the mapping).

    ``shift_rewards=False`` gives the naive mapping ``reward[:, t] = rewards[:, t]``;
    ``terminal_last_step=False`` leaves the last step non-terminal with reward 0 (TorchRL then
    bootstraps it from ``V(next observation)``).

    A recurrent case adds ``is_init = dones or truncateds`` and the stored states, zeroed where
    ``is_init`` (as TorchRL's primer stores them after a reset; ``zero_reset_states=False`` keeps
    the case's non-zero states there), and the first-pass ``advantage`` / ``value_target``:
    TorchRL's GAE would run the recurrent critic on ``("next", ...)`` entries, whose stored
    states a buffer of rows does not have.
    """
    from tensordict import TensorDict

    d = problem.case.tensors()
    recurrent = {}
    if problem.case.policy_kind != "mlp":
        is_init = (d["dones"] != 0) | (d["truncateds"] != 0)
        mask = is_init[..., None, None] if zero_reset_states else torch.zeros_like(is_init)[..., None, None]
        recurrent = {key: d[key].masked_fill(mask, 0.0) for key in problem.case.state_keys}
        first = reference.first_pass(problem.case.config["ppo"], d)
        recurrent.update(is_init=is_init.unsqueeze(-1), advantage=first.unsqueeze(-1),
                         value_target=(first + d["values"]).unsqueeze(-1), state_value=d["values"].unsqueeze(-1))
    if shift_rewards:
        reward = torch.cat([d["rewards"][:, 1:], d["values"][:, -1:]], dim=1)
        terminated = torch.cat([d["dones"][:, 1:], torch.ones_like(d["dones"][:, -1:])], dim=1).bool()
        truncated = torch.cat([d["truncateds"][:, 1:], torch.zeros_like(d["dones"][:, -1:])], dim=1).bool()
    else:
        reward, terminated, truncated = d["rewards"].clone(), d["dones"].bool(), d["truncateds"].bool()
    if not terminal_last_step:
        reward[:, -1] = 0.0
        terminated[:, -1] = False
    return TensorDict({
        **recurrent,
        "observation": d["env_obs"], "action": d["actions"], "action_log_prob": d["act_log_prob"],
        "next": {"observation": torch.from_numpy(problem.final_obs.copy()), "reward": reward.unsqueeze(-1),
                 "terminated": terminated.unsqueeze(-1), "truncated": truncated.unsqueeze(-1),
                 "done": (terminated | truncated).unsqueeze(-1)},
    }, batch_size=list(d["values"].shape))


def torchrl(problem: Problem, *, loss_critic_type: str = "l2", **batch_options) -> dict[str, Any]:
    """TorchRL's ``ClipPPOLoss`` + ``GAE`` under the mapping; values mapped to Metta's definitions."""
    from torchrl.objectives import ClipPPOLoss
    from torchrl.objectives.value import GAE

    from bridges.conformance.runners.torchrl import policy_modules

    ppo = problem.case.config["ppo"]
    actor, critic, policy = policy_modules(problem.case)
    loss = ClipPPOLoss(actor, critic, clip_epsilon=ppo["clip_coef"], entropy_coeff=ppo["ent_coef"],
                       critic_coeff=0.5 * ppo["vf_coef"], loss_critic_type=loss_critic_type,
                       normalize_advantage=ppo["norm_adv"], clip_value=ppo["vf_clip_coef"] if ppo["clip_vloss"] else None)
    loss.make_value_estimator(GAE(gamma=ppo["gamma"], lmbda=ppo["gae_lambda"], value_network=critic))
    loss.set_keys(sample_log_prob="action_log_prob")
    out = loss(torchrl_batch(problem, **batch_options))
    total = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
    named = list(policy.named_parameters())
    grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    result: dict[str, Any] = {"policy_loss": float(out["loss_objective"].detach()),
                              "value_loss": float(out["loss_critic"].detach()) / ppo["vf_coef"],
                              "entropy": float(out["entropy"]), "approx_kl": float(out["kl_approx"])}
    result.update({f"grad:{n}": (torch.zeros_like(p) if g is None else g).numpy() for (n, p), g in zip(named, grads)})
    return result


# -- RLlib -------------------------------------------------------------------------------------

def rllib_episodes(problem: Problem) -> list:
    """The problem's rows as RLlib episodes: split at terminals and truncations, last step terminal
    with reward ``V(o_{T-1})``; ``ACTION_DIST_INPUTS`` of the current policy for RLlib's KL term."""
    from ray.rllib.core.columns import Columns
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    d = problem.case.data
    params = {k: torch.from_numpy(v) for k, v in problem.case.weights.items()}
    s_count, horizon = d["values"].shape
    recurrent = problem.case.policy_kind != "mlp"
    with torch.no_grad():
        if recurrent:
            inputs = _recurrent_dist_inputs(problem.case)
        else:
            inputs = reference.layers_forward(torch.from_numpy(d["env_obs"]), params, "actor")
            if "log_std" in params:
                inputs = torch.cat([inputs, params["log_std"].expand_as(inputs)], dim=-1)
    episodes = []
    for s in range(s_count):
        start = 0
        for t in range(horizon):
            last = t == horizon - 1
            ends = last or d["dones"][s, t + 1] or d["truncateds"][s, t + 1]
            if not ends:
                continue
            steps = range(start, t + 1)
            rewards = [float(d["rewards"][s, k + 1]) for k in steps if k < t] + \
                      [float(d["values"][s, t] if last else d["rewards"][s, t + 1])]
            columns = {
                "observations": [d["env_obs"][s, k] for k in steps] + [problem.final_obs[s, t]],
                "actions": [d["actions"][s, k] for k in steps], "rewards": rewards,
                "extra_model_outputs": {Columns.ACTION_LOGP: [d["act_log_prob"][s, k] for k in steps],
                                        Columns.ACTION_DIST_INPUTS: [inputs[s, k].numpy() for k in steps]},
            }
            lookback = 0
            if recurrent:  # RLlib's stored states: zeros at an episode's start, else the row's stored state
                # STATE_OUT of step k = the stored input state of step k + 1 (read only at sequence starts)
                columns["extra_model_outputs"][Columns.STATE_OUT] = [
                    {key: d[key][s, min(k + 1, horizon - 1)] for key in problem.case.state_keys} for k in steps]
                if start == 0 and not d["dones"][s, 0]:  # the row starts inside an episode
                    lookback = 1
                    columns["observations"].insert(0, d["env_obs"][s, 0])
                    columns["actions"].insert(0, d["actions"][s, 0])
                    columns["rewards"].insert(0, 0.0)
                    for key, value in ((Columns.ACTION_LOGP, 0.0), (Columns.ACTION_DIST_INPUTS, inputs[s, 0].numpy()),
                                       (Columns.STATE_OUT, {key: d[key][s, 0] for key in problem.case.state_keys})):
                        columns["extra_model_outputs"][key].insert(0, value)
            episodes.append(SingleAgentEpisode(
                **columns, terminated=bool(last or d["dones"][s, t + 1]), truncated=not (last or d["dones"][s, t + 1]),
                len_lookback_buffer=lookback, t_started=lookback,
            ).to_numpy())
            start = t + 1
    return episodes


def _recurrent_module(case: Case, max_seq_len: int):
    """``RLModuleSpec`` of the bridge's ``MettaRecurrentModule`` for a recurrent case."""
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from bridges.rllib.recurrent import MettaRecurrentModule

    policy = case.config["policy"]
    return RLModuleSpec(module_class=MettaRecurrentModule, model_config={
        "cell": case.policy_kind, "hidden_size": policy["hidden_size"], "num_layers": policy["num_layers"],
        "shared_core": policy["shared_core"], "max_seq_len": max_seq_len})


def _recurrent_dist_inputs(case: Case) -> torch.Tensor:
    """``[S, T, ...]`` action distribution inputs of the case's rows (stored state of column 0, resets
    at ``dones``): what RLlib's env runner would have stored."""
    from ray.rllib.core.columns import Columns

    from bridges.conformance.runners import spaces
    from bridges.rllib.recurrent import STATE_RESETS

    obs_space, act_space = spaces(case)
    spec = _recurrent_module(case, case.trainer.bptt_horizon)
    module = spec.module_class(observation_space=obs_space, action_space=act_space, model_config=spec.model_config)
    module.net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in case.weights.items()})
    d = case.tensors()
    rows = {Columns.OBS: d["env_obs"], STATE_RESETS: d["dones"] > 0,
            Columns.STATE_IN: {key: d[key][:, 0] for key in case.state_keys}}
    return module.forward_train(rows)[Columns.ACTION_DIST_INPUTS]


def rllib(problem: Problem, *, vf_clip_param: float = math.inf, max_seq_len: int | None = None) -> dict[str, Any]:
    """RLlib's ``PPOTorchLearner`` (default learner connectors, GAE) for one update on the problem.

    Values are the learner's metrics at the initial weights, mapped to Metta's definitions
    (``value_loss = vf_loss / 2``); RLlib's update exposes no gradients. A recurrent case runs the
    bridge's ``MettaRecurrentModule`` through RLlib's stateful pipeline (``AddStatesFromEpisodesToBatch``,
    ``AddTimeDimToBatchAndZeroPad``), ``max_seq_len`` ``T + 1`` by default (one sequence per episode).
    """
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from bridges.conformance.runners import spaces
    from bridges.conformance.runners.rllib import ActorCriticModule

    ppo = problem.case.config["ppo"]
    episodes = rllib_episodes(problem)
    n = int(problem.case.data["values"].size) + len(episodes)
    config = (
        PPOConfig()
        .training(gamma=ppo["gamma"], lambda_=ppo["gae_lambda"], clip_param=ppo["clip_coef"],
                  entropy_coeff=ppo["ent_coef"], vf_loss_coeff=0.5 * ppo["vf_coef"], vf_clip_param=vf_clip_param,
                  use_kl_loss=False, kl_coeff=0.0, lr=1e-3, grad_clip=None, train_batch_size_per_learner=n,
                  minibatch_size=n, num_epochs=1, shuffle_batch_per_epoch=False)
    )
    if problem.case.policy_kind != "mlp":  # one sequence per episode (one extra timestep each)
        seq = problem.case.trainer.bptt_horizon + 1 if max_seq_len is None else max_seq_len
        config = config.rl_module(rl_module_spec=_recurrent_module(problem.case, seq))
    else:
        config = config.rl_module(rl_module_spec=RLModuleSpec(
            module_class=ActorCriticModule, model_config={"hidden": list(problem.case.config["policy"]["hidden"])}))
    learner = config.build_learner(spaces={DEFAULT_MODULE_ID: spaces(problem.case)})
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    module.net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in problem.case.weights.items()})
    metrics = learner.update(episodes=episodes)[DEFAULT_MODULE_ID]
    return {"policy_loss": float(metrics["policy_loss"].peek()), "value_loss": float(metrics["vf_loss"].peek()) / 2,
            "entropy": float(metrics["entropy"].peek()), "approx_kl": float(metrics["mean_kl_loss"].peek())}


# -- the matrix --------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the matrix: ``size`` is the max abs difference over ``items`` (worst one named);
    ``piece`` names the piece(s) of Metta's loss where a divergence comes from."""

    framework: str
    name: str
    case: str
    piece: str = ""
    size: float = math.nan
    worst: str = ""
    equivalent: bool = False
    error: str = ""
    items: tuple[str, ...] = field(default_factory=tuple)


def _diff(metta_out: dict, native_out: dict, items: tuple[str, ...]) -> tuple[float, str]:
    keys = [k for k in metta_out if k in items or (k.startswith("grad:") and "grads" in items)]
    diffs = {k: float(np.max(np.abs(np.asarray(metta_out[k], dtype=np.float64) - np.asarray(native_out[k]))))
             for k in keys if k in native_out}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def _row(framework: str, name: str, case: str, items: tuple[str, ...], compute: Callable[[], tuple[dict, dict]],
         equivalent: bool = False, piece: str = "") -> Row:
    row = Row(framework, name, case, piece=piece, equivalent=equivalent, items=items)
    try:
        row.size, row.worst = _diff(*compute(), items)
    except Exception as exc:  # a framework that cannot run the probe is reported, not fatal
        row.error = f"{type(exc).__name__}: {exc}"
    return row


def recurrent_matrix(case: Case) -> list[Row]:
    """A recurrent case (SPEC §6). TorchRL: ``ClipPPOLoss`` on ``LSTMModule`` / ``GRUModule`` networks
    (recurrent mode), equivalence rows with the stored states TorchRL's primer writes (zeros at
    ``is_init``) and the first-pass advantage given, and the probe where the stored state of a reset
    column is not zero (TorchRL starts the piece from it, SPEC §6 from zeros). RLlib: its stateful PPO
    path (``use_lstm``'s connectors) with the bridge's ``MettaRecurrentModule``."""
    base = equivalence_problem(case)
    name = case.name
    all_items = ("policy_loss", "value_loss", "entropy", "grads")
    rows = []
    for norm_adv in (True, False):
        for clip_vloss in (True, False):
            p = base.edit(ppo={"norm_adv": norm_adv, "clip_vloss": clip_vloss})
            rows.append(_row("torchrl", f"equivalent (LSTMModule/GRUModule, recurrent mode): norm_adv={norm_adv}, "
                             f"clip_vloss={clip_vloss}", name, all_items, lambda p=p: (metta(p), torchrl(p)),
                             equivalent=True))
    rows.append(_row("torchrl", "stored state of a reset column not zero: TorchRL's recurrent mode starts the "
                     "piece from it, SPEC §6 from zeros (the bridge zeroes it)", name, all_items,
                     lambda: (metta(base), torchrl(base, zero_reset_states=False)), piece="unroll"))

    plain = base.edit(ppo={"clip_vloss": False})
    items = ("value_loss", "entropy")
    horizon = case.trainer.bptt_horizon
    return rows + [
        _row("rllib", "equivalent: PPO with a stateful module (use_lstm's pipeline), value_loss and entropy "
             "(norm_adv=True, clip_vloss=False)", case.name, items, lambda: (metta(plain), rllib(plain)),
             equivalent=True),
        _row("rllib", f"state: max_seq_len={horizon // 2} < bptt_horizon restarts each sequence from the stored "
             "STATE_OUT (Metta unrolls the row from column 0's stored state)", case.name, items,
             lambda: (metta(plain), rllib(plain, max_seq_len=horizon // 2)), piece="unroll"),
    ]


def matrix(case: Case) -> list[Row]:
    """Equivalence rows (must agree) and divergence probes (sizes), on problems built from ``case``."""
    if case.policy_kind != "mlp":
        return recurrent_matrix(case)
    base = equivalence_problem(case)
    name = case.name
    scalars = ("policy_loss", "value_loss", "entropy")
    all_items = (*scalars, "grads")
    rows = []
    for norm_adv in (True, False):
        for clip_vloss in (True, False):
            p = base.edit(ppo={"norm_adv": norm_adv, "clip_vloss": clip_vloss})
            rows.append(_row("torchrl", f"equivalent: norm_adv={norm_adv}, clip_vloss={clip_vloss}", name, all_items,
                             lambda p=p: (metta(p), torchrl(p)), equivalent=True))
    p = base.edit(ppo={"clip_vloss": False})
    rows.append(_row("rllib", "equivalent: value_loss and entropy (norm_adv=True, clip_vloss=False)", name,
                     ("value_loss", "entropy"), lambda: (metta(p), rllib(p)), equivalent=True))
    plain = base.edit(ppo={"clip_vloss": False})  # RLlib's vf_clip_param = inf
    # (framework, piece where it diverges, label, problem, compared items, compute)
    probes = [
        ("torchrl", "clipped_value_loss", "critic loss: TorchRL's default smooth-L1 instead of 0.5 * squared error",
         base, ("value_loss",), lambda p: (metta(p), torchrl(p, loss_critic_type="smooth_l1"))),
        ("torchrl", "normalize_advantage",
         "normalization eps: std.clamp_min(1e-6) vs std + 1e-8 (advantages with spread ~1e-7)",
         _tiny_spread(base), ("grads",), lambda p: (metta(p), torchrl(p))),
        ("torchrl", "approx_kl", "KL estimator: mean(old - new logprob) vs mean((ratio - 1) - log ratio)", base,
         ("approx_kl",), lambda p: (metta(p), torchrl(p))),
        ("torchrl", "compute_advantage", "reward index: unshifted mapping reward[t] = rewards[t]", base, all_items,
         lambda p: (metta(p), torchrl(p, shift_rewards=False))),
        ("torchrl", "compute_advantage", "last step: bootstrapped from V(next obs) instead of advantage 0", base,
         all_items, lambda p: (metta(p), torchrl(p, terminal_last_step=False))),
        ("rllib", "normalize_advantage", "normalization: batch-wide in the GAE connector, population std, "
         "max(1e-4, std), and the statistics include one artificial bootstrap step per episode", plain,
         ("policy_loss",), lambda p: (metta(p), rllib(p))),
        ("rllib", "normalize_advantage", "norm_adv=False is not expressible (RLlib's GAE connector always normalizes)",
         plain.edit(ppo={"norm_adv": False}), ("policy_loss",), lambda p: (metta(p), rllib(p))),
        ("rllib", "clipped_value_loss",
         "value clip: vf_clip_param=0.1 clamps the squared error (Metta clips the value change)",
         base.edit(ppo={"vf_clip_coef": 0.1}), ("value_loss",), lambda p: (metta(p), rllib(p, vf_clip_param=0.1))),
        ("rllib", "approx_kl", "KL: 0 with use_kl_loss=False (Metta reports mean((ratio - 1) - log ratio))", plain,
         ("approx_kl",), lambda p: (metta(p), rllib(p))),
    ]
    # (piece, label, change, TorchRL items, RLlib items or None). RLlib's policy_loss always carries
    # its normalization divergence, so divergences that only move the policy loss by less than that
    # (V-trace recompute, priority weights) are not separable there and are listed for TorchRL only.
    shared = (
        ("importance_ratio", "log-ratio not clamped to +-10 (one ratio e^12 with a negative advantage, norm_adv off)",
         _huge_ratio, ("policy_loss",), ("policy_loss",)),
        ("compute_advantage", "truncation: trace cut and bootstrap from the final obs (Metta ignores truncation)",
         _truncated, all_items, ("value_loss", "entropy")),
        ("compute_advantage", "V-trace recompute with ratios on both sides of 1 (natives use ratio-free GAE)",
         _two_sided_ratios, all_items, None),
        ("prioritized_sample", "prioritized weights (prio_alpha 0.6, beta 0.6) multiply Metta's advantages",
         _prioritized, all_items, None),
        ("compute_advantage, clipped_value_loss",
         "values: natives recompute V with the current critic; Metta uses stored values (noise 0.5)",
         _stale_values, all_items, ("value_loss", "entropy")),
    )
    for piece, label, change, torchrl_items, rllib_items in shared:
        probes.append(("torchrl", piece, label, change(base), torchrl_items, lambda p: (metta(p), torchrl(p))))
        if rllib_items:
            probes.append(("rllib", piece, label, change(plain), rllib_items, lambda p: (metta(p), rllib(p))))
    for framework, piece, label, problem, items, compute in probes:
        rows.append(_row(framework, label, name, items, lambda p=problem, c=compute: c(p), piece=piece))
    return rows


def _tiny_spread(p: Problem) -> Problem:
    """Rewards chosen so that every first-pass advantage is ``1e-7 * k`` (spread ~1e-7), terminal each step."""
    v = p.case.data["values"]
    rewards = np.zeros_like(v)
    rewards[:, 1:] = v[:, :-1] + 1e-7 * (np.arange(v[:, :-1].size).reshape(v[:, :-1].shape) % 3)
    return p.edit(data={"rewards": rewards.astype(np.float32), "dones": np.ones_like(v)})


def _huge_ratio(p: Problem) -> Problem:
    a0 = reference.first_pass(p.case.config["ppo"], p.case.tensors()).numpy()
    s, t = np.unravel_index(np.argmin(a0), a0.shape)
    logp = p.case.data["act_log_prob"].copy()
    current, _ = _current(p.case)
    logp[s, t] = current[s, t] - 12.0
    return p.edit(data={"act_log_prob": logp}, ppo={"norm_adv": False})


def _truncated(p: Problem) -> Problem:
    truncateds = np.zeros_like(p.case.data["values"])
    truncateds[:, p.case.data["values"].shape[1] // 2] = 1.0
    final_obs = p.final_obs.copy()
    k = truncateds.shape[1] // 2 - 1
    final_obs[:, k] = np.random.default_rng(1).normal(size=final_obs[:, k].shape).astype(np.float32)
    dones = p.case.data["dones"].copy()
    dones[:, k + 1] = 0.0
    return p.edit(data={"truncateds": truncateds, "dones": dones}, final_obs=final_obs)


def _two_sided_ratios(p: Problem) -> Problem:
    current, _ = _current(p.case)
    noise = np.random.default_rng(2).normal(0.0, 0.5, current.shape)
    return p.edit(data={"act_log_prob": (current + noise).astype(np.float32)})


def _prioritized(p: Problem) -> Problem:
    a0 = reference.first_pass(p.case.config["ppo"], p.case.tensors())
    s = a0.shape[0]
    idx, weights = reference.sample_segments(a0, s, 0.6, 0.6, torch.Generator().manual_seed(0))
    per_row = torch.empty_like(weights)
    per_row[idx] = weights  # all rows are drawn; put each row's weight at its row
    return p.edit(prio_weights=per_row.numpy())


def _stale_values(p: Problem) -> Problem:
    v = p.case.data["values"]
    return p.edit(data={"values": (v + np.random.default_rng(3).normal(0.0, 0.5, v.shape)).astype(np.float32)})


def native_markdown(rows: list[Row]) -> str:
    """The settings mapping, the pieces, the equivalence rows and the divergence probes as Markdown."""
    lines = ["# Native equivalence matrix", "",
             "TorchRL's `ClipPPOLoss` + `GAE` and RLlib's `PPOTorchLearner` + its GAE connector against Metta's",
             "loss (`bridges.conformance.reference`, SPEC §1-§4), on one minibatch made of a whole case buffer.",
             "Regenerate with `metta-bridges conformance --native --native-markdown docs/native_equivalence.md`.",
             "Which of `ClipPPOLoss`'s API conventions `MettaPPOLoss` keeps, and which it refuses and why:",
             "`docs/torchrl_conventions.md`.",
             "", "## Mapping under which the numbers agree", "", *MAPPING, "",
             "## Where each framework differs, piece by piece", "",
             "The pieces `ppo_minibatch_loss` is composed of (`metta_core.ppo_math`, and the advantage kernels of",
             "`metta_core.advantage`), with what each framework computes in their place.", "", *PIECES, "",
             f"## Equivalence (must be <= {EQUIVALENCE_TOLERANCE:g})", "",
             "| framework | setting | case | max abs diff | at | result |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r.equivalent):
        ok = not r.error and r.size <= EQUIVALENCE_TOLERANCE
        lines.append(f"| {r.framework} | {r.name.removeprefix('equivalent: ')} | {r.case} | "
                     f"{'-' if r.error else f'{r.size:.1e}'} | {r.error or r.worst} | {'PASS' if ok else '**FAIL**'} |")
    lines += ["", "## Divergences (one change from the equivalence problem each)", "",
              "| framework | piece | divergence (minimal case) | case | compared | size (max abs diff) | at |",
              "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if not r.equivalent):
        piece = ", ".join(f"`{p}`" for p in r.piece.split(", "))
        lines.append(f"| {r.framework} | {piece} | {r.name} | {r.case} | {', '.join(r.items)} | "
                     f"{'-' if r.error else f'{r.size:.2e}'} | {r.error or r.worst} |")
    return "\n".join(lines) + "\n"
