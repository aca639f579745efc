"""A slow, separate re-statement of SPEC §1-§4 and §6 that produces the conformance expected values.

Nothing here imports ``metta_core`` or a bridge: the expected values stored in the case files
must not come from the code they check. The policy is evaluated from its weights by a small
functional forward (the architectures documented in ``golden/README.md``: a tanh MLP, or a
recurrent trunk stepped one row and one column at a time with the LSTM/GRU gate equations
written out, SPEC §6, optionally reading the previous action beside the observation), the
advantage is a per-element float32 loop, and the training phase is written out step by step.
Settings are the plain dicts of a case file (``ppo``, ``trainer``, ``optimizer``, ``policy``).

Conventions (SPEC §1): every data array is ``[segments, horizon]`` (plus feature dims);
``rewards[:, t]`` and ``dones[:, t]`` belong to the transition that led into observation ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TERM_NAMES = ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "importance", "current_logprobs")
"""Scalars of one minibatch (SPEC §4.6-4.7); ``loss`` is the differentiable total."""

PHASE_STAT_NAMES = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "importance",
                    "current_logprobs", "explained_variance")
"""Phase statistics: the mean of each tracked minibatch stat, plus ``explained_variance`` (SPEC §4)."""

SINGLE_ELEMENT_NORM_ERROR = "at least 2 elements"
"""Substring of the error every implementation raises for ``norm_adv`` over one element."""


class SpecInputError(ValueError):
    """The SPEC cannot be evaluated on these inputs (e.g. ``norm_adv`` over one element).

    ``match`` is the part of the message every conforming implementation's error contains; it
    is stored as the case's ``expected.error``.
    """

    def __init__(self, match: str, detail: str) -> None:
        self.match = match
        super().__init__(f"{match}: {detail}")


@dataclass
class Measurement:
    """Every compared quantity of one case (what the reference expects and each runner reports).

    ``terms``: the ``TERM_NAMES`` scalars of the minibatch ``minibatch/idx`` at the initial
    weights; ``grads``: d ``loss`` / d parameter at the initial weights; ``params_after_step``:
    parameters after ``zero_grad``, backward, ``clip_grad_norm_(max_grad_norm)`` and one optimizer
    step on that loss; ``phase_stats`` and ``params_after_phase``: after one whole training phase
    from the initial weights and a fresh optimizer. Parameter names are ``ActorCritic``'s
    (``policy.kind`` mlp) or ``RecurrentActorCritic``'s (lstm, gru).
    """

    terms: dict[str, float] = field(default_factory=dict)
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    params_after_step: dict[str, np.ndarray] = field(default_factory=dict)
    phase_stats: dict[str, float] = field(default_factory=dict)
    params_after_phase: dict[str, np.ndarray] = field(default_factory=dict)


# -- policy ------------------------------------------------------------------------------------

def layers_forward(x: Tensor, params: Mapping[str, Tensor], prefix: str) -> Tensor:
    """``Linear -> tanh -> ... -> Linear`` over layers ``{prefix}.{k}.weight/bias`` in order of ``k``
    (``prefix`` is ``"actor"`` or ``"critic"``; the actor's output is the logits or the Normal mean)."""
    layers = sorted({int(name.split(".")[1]) for name in params if name.startswith(prefix + ".")})
    for j, k in enumerate(layers):
        x = F.linear(x, params[f"{prefix}.{k}.weight"], params[f"{prefix}.{k}.bias"])
        if j < len(layers) - 1:
            x = torch.tanh(x)
    return x


def policy_forward(params: Mapping[str, Tensor], policy: Mapping[str, Any], obs: Tensor, actions: Tensor):
    """``(logprob, entropy, value)`` of ``actions`` under the MLP actor-critic with ``params``; ``[N]`` each."""
    out = layers_forward(obs, params, "actor")
    value = layers_forward(obs, params, "critic").squeeze(-1)
    return action_terms(params, policy, out, actions) + (value,)


def action_terms(params: Mapping[str, Tensor], policy: Mapping[str, Any], out: Tensor, actions: Tensor):
    """``(logprob, entropy)`` of ``actions`` given the actor's output ``out`` (``[N, n]`` or ``[N, dim]``).

    Discrete: Categorical over the logits ``out``. Continuous: diagonal Normal with mean ``out`` and
    standard deviation ``exp(log_std)``; log-prob and entropy summed over dims.
    """
    if policy["action"]["kind"] == "discrete":
        logp_all = torch.log_softmax(out, dim=-1)
        logprob = logp_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    else:
        log_std = params["log_std"].expand_as(out)
        var = torch.exp(log_std) ** 2
        log_norm = 0.5 * math.log(2 * math.pi)
        logprob = (-((actions - out) ** 2) / (2 * var) - log_std - log_norm).sum(-1)
        entropy = (0.5 + log_norm + log_std).sum(-1)
    return logprob, entropy


# -- recurrent policy (SPEC §6) ----------------------------------------------------------------

RECURRENT_KINDS = ("lstm", "gru")
"""``policy.kind`` values of the recurrent actor-critic; ``"mlp"`` (the default) is the MLP one."""


def policy_kind(policy: Mapping[str, Any]) -> str:
    """``policy.kind`` of a case's policy block: ``"mlp"`` when absent."""
    return policy.get("kind", "mlp")


def trunk_roles(policy: Mapping[str, Any]) -> tuple[str, ...]:
    """State-key prefix of each recurrent trunk, in parameter order (``trunks.0``, ``trunks.1``):
    ``("",)`` for one trunk under both heads (``shared_core``), else ``("actor_", "critic_")``."""
    return ("",) if policy["shared_core"] else ("actor_", "critic_")


def state_keys(policy: Mapping[str, Any]) -> tuple[str, ...]:
    """The stored input state arrays of a policy block, ``data/<key>`` of shape ``[S, T, layers, hidden]``.

    ``()`` for an MLP; ``{role}lstm_h``, ``{role}lstm_c`` (LSTM) or ``{role}gru_h`` (GRU) for each
    trunk role of ``trunk_roles``: ``actor_lstm_h, actor_lstm_c, critic_lstm_h, critic_lstm_c``
    with separate trunks, ``lstm_h, lstm_c`` with a shared one.
    """
    kind = policy_kind(policy)
    if kind not in RECURRENT_KINDS:
        return ()
    parts = ("h", "c") if kind == "lstm" else ("h",)
    return tuple(f"{role}{kind}_{part}" for role in trunk_roles(policy) for part in parts)


LAST_ACTIONS_KEY = "last_actions"
"""``data/<key>`` of the previous actions a policy with ``condition_on_last_action`` reads (Metta's
``last_actions`` buffer field)."""


def conditions_on_last_action(policy: Mapping[str, Any]) -> bool:
    """``policy.condition_on_last_action`` of a case's policy block: ``False`` when absent."""
    return bool(policy.get("condition_on_last_action", False))


def policy_data_keys(policy: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``data/<key>`` arrays the policy reads besides Metta's step fields: the stored input states
    (``state_keys``) and ``last_actions`` when the policy conditions on its last action."""
    return state_keys(policy) + ((LAST_ACTIONS_KEY,) if conditions_on_last_action(policy) else ())


def last_action_width(policy: Mapping[str, Any]) -> int:
    """Features the last action adds to the encoder input: ``n`` (one-hot, discrete), ``dim`` (the float
    action, continuous), 0 for a policy that does not condition on it."""
    if not conditions_on_last_action(policy):
        return 0
    action = policy["action"]
    return action["n"] if action["kind"] == "discrete" else action["dim"]


def encoder_inputs(policy: Mapping[str, Any], obs: Tensor, last_actions: Tensor | None) -> Tensor:
    """The trunk encoder's input of one row, ``[T, obs_dim + last_action_width]``.

    ``obs [T, obs_dim]``; with ``condition_on_last_action`` the row's ``last_actions`` (``[T]`` action
    indices, or ``[T, dim]`` floats) is appended at each column ``t``: ``x_t = [obs_t, a_t]`` where
    ``a_t`` is the one-hot vector of ``last_actions[t]`` (``n`` entries, a 1 at the action's index)
    for discrete actions and the action itself for continuous ones. The stored value is used as it
    is at every column (Metta does not reset it at episode ends).
    """
    if not conditions_on_last_action(policy):
        return obs
    action = policy["action"]
    horizon = obs.shape[0]
    if action["kind"] == "discrete":
        previous = torch.zeros(horizon, action["n"], dtype=obs.dtype)
        for t in range(horizon):
            previous[t, int(last_actions[t])] = 1.0
    else:
        previous = last_actions.reshape(horizon, action["dim"]).to(obs.dtype)
    return torch.cat([obs, previous], dim=1)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor):
    """One LSTM step of one row (``torch.nn.LSTM``'s equations and gate order i, f, g, o)::

        i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)     f = sigmoid(W_if x + b_if + W_hf h + b_hf)
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)        o = sigmoid(W_io x + b_io + W_ho h + b_ho)
        c' = f * c + i * g                             h' = o * tanh(c')

    ``x [in]``, ``h, c [hidden]``; ``W_ih [4 hidden, in]`` stacks ``W_ii, W_if, W_ig, W_io``.
    Returns ``(h', c')``.
    """
    hidden = h.shape[0]
    gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
    i = torch.sigmoid(gi[:hidden] + gh[:hidden])
    f = torch.sigmoid(gi[hidden:2 * hidden] + gh[hidden:2 * hidden])
    g = torch.tanh(gi[2 * hidden:3 * hidden] + gh[2 * hidden:3 * hidden])
    o = torch.sigmoid(gi[3 * hidden:] + gh[3 * hidden:])
    c_next = f * c + i * g
    return o * torch.tanh(c_next), c_next


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One GRU step of one row (``torch.nn.GRU``'s equations and gate order r, z, n)::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)     z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))  h' = (1 - z) * n + z * h

    ``x [in]``, ``h [hidden]``; ``W_ih [3 hidden, in]`` stacks ``W_ir, W_iz, W_in``. Returns ``h'``.
    """
    hidden = h.shape[0]
    gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
    r = torch.sigmoid(gi[:hidden] + gh[:hidden])
    z = torch.sigmoid(gi[hidden:2 * hidden] + gh[hidden:2 * hidden])
    n = torch.tanh(gi[2 * hidden:] + r * gh[2 * hidden:])
    return (1 - z) * n + z * h


def trunk_row(params: Mapping[str, Tensor], policy: Mapping[str, Any], prefix: str, inputs: Tensor, reset: Tensor,
              stored: list[Tensor]) -> Tensor:
    """Features ``[T, 2 hidden]`` of one buffer row through trunk ``prefix`` (``"trunks.0"`` ...), SPEC §6.

    ``inputs [T, in]`` (``encoder_inputs``: the observations, and the last actions); ``reset [T]``
    (``dones[t] or truncateds[t]``); ``stored``: the stored input state of column 0, one
    ``[layers, hidden]`` tensor per state part (``h``, and ``c`` for an LSTM). For
    ``t = 0 .. T-1``: the state is zeroed if ``reset[t]``, then ``e_t = tanh(W_enc x_t + b_enc)``
    (``x_t = inputs[t]``) goes through the layers of the cell (layer ``l``'s input is layer
    ``l-1``'s new ``h``), and the feature is ``[e_t, h_t of the last layer]``.
    """
    lstm = policy_kind(policy) == "lstm"
    layers = policy["num_layers"]
    state = [[part[layer] for layer in range(layers)] for part in stored]  # state[part][layer]: [hidden]
    features = []
    for t in range(inputs.shape[0]):
        if bool(reset[t]):
            state = [[torch.zeros_like(s) for s in part] for part in state]
        encoded = torch.tanh(params[f"{prefix}.encoder.0.weight"] @ inputs[t] + params[f"{prefix}.encoder.0.bias"])
        x = encoded
        for layer in range(layers):
            weights = [params[f"{prefix}.core.{name}_l{layer}"] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if lstm:
                state[0][layer], state[1][layer] = lstm_cell(x, state[0][layer], state[1][layer], *weights)
            else:
                state[0][layer] = gru_cell(x, state[0][layer], *weights)
            x = state[0][layer]
        features.append(torch.cat([encoded, x]))
    return torch.stack(features)


def recurrent_policy_forward(params: Mapping[str, Tensor], policy: Mapping[str, Any], rows: Mapping[str, Tensor]):
    """``(logprob, entropy, value)``, each ``[rows, T]``, of the recurrent actor-critic on buffer rows.

    ``rows`` holds ``env_obs``, ``actions``, ``dones``, ``truncateds`` and the ``policy_data_keys``
    arrays (``[rows, T, ...]``: the stored states, and ``last_actions`` with
    ``condition_on_last_action``, appended to the observation by ``encoder_inputs``). Each row is
    unrolled alone (``trunk_row``) from its stored state of column 0; the stored states of later
    columns are not read. The actor head ``actor.0`` reads trunk 0's
    features, the critic head ``critic.0`` the last trunk's (the same trunk with ``shared_core``).
    """
    keys = state_keys(policy)
    parts = len(keys) // len(trunk_roles(policy))
    reset = (rows["dones"] != 0) | (rows["truncateds"] != 0)
    actor_out, values = [], []
    for s in range(rows["env_obs"].shape[0]):
        obs = rows["env_obs"][s].reshape(rows["env_obs"].shape[1], -1)
        inputs = encoder_inputs(policy, obs, rows[LAST_ACTIONS_KEY][s] if conditions_on_last_action(policy) else None)
        features = [trunk_row(params, policy, f"trunks.{j}", inputs, reset[s],
                              [rows[key][s, 0] for key in keys[j * parts:(j + 1) * parts]])
                    for j in range(len(trunk_roles(policy)))]
        actor_out.append(F.linear(features[0], params["actor.0.weight"], params["actor.0.bias"]))
        values.append(F.linear(features[-1], params["critic.0.weight"], params["critic.0.bias"]).squeeze(-1))
    out = torch.stack(actor_out)
    n, horizon = out.shape[:2]
    actions = rows["actions"].reshape(n * horizon, *rows["actions"].shape[2:])
    logprob, entropy = action_terms(params, policy, out.reshape(n * horizon, -1), actions)
    return logprob.reshape(n, horizon), entropy.reshape(n, horizon), torch.stack(values)


# -- SPEC §2, §3 -------------------------------------------------------------------------------

def advantage(values, rewards, dones, ratio, gamma: float, gae_lambda: float, rho_clip: float, c_clip: float,
              dtype: type = np.float32) -> np.ndarray:
    """SPEC §2 one element at a time in ``dtype`` (float32, as the SPEC; float64 for the tests of the
    torch scan in float64); ``A[:, -1] = 0``."""
    v, r, d, w = (np.asarray(x, dtype=dtype) for x in (values, rewards, dones, ratio))
    g, lam, rho_max, c_max = (dtype(x) for x in (gamma, gae_lambda, rho_clip, c_clip))
    out = np.zeros_like(v)
    one = dtype(1.0)
    for s in range(v.shape[0]):
        following = dtype(0.0)
        for t in range(v.shape[1] - 2, -1, -1):
            not_terminal = one - d[s, t + 1]
            rho = min(w[s, t], rho_max)
            c = min(w[s, t], c_max)
            delta = rho * (r[s, t + 1] + g * v[s, t + 1] * not_terminal - v[s, t])
            following = delta + g * lam * c * not_terminal * following
            out[s, t] = following
    return out


def normalize(adv: Tensor) -> Tensor:
    """SPEC §3, single process: ``(A - mean) / (std + 1e-8)`` with Bessel's correction."""
    if adv.numel() < 2:
        raise SpecInputError(SINGLE_ELEMENT_NORM_ERROR, f"norm_adv over a minibatch of {adv.numel()} element(s)")
    return (adv - adv.mean()) / (adv.std() + 1e-8)


# -- SPEC §4 -----------------------------------------------------------------------------------

def minibatch_terms(ppo: Mapping[str, Any], params, policy, rows: Mapping[str, Tensor], first_adv: Tensor,
                    prio_weights: Tensor) -> dict[str, Tensor]:
    """SPEC §4.4-4.6 on ``[mb, horizon]`` rows; ``loss`` carries the graph to ``params``."""
    mb, horizon = rows["values"].shape
    if policy_kind(policy) in RECURRENT_KINDS:
        logprob, entropy, new_values = recurrent_policy_forward(params, policy, rows)
    else:
        flat_obs = rows["env_obs"].reshape(mb * horizon, -1)
        flat_actions = rows["actions"].reshape(mb * horizon, *rows["actions"].shape[2:])
        logprob, entropy, new_values = (x.reshape(mb, horizon)
                                        for x in policy_forward(params, policy, flat_obs, flat_actions))
    return loss_terms(ppo, logprob=logprob, old_logprob=rows["act_log_prob"], entropy=entropy, new_values=new_values,
                      values=rows["values"], rewards=rows["rewards"], dones=rows["dones"], first_adv=first_adv,
                      prio_weights=prio_weights)


def loss_terms(ppo: Mapping[str, Any], *, logprob: Tensor, old_logprob: Tensor, entropy: Tensor, new_values: Tensor,
               values: Tensor, rewards: Tensor, dones: Tensor, first_adv: Tensor,
               prio_weights: Tensor | None) -> dict[str, Tensor]:
    """SPEC §4.5-4.6 from the policy's outputs on ``[mb, horizon]`` rows (``TERM_NAMES``).

    The advantage is recomputed with the current ratio, normalized (``norm_adv``) and weighted;
    the returns use the first-pass advantage ``first_adv``; ``loss`` carries the graph.
    """
    logratio = logprob - old_logprob
    ratio = torch.exp(torch.clamp(logratio, -10.0, 10.0))
    vtrace = ppo["vtrace"]
    adv = torch.from_numpy(advantage(values, rewards, dones, ratio.detach(), ppo["gamma"],
                                     ppo["gae_lambda"], vtrace["rho_clip"], vtrace["c_clip"]))
    if ppo["norm_adv"]:
        adv = normalize(adv)
    if prio_weights is not None:
        adv = prio_weights * adv
    clip = ppo["clip_coef"]
    policy_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)).mean()
    returns = first_adv + values
    if ppo["clip_vloss"]:
        v_clipped = values + torch.clamp(new_values - values, -ppo["vf_clip_coef"], ppo["vf_clip_coef"])
        value_loss = 0.5 * torch.max((new_values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((new_values - returns) ** 2).mean()
    ent = entropy.mean()
    with torch.no_grad():
        stats = {
            "approx_kl": ((ratio - 1) - logratio).mean(),
            "clipfrac": ((ratio - 1).abs() > clip).float().mean(),
            "importance": ratio.mean(),
            "current_logprobs": logprob.mean(),
        }
    return {"loss": policy_loss - ppo["ent_coef"] * ent + ppo["vf_coef"] * value_loss,
            "policy_loss": policy_loss, "value_loss": value_loss, "entropy": ent, **stats}


def sizes(trainer: Mapping[str, int]) -> dict[str, int]:
    """SPEC §4 buffer arithmetic (the case loader has already checked divisibility)."""
    horizon = trainer["bptt_horizon"]
    effective = min(trainer["minibatch_size"], trainer["max_minibatch_size"])
    segments = trainer["batch_size"] // horizon
    return {"segments": segments, "minibatch_segments": effective // horizon,
            "num_minibatches": segments // (effective // horizon),
            "accumulate": max(1, trainer["minibatch_size"] // trainer["max_minibatch_size"])}


def beta(ppo, trainer, epoch: int) -> float:
    """SPEC §4.2 annealed importance exponent at trainer epoch ``epoch``."""
    prio = ppo["prioritized_experience_replay"]
    return prio["prio_beta0"] + (1 - prio["prio_beta0"]) * prio["prio_alpha"] * epoch / max(
        1, trainer["total_timesteps"] // trainer["batch_size"])


def segment_probabilities(first_adv: Tensor, alpha: float) -> Tensor:
    """SPEC §4.3 in float32: ``p = (sum_t |A0|)^alpha`` (NaN/inf as 0), then ``(p + 1e-6) / (sum p + 1e-6)``."""
    p = torch.nan_to_num(first_adv.abs().sum(dim=1) ** alpha, 0, 0, 0)
    return (p + 1e-6) / (p.sum() + 1e-6)


def sample_segments(first_adv: Tensor, count: int, alpha: float, beta_: float, generator: torch.Generator):
    """SPEC §4.3: ``(idx, prio_w)`` with ``prio_w`` of shape ``[count, 1]``."""
    p = segment_probabilities(first_adv, alpha)
    idx = torch.multinomial(p, count, replacement=False, generator=generator)
    return idx, (first_adv.shape[0] * p[idx, None]) ** -beta_


def first_pass(ppo, data: Mapping[str, Tensor]) -> Tensor:
    """SPEC §4.2: ``A0`` over the whole buffer with ratio 1."""
    v = ppo["vtrace"]
    return torch.from_numpy(advantage(data["values"], data["rewards"], data["dones"], np.ones(tuple(data["values"].shape)),
                                      ppo["gamma"], ppo["gae_lambda"], v["rho_clip"], v["c_clip"]))


def _leaves(weights: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    return {name: torch.tensor(w, dtype=torch.float32, requires_grad=True) for name, w in weights.items()}


def _optimizer(spec: Mapping[str, Any], params: list[Tensor]) -> torch.optim.Optimizer:
    if spec["name"] != "adam":
        raise SpecInputError("optimizer", f"{spec['name']!r} is not supported; use 'adam'")
    return torch.optim.Adam(params, lr=spec["lr"], betas=tuple(spec["betas"]), eps=spec["eps"])


def _numpy(params: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    return {name: p.detach().numpy().copy() for name, p in params.items()}


def one_step(config: Mapping[str, Any], data: Mapping[str, Tensor], weights, idx: Tensor, prio_w: Tensor) -> Measurement:
    """Terms, gradients and parameters after one optimizer step on the minibatch ``idx``."""
    ppo = config["ppo"]
    params = _leaves(weights)
    a0 = first_pass(ppo, data)
    terms = minibatch_terms(ppo, params, config["policy"], {k: v[idx] for k, v in data.items()}, a0[idx], prio_w)
    opt = _optimizer(config["optimizer"], list(params.values()))
    opt.zero_grad()
    terms["loss"].backward()
    grads = {name: p.grad.numpy().copy() for name, p in params.items()}
    torch.nn.utils.clip_grad_norm_(list(params.values()), ppo["max_grad_norm"])
    opt.step()
    return Measurement(terms={k: float(v.detach()) for k, v in terms.items()}, grads=grads,
                       params_after_step=_numpy(params))


def training_phase(config: Mapping[str, Any], data: Mapping[str, Tensor], weights) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, int]]:
    """SPEC §4 steps 1-9 and the end-of-phase stats; returns ``(stats, params, counts)``.

    ``counts`` has ``minibatches_evaluated`` (tracked) and ``optimizer_steps``.
    """
    ppo, trainer = config["ppo"], config["trainer"]
    n = sizes(trainer)
    params = _leaves(weights)
    opt = _optimizer(config["optimizer"], list(params.values()))
    gen = torch.Generator().manual_seed(config["sample_seed"])
    alpha = ppo["prioritized_experience_replay"]["prio_alpha"]
    tracked: dict[str, list[float]] = {k: [] for k in TERM_NAMES if k != "loss"}
    steps = 0
    a0 = None
    stop = False
    for _ in range(trainer["update_epochs"]):
        for mb_idx in range(n["num_minibatches"]):
            if mb_idx % n["accumulate"] == 0:
                opt.zero_grad()
            kl = tracked["approx_kl"]
            stop = ppo["target_kl"] is not None and mb_idx > 0 and bool(kl) and sum(kl) / len(kl) > ppo["target_kl"]
            if mb_idx == 0:
                b = beta(ppo, trainer, config["trainer_epoch"])
                a0 = first_pass(ppo, data)
            idx, prio_w = sample_segments(a0, n["minibatch_segments"], alpha, b, gen)
            terms = minibatch_terms(ppo, params, config["policy"], {k: v[idx] for k, v in data.items()}, a0[idx], prio_w)
            for name in tracked:
                tracked[name].append(float(terms[name].detach()))
            if stop:
                break
            terms["loss"].backward()
            if (mb_idx + 1) % n["accumulate"] == 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), ppo["max_grad_norm"])
                opt.step()
                steps += 1
        if stop:
            break
    stats = {name: sum(v) / len(v) for name, v in tracked.items()}
    a0_64, v64 = a0.double().numpy(), data["values"].double().numpy()
    denominator = np.var(a0_64 + v64, ddof=1) if a0_64.size > 1 else 0.0
    stats["explained_variance"] = 0.0 if denominator == 0 else float(1 - np.var(a0_64, ddof=1) / denominator)
    return stats, _numpy(params), {"minibatches_evaluated": len(tracked["approx_kl"]), "optimizer_steps": steps}
