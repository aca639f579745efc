"""Canonical conformance cases: their file format, loading with validation, and deterministic generation.

A case is two files next to each other (format ``metta-conformance/1``, documented in
``golden/README.md`` next to this module):

- ``<name>.json``: settings (``ppo`` = every ``PPOConfig`` field, ``trainer`` sizes,
  ``trainer_epoch``, ``sample_seed``, ``optimizer``, ``policy`` with its optional ``kind``
  ``mlp`` | ``lstm`` | ``gru`` and, for the recurrent kinds, the optional
  ``condition_on_last_action``, the optional ``layout``), a manifest of the arrays
  (``shape``, ``dtype``), and the expected scalars (``expected.terms``, ``expected.phase_stats``,
  ``expected.phase_counts``) or ``expected.error``.
- ``<name>.npz``: the arrays, keyed ``data/<field>`` (Metta layout ``[segments, horizon, ...]``,
  SPEC §1; a recurrent policy's stored input states ``data/<state key>``, SPEC §6, and its
  previous actions ``data/last_actions`` when it conditions on them),
  ``weights/<param>`` (initial ``ActorCritic`` or ``RecurrentActorCritic`` parameters),
  ``minibatch/idx`` and ``minibatch/prio_weights`` (the minibatch of the one-step check), and
  ``expected/{grads,params_after_step,params_after_phase}/<param>``.

Every expected value comes from ``bridges.conformance.reference`` (not from ``metta_core``).
Loading checks everything and raises ``CaseError`` naming the case and the field.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from pydantic import ValidationError

from metta_core.config import PPOConfig, TrainerConfig
from metta_core.errors import MettaError

from bridges.conformance import reference
from bridges.conformance.reference import (LAST_ACTIONS_KEY, Measurement, PHASE_STAT_NAMES, RECURRENT_KINDS, TERM_NAMES,
                                           conditions_on_last_action, last_action_width, policy_data_keys,
                                           policy_kind, state_keys, trunk_roles)

FORMAT = "metta-conformance/1"
"""Value of the ``format`` field of every case file."""

CASES_DIR = Path(__file__).resolve().parent / "golden"
"""The canonical cases, shipped inside the package (package data ``bridges/conformance/golden``)."""

DATA_FIELDS = ("env_obs", "actions", "act_log_prob", "values", "rewards", "dones", "truncateds")
"""The ``data/<field>`` arrays: Metta's buffer fields (SPEC §1)."""

POLICY_KINDS = ("mlp", *RECURRENT_KINDS)
"""``policy.kind`` values: ``mlp`` (``ActorCritic``, the default when absent), ``lstm``, ``gru``
(``RecurrentActorCritic``)."""

ARCHITECTURES = {"mlp": "actor_critic_tanh_mlp", "lstm": "recurrent_actor_critic", "gru": "recurrent_actor_critic"}
"""``policy.architecture`` of each ``policy.kind``."""

RECURRENT_FIELDS = ("hidden_size", "num_layers", "shared_core")
"""Required ``policy`` fields of the recurrent kinds only (``hidden`` is the MLP kind's only)."""

LAST_ACTION_FIELD = "condition_on_last_action"
"""Optional ``policy`` field of the recurrent kinds: the encoders also read ``data/last_actions``."""

PARAM_GROUPS = ("grads", "params_after_step", "params_after_phase")
"""The per-parameter expected arrays, ``expected/<group>/<param>``."""

_JSON_FIELDS = ("format", "name", "description", "ppo", "trainer", "trainer_epoch", "sample_seed", "optimizer",
                "policy", "arrays", "expected")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class CaseError(MettaError):
    """A case file cannot be used: ``case`` and ``field`` say which one and where."""

    def __init__(self, case: str, field: str, problem: str) -> None:
        self.case = case
        self.field = field
        super().__init__(f"case {case!r}, field {field!r}: {problem}")


# -- the policy architecture -------------------------------------------------------------------

def parameter_shapes(policy: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``ActorCritic`` (``kind`` mlp) or ``RecurrentActorCritic`` (lstm, gru) parameter names and shapes.

    MLP: actor and critic are separate tanh MLPs ``obs_dim -> hidden... -> out``; their linear
    layers sit at even indices of an ``nn.Sequential`` (``actor.0``, ``actor.2``, ...).
    Recurrent: one trunk (``shared_core``) or two (actor's ``trunks.0``, critic's ``trunks.1``),
    each ``encoder.0`` (``Linear obs_dim -> hidden_size``, then tanh; ``obs_dim + n`` or
    ``obs_dim + dim`` inputs with ``condition_on_last_action``) and ``core`` (``nn.LSTM`` /
    ``nn.GRU`` parameters ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
    ``bias_hh_l{k}``), and linear heads ``actor.0``, ``critic.0`` over ``2 * hidden_size`` features.
    ``out`` is ``n`` for discrete actions, ``dim`` for continuous ones (plus a state-independent
    ``log_std [dim]``); the critic's ``out`` is 1.
    """
    action = policy["action"]
    n_out = action["n"] if action["kind"] == "discrete" else action["dim"]
    shapes: dict[str, tuple[int, ...]] = {}
    if action["kind"] == "continuous":
        shapes["log_std"] = (n_out,)
    if policy_kind(policy) in RECURRENT_KINDS:
        hidden = policy["hidden_size"]
        gates = (4 if policy_kind(policy) == "lstm" else 3) * hidden
        for j in range(len(trunk_roles(policy))):
            shapes[f"trunks.{j}.encoder.0.weight"] = (hidden, policy["obs_dim"] + last_action_width(policy))
            shapes[f"trunks.{j}.encoder.0.bias"] = (hidden,)
            for k in range(policy["num_layers"]):
                shapes[f"trunks.{j}.core.weight_ih_l{k}"] = (gates, hidden)
                shapes[f"trunks.{j}.core.weight_hh_l{k}"] = (gates, hidden)
                shapes[f"trunks.{j}.core.bias_ih_l{k}"] = (gates,)
                shapes[f"trunks.{j}.core.bias_hh_l{k}"] = (gates,)
        for prefix, out in (("actor", n_out), ("critic", 1)):
            shapes[f"{prefix}.0.weight"] = (out, 2 * hidden)
            shapes[f"{prefix}.0.bias"] = (out,)
        return shapes
    for prefix, out in (("actor", n_out), ("critic", 1)):
        dims = [policy["obs_dim"], *policy["hidden"], out]
        for j in range(len(dims) - 1):
            shapes[f"{prefix}.{2 * j}.weight"] = (dims[j + 1], dims[j])
            shapes[f"{prefix}.{2 * j}.bias"] = (dims[j + 1],)
    return shapes


# -- loaded cases ------------------------------------------------------------------------------

@dataclass
class Case:
    """A loaded, validated case. ``config`` is the JSON settings block the reference reads."""

    name: str
    path: Path
    description: str
    config: dict[str, Any]
    data: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    idx: np.ndarray
    prio_weights: np.ndarray
    expected: Measurement | None
    expected_error: str | None
    phase_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ppo(self) -> PPOConfig:
        return PPOConfig.model_validate(self.config["ppo"])

    @property
    def trainer(self) -> TrainerConfig:
        return TrainerConfig.model_validate(self.config["trainer"])

    @property
    def policy_kind(self) -> str:
        """``"mlp"``, ``"lstm"`` or ``"gru"`` (``policy.kind``; ``"mlp"`` when absent)."""
        return policy_kind(self.config["policy"])

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The recurrent policy's stored input state fields in ``data`` (``()`` for an MLP)."""
        return state_keys(self.config["policy"])

    @property
    def conditions_on_last_action(self) -> bool:
        """Whether the recurrent policy's encoders read ``data/last_actions`` (``policy.condition_on_last_action``)."""
        return conditions_on_last_action(self.config["policy"])

    @property
    def policy_keys(self) -> tuple[str, ...]:
        """The ``data`` fields the policy reads besides Metta's step fields: the stored states, and
        ``last_actions`` when it conditions on its last action (``()`` for an MLP)."""
        return policy_data_keys(self.config["policy"])

    @property
    def agents(self) -> int:
        """Agents per env (``layout.agents``; 1 without a layout): row ``s`` is agent ``s % agents``
        of env group ``s // agents``."""
        return self.config.get("layout", {}).get("agents", 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The ``data`` arrays as new CPU tensors."""
        return {k: torch.from_numpy(v.copy()) for k, v in self.data.items()}


def _require(case: str, block: Mapping[str, Any], keys, where: str) -> None:
    if not isinstance(block, Mapping):
        raise CaseError(case, where or "json", f"expected an object, got {type(block).__name__}")
    missing = [k for k in keys if k not in block]
    if missing:
        raise CaseError(case, f"{where}.{missing[0]}" if where else missing[0], f"missing (required: {list(keys)})")


def _check_settings(case: str, doc: Mapping[str, Any]) -> None:
    _require(case, doc, _JSON_FIELDS, "")
    if doc["format"] != FORMAT:
        raise CaseError(case, "format", f"is {doc['format']!r}, this reader understands {FORMAT!r}")
    for block, model in (("ppo", PPOConfig), ("trainer", TrainerConfig)):
        try:
            model.model_validate(doc[block])
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise CaseError(case, f"{block}.{where}" if where else block, err["msg"]) from None
    for key in ("trainer_epoch", "sample_seed"):
        if not isinstance(doc[key], int) or doc[key] < 0:
            raise CaseError(case, key, f"must be a non-negative integer, got {doc[key]!r}")
    opt = doc["optimizer"]
    _require(case, opt, ("name", "lr", "betas", "eps"), "optimizer")
    if opt["name"] != "adam":
        raise CaseError(case, "optimizer.name", f"{opt['name']!r} is not supported; every runner uses 'adam'")
    pol = doc["policy"]
    _check_policy(case, pol)
    if "layout" in doc:
        _check_layout(case, doc["layout"], doc["trainer"])


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_policy(case: str, pol: Any) -> None:
    if not isinstance(pol, Mapping):
        raise CaseError(case, "policy", f"expected an object, got {type(pol).__name__}")
    kind = pol.get("kind", "mlp")
    if kind not in POLICY_KINDS:
        raise CaseError(case, "policy.kind", f"{kind!r} is not supported; use one of {list(POLICY_KINDS)}")
    recurrent = kind in RECURRENT_KINDS
    _require(case, pol, ("architecture", "obs_dim", *(RECURRENT_FIELDS if recurrent else ("hidden",)), "action"),
             "policy")
    for other in ("hidden",) if recurrent else RECURRENT_FIELDS:
        if other in pol:
            raise CaseError(case, f"policy.{other}", f"is not a field of policy.kind {kind!r}; use "
                            f"{'hidden_size, num_layers, shared_core' if recurrent else 'hidden'}")
    if pol["architecture"] != ARCHITECTURES[kind]:
        raise CaseError(case, "policy.architecture", f"{pol['architecture']!r} does not match policy.kind {kind!r}; "
                        f"use {ARCHITECTURES[kind]!r}")
    if not _positive_int(pol["obs_dim"]):
        raise CaseError(case, "policy.obs_dim", f"must be a positive integer, got {pol['obs_dim']!r}")
    if recurrent:
        for key in ("hidden_size", "num_layers"):
            if not _positive_int(pol[key]):
                raise CaseError(case, f"policy.{key}", f"must be a positive integer, got {pol[key]!r}")
        if not isinstance(pol["shared_core"], bool):
            raise CaseError(case, "policy.shared_core", f"must be true or false, got {pol['shared_core']!r}")
        if not isinstance(pol.get(LAST_ACTION_FIELD, False), bool):
            raise CaseError(case, f"policy.{LAST_ACTION_FIELD}",
                            f"must be true or false (absent means false), got {pol[LAST_ACTION_FIELD]!r}")
    elif LAST_ACTION_FIELD in pol:
        raise CaseError(case, f"policy.{LAST_ACTION_FIELD}", f"is not a field of policy.kind {kind!r}; only the "
                        f"recurrent kinds {list(RECURRENT_KINDS)} condition on their last action")
    elif not isinstance(pol["hidden"], list) or not all(isinstance(h, int) and h > 0 for h in pol["hidden"]):
        raise CaseError(case, "policy.hidden", f"must be a list of positive widths, got {pol['hidden']!r}")
    action = pol["action"]
    action_kind = action.get("kind") if isinstance(action, Mapping) else None
    size_key = {"discrete": "n", "continuous": "dim"}.get(action_kind)
    if size_key is None:
        raise CaseError(case, "policy.action.kind", f"{action_kind!r} is not supported; use 'discrete' or 'continuous'")
    if not isinstance(action.get(size_key), int) or action[size_key] < 1:
        raise CaseError(case, f"policy.action.{size_key}", f"must be a positive integer, got {action.get(size_key)!r}")


def _check_layout(case: str, layout: Any, trainer: Mapping[str, Any]) -> None:
    """``layout = {"agents": A}``: rows are ``env * A + agent`` (SPEC §1), so ``A`` divides the segments."""
    if not isinstance(layout, Mapping):
        raise CaseError(case, "layout", f"expected an object {{\"agents\": A}}, got {type(layout).__name__}")
    unknown = sorted(set(layout) - {"agents"})
    if unknown:
        raise CaseError(case, f"layout.{unknown[0]}", "is not a layout field; the only one is 'agents'")
    _require(case, layout, ("agents",), "layout")
    agents = layout["agents"]
    if not _positive_int(agents):
        raise CaseError(case, "layout.agents", f"must be a positive integer, got {agents!r}")
    segments = TrainerConfig.model_validate(trainer).sizes["segments"]
    if segments % agents:
        raise CaseError(case, "layout.agents", f"{agents} agents per env do not divide the {segments} segments "
                        f"(batch_size // bptt_horizon); rows are env * agents + agent, so use a divisor of {segments}")


def expected_shapes(doc: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array a case must hold: name -> (shape, dtype), derived from its settings."""
    trainer, pol = doc["trainer"], doc["policy"]
    n = reference.sizes({"max_minibatch_size": TrainerConfig().max_minibatch_size, **trainer})
    st = (n["segments"], trainer["bptt_horizon"])
    action = pol["action"]
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "data/env_obs": ((*st, pol["obs_dim"]), "float32"),
        "data/actions": (st, "int64") if action["kind"] == "discrete" else ((*st, action["dim"]), "float32"),
    }
    for name in DATA_FIELDS[2:]:
        out[f"data/{name}"] = (st, "float32")
    for key in state_keys(pol):
        out[f"data/{key}"] = ((*st, pol["num_layers"], pol["hidden_size"]), "float32")
    if conditions_on_last_action(pol):
        out[f"data/{LAST_ACTIONS_KEY}"] = out["data/actions"]
    shapes = parameter_shapes(pol)
    out.update({f"weights/{k}": (s, "float32") for k, s in shapes.items()})
    out["minibatch/idx"] = ((n["minibatch_segments"],), "int64")
    out["minibatch/prio_weights"] = ((n["minibatch_segments"], 1), "float32")
    if doc["expected"].get("error") is None:
        for group in PARAM_GROUPS:
            out.update({f"expected/{group}/{k}": (s, "float32") for k, s in shapes.items()})
    return out


def _read_npz(case: str, path: Path) -> dict[str, np.ndarray]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CaseError(case, "npz", f"cannot read {path}: {exc.strerror}") from None
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except zipfile.BadZipFile as exc:
        raise CaseError(case, "npz", f"{path.name} is not a valid npz (zip) file ({exc}); it may be truncated: "
                        f"regenerate it with metta-bridges conformance --regenerate") from None
    arrays = {}
    for info in archive.infolist():
        key = info.filename.removesuffix(".npy")
        try:
            with archive.open(info) as member:
                arrays[key] = np.lib.format.read_array(io.BytesIO(member.read()), allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
            raise CaseError(case, key, f"array in {path.name} is unreadable ({exc}); the file is damaged or "
                            f"truncated: regenerate it") from None
    return arrays


def _check_arrays(case: str, doc: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    manifest = doc["arrays"]
    for key, (shape, dtype) in expected_shapes(doc).items():
        if key not in arrays:
            raise CaseError(case, key, f"missing from the npz (expected shape {shape}, {dtype})")
        x = arrays[key]
        listed = manifest.get(key) if isinstance(manifest, Mapping) else None
        if not isinstance(listed, Mapping) or tuple(listed.get("shape", ())) != shape or listed.get("dtype") != dtype:
            raise CaseError(case, f"arrays.{key}", f"manifest entry {listed!r} does not match the settings, which need "
                            f"shape {list(shape)} and dtype {dtype!r}")
        if tuple(x.shape) != shape:
            raise CaseError(case, key, f"has shape {tuple(x.shape)}, expected {shape} from the settings")
        if str(x.dtype) != dtype:
            raise CaseError(case, key, f"has dtype {x.dtype}, expected {dtype}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0].tolist()
            raise CaseError(case, key, f"holds {int((~np.isfinite(x)).sum())} non-finite value(s) (NaN or inf), "
                            f"first at index {bad}")
    for key in ("data/dones", "data/truncateds"):
        if not np.isin(arrays[key], (0.0, 1.0)).all():
            raise CaseError(case, key, "flags must be 0.0 or 1.0")
    n_actions = doc["policy"]["action"].get("n")
    for key in ("actions", *((LAST_ACTIONS_KEY,) if conditions_on_last_action(doc["policy"]) else ())):
        actions = arrays[f"data/{key}"]
        if n_actions is not None and ((actions < 0) | (actions >= n_actions)).any():
            raise CaseError(case, f"data/{key}", f"discrete actions must be in 0..{n_actions - 1}")
    idx = arrays["minibatch/idx"]
    segments = arrays["data/values"].shape[0]
    if ((idx < 0) | (idx >= segments)).any() or len(set(idx.tolist())) != len(idx):
        raise CaseError(case, "minibatch/idx", f"must be distinct row indices in 0..{segments - 1}, got {idx.tolist()}")


def _check_expected(case: str, doc: Mapping[str, Any]) -> None:
    exp = doc["expected"]
    if not isinstance(exp, Mapping):
        raise CaseError(case, "expected", f"expected an object, got {type(exp).__name__}")
    if exp.get("error") is not None:
        if not isinstance(exp["error"], str) or not exp["error"]:
            raise CaseError(case, "expected.error", "must be a non-empty message substring")
        return
    for block, names in (("terms", TERM_NAMES), ("phase_stats", PHASE_STAT_NAMES)):
        _require(case, exp, (block,), "expected")
        _require(case, exp[block], names, f"expected.{block}")
        for name in names:
            value = exp[block][name]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise CaseError(case, f"expected.{block}.{name}", f"must be a finite number, got {value!r}")


def load_case(json_path: str | Path) -> Case:
    """Load and validate ``<name>.json`` and its ``<name>.npz``; raise ``CaseError`` on any problem."""
    path = Path(json_path)
    case = path.stem
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise CaseError(case, "json", f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaseError(case, "json", f"{path.name} is not valid JSON ({exc}); it may be truncated: regenerate it") from None
    _check_settings(case, doc)
    _check_expected(case, doc)
    arrays = _read_npz(case, path.with_suffix(".npz"))
    _check_arrays(case, doc, arrays)
    exp = doc["expected"]
    expected = None
    if exp.get("error") is None:
        groups = {g: {k.split("/", 2)[2]: v for k, v in arrays.items() if k.startswith(f"expected/{g}/")}
                  for g in PARAM_GROUPS}
        expected = Measurement(terms=dict(exp["terms"]), phase_stats=dict(exp["phase_stats"]), **groups)
    config = {k: doc[k] for k in ("ppo", "trainer", "trainer_epoch", "sample_seed", "optimizer", "policy")}
    config["trainer"] = TrainerConfig.model_validate(doc["trainer"]).model_dump()
    if "layout" in doc:
        config["layout"] = dict(doc["layout"])
    return Case(
        name=case, path=path, description=doc["description"], config=config,
        data={f: arrays[f"data/{f}"] for f in (*DATA_FIELDS, *policy_data_keys(doc["policy"]))},
        weights={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("weights/")},
        idx=arrays["minibatch/idx"], prio_weights=arrays["minibatch/prio_weights"],
        expected=expected, expected_error=exp.get("error"), phase_counts=dict(exp.get("phase_counts", {})),
    )


def case_paths(directory: str | Path = CASES_DIR, names: list[str] | None = None) -> list[Path]:
    """The ``.json`` files of ``directory`` (sorted), or of the given case ``names``."""
    directory = Path(directory)
    if names is None:
        return sorted(directory.glob("*.json"))
    return [directory / f"{name}.json" for name in names]


# -- canonical cases ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CaseSpec:
    """How to generate one canonical case (see ``CASE_SPECS``).

    ``ppo`` holds dotted ``PPOConfig`` overrides; ``trainer`` the ``TrainerConfig`` fields;
    ``logprob_noise`` / ``value_noise`` the spread of the stored log-probs and values around the
    initial policy's (large noise gives ratios far from 1); ``done_prob`` the chance of a terminal
    flag; ``done_pattern="edges"`` also sets terminals at segment starts, ends and in runs,
    ``"resets"`` terminals and truncations at column 0, mid-row and in runs, and one row without
    any. ``kind`` ``"lstm"`` / ``"gru"`` makes the policy a ``RecurrentActorCritic`` of
    ``hidden_size``, ``num_layers`` and ``shared_core`` (``hidden`` is then unused), reading its
    previous action too with ``condition_on_last_action`` (random ``last_actions``, non-zero
    where the flags reset the state: Metta keeps them across episode ends); ``agents > 1``
    adds ``layout = {"agents": agents}`` and gives all agents of an env group the same flags.
    ``log_std_mean``: mean of the initial ``log_std`` (continuous actions); a wider Normal keeps
    the log-probs small, so float32 rounding of them stays far below the tolerances.
    """

    name: str
    description: str
    seed: int
    ppo: Mapping[str, Any] = field(default_factory=dict)
    trainer: Mapping[str, int] = field(default_factory=dict)
    trainer_epoch: int = 0
    action: Mapping[str, Any] = field(default_factory=lambda: {"kind": "discrete", "n": 3})
    hidden: tuple[int, ...] = (8, 8)
    obs_dim: int = 3
    lr: float = 0.01
    logprob_noise: float = 0.3
    value_noise: float = 0.5
    done_prob: float = 0.1
    done_pattern: str | None = None
    kind: str = "mlp"
    hidden_size: int = 8
    num_layers: int = 1
    shared_core: bool = False
    condition_on_last_action: bool = False
    agents: int = 1
    log_std_mean: float = -0.5
    quick: bool = False


_SMALL = {"batch_size": 64, "bptt_horizon": 8, "minibatch_size": 16, "update_epochs": 2, "total_timesteps": 640}
_RECURRENT = {**_SMALL, "minibatch_size": 32}  # 4 of the 8 rows per minibatch: more resets in the one-step check

CASE_SPECS: tuple[CaseSpec, ...] = (
    CaseSpec("defaults_discrete_mlp", "PPOConfig defaults, Categorical, MLP (8, 8), 4 minibatches x 2 epochs",
             seed=1, trainer=_SMALL, quick=True),
    CaseSpec("continuous_linear_prio", "Normal actions (dim 2), linear policy, prio_alpha 0.6 annealed (epoch 5 of 10)",
             seed=2, trainer=_SMALL, trainer_epoch=5, hidden=(), action={"kind": "continuous", "dim": 2},
             ppo={"prioritized_experience_replay.prio_alpha": 0.6}, quick=True),
    CaseSpec("prio_alpha_0_annealed", "prio_alpha 0 (uniform; beta stays prio_beta0) at trainer epoch 4",
             seed=3, trainer=_SMALL, trainer_epoch=4),
    CaseSpec("prio_alpha_0_6_annealed", "prio_alpha 0.6, beta annealed at trainer epoch 4 of 10",
             seed=4, trainer=_SMALL, trainer_epoch=4, ppo={"prioritized_experience_replay.prio_alpha": 0.6}),
    CaseSpec("prio_alpha_1_annealed", "prio_alpha 1, prio_beta0 0.4, beta annealed at trainer epoch 7 of 10",
             seed=5, trainer=_SMALL, trainer_epoch=7,
             ppo={"prioritized_experience_replay.prio_alpha": 1.0, "prioritized_experience_replay.prio_beta0": 0.4}),
    CaseSpec("vtrace_clips_below_1", "rho_clip 0.5, c_clip 0.7, ratios far from 1 (log-prob noise 1.0)",
             seed=6, trainer=_SMALL, logprob_noise=1.0, ppo={"vtrace.rho_clip": 0.5, "vtrace.c_clip": 0.7}),
    CaseSpec("vtrace_clips_above_1", "rho_clip 2.0, c_clip 1.5, ratios far from 1 (log-prob noise 1.0)",
             seed=7, trainer=_SMALL, logprob_noise=1.0, ppo={"vtrace.rho_clip": 2.0, "vtrace.c_clip": 1.5}),
    CaseSpec("clip_vloss_off", "clip_vloss False, norm_adv True", seed=8, trainer=_SMALL, ppo={"clip_vloss": False}),
    CaseSpec("norm_adv_off", "norm_adv False, clip_vloss True (value noise 1.0 so the value clip binds)",
             seed=9, trainer=_SMALL, value_noise=1.0, ppo={"norm_adv": False}),
    CaseSpec("norm_adv_off_clip_vloss_off", "norm_adv False and clip_vloss False",
             seed=10, trainer=_SMALL, ppo={"norm_adv": False, "clip_vloss": False}),
    CaseSpec("target_kl_early_stop", "target_kl 0.02 with ratios far from 1: the phase stops early",
             seed=11, logprob_noise=1.0, ppo={"target_kl": 0.02}, trainer={**_SMALL, "update_epochs": 3}),
    CaseSpec("dones_edges_truncations", "terminals at segment starts, ends and in runs; truncations (ignored)",
             seed=12, trainer=_SMALL, done_pattern="edges"),
    CaseSpec("horizon_1", "bptt_horizon 1: every advantage is 0; norm_adv over 4 elements",
             seed=13, trainer={"batch_size": 8, "bptt_horizon": 1, "minibatch_size": 4, "update_epochs": 2,
                               "total_timesteps": 80}),
    CaseSpec("horizon_2", "bptt_horizon 2", seed=14,
             trainer={"batch_size": 16, "bptt_horizon": 2, "minibatch_size": 4, "update_epochs": 2,
                      "total_timesteps": 160}),
    CaseSpec("norm_adv_single_element", "bptt_horizon 1 and one-segment minibatches: norm_adv over 1 element is an error",
             seed=15, trainer={"batch_size": 4, "bptt_horizon": 1, "minibatch_size": 1, "update_epochs": 1,
                               "total_timesteps": 40}),
    CaseSpec("single_segment", "one segment of 8 steps, one minibatch", seed=16,
             trainer={"batch_size": 8, "bptt_horizon": 8, "minibatch_size": 8, "update_epochs": 3, "total_timesteps": 80}),
    CaseSpec("continuous_mlp", "Normal actions (dim 2), MLP (8, 8), prio_alpha 1", seed=17, trainer=_SMALL,
             trainer_epoch=2, action={"kind": "continuous", "dim": 2},
             ppo={"prioritized_experience_replay.prio_alpha": 1.0}),
    CaseSpec("discrete_linear", "Categorical, linear policy", seed=18, trainer=_SMALL, hidden=()),
    CaseSpec("accumulate_grad_clip", "minibatch_size 2 x max_minibatch_size (accumulate 2), max_grad_norm 0.05",
             seed=19, ppo={"max_grad_norm": 0.05},
             trainer={"batch_size": 64, "bptt_horizon": 8, "minibatch_size": 32, "max_minibatch_size": 16,
                      "update_epochs": 2, "total_timesteps": 640}),
    CaseSpec("accumulate_odd_minibatches", "accumulate 2 over 3 minibatches per epoch: the last minibatch's "
             "gradient is dropped by the next epoch's zero_grad (SPEC §4.8 counts by mb_idx)", seed=20,
             trainer={"batch_size": 48, "bptt_horizon": 8, "minibatch_size": 32, "max_minibatch_size": 16,
                      "update_epochs": 2, "total_timesteps": 480}),
    CaseSpec("lstm_discrete_dones_truncations", "LSTM (hidden 8), separate actor/critic trunks, Categorical; "
             "terminals and truncations at column 0, mid-row and in runs reset the state (SPEC §6)", seed=21,
             trainer=_RECURRENT, kind="lstm", done_prob=0.05, done_pattern="resets"),
    CaseSpec("lstm_continuous", "LSTM (hidden 8), separate actor/critic trunks, Normal actions (dim 2), lr 0.003", seed=22,
             trainer=_RECURRENT, kind="lstm", action={"kind": "continuous", "dim": 2}, log_std_mean=0.3, lr=0.003),
    CaseSpec("gru_shared_backbone", "GRU (hidden 8), one trunk under both heads (shared_core), Categorical; "
             "terminals at segment starts, ends, in runs and at every column of one row", seed=23,
             trainer=_RECURRENT, kind="gru", shared_core=True, done_pattern="edges"),
    CaseSpec("multi_agent_shared_policy", "2 envs x 4 agents sharing one MLP (8, 8) policy, rows env * 4 + agent "
             "(16 rows = 2 horizon blocks of 8 agents); all agents of an env end at the same step", seed=24,
             agents=4, done_prob=0.15,
             trainer={"batch_size": 128, "bptt_horizon": 8, "minibatch_size": 32, "update_epochs": 2,
                      "total_timesteps": 1280}),
    CaseSpec("lstm_last_action", "LSTM (hidden 8), separate actor/critic trunks, Categorical, conditioned on the "
             "last action (one-hot beside the observation); random last actions, non-zero where terminals and "
             "truncations at column 0, mid-row and in runs reset the state (Metta keeps them)", seed=28,
             trainer=_RECURRENT, kind="lstm", condition_on_last_action=True, done_prob=0.05, done_pattern="resets"),
)
"""The canonical matrix (``--all``); specs with ``quick=True`` form the default quick run."""


def _spec_config(spec: CaseSpec) -> dict[str, Any]:
    ppo = PPOConfig().update(dict(spec.ppo)).model_dump()
    trainer = TrainerConfig(**spec.trainer).model_dump()
    if spec.kind == "mlp":  # no "kind" field: the files of the MLP cases predate it
        policy = {"architecture": ARCHITECTURES["mlp"], "obs_dim": spec.obs_dim, "hidden": list(spec.hidden),
                  "action": dict(spec.action)}
    else:
        policy = {"architecture": ARCHITECTURES[spec.kind], "kind": spec.kind, "obs_dim": spec.obs_dim,
                  "hidden_size": spec.hidden_size, "num_layers": spec.num_layers, "shared_core": spec.shared_core,
                  "action": dict(spec.action)}
        if spec.condition_on_last_action:  # absent otherwise: the files of the other cases predate it
            policy[LAST_ACTION_FIELD] = True
    optimizer = {"name": "adam", "lr": spec.lr, "betas": [0.9, 0.999], "eps": 1e-12}
    config = {"ppo": ppo, "trainer": trainer, "trainer_epoch": spec.trainer_epoch, "sample_seed": spec.seed,
              "optimizer": optimizer, "policy": policy}
    if spec.agents > 1:
        config["layout"] = {"agents": spec.agents}
    return config


def _flags(spec: CaseSpec, rng: np.random.Generator, st: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(dones, truncateds)`` of ``spec``: random, then its ``done_pattern``; one draw per env group
    (``spec.agents`` rows) repeated to each of its agents."""
    groups = (st[0] // spec.agents, st[1])
    dones = np.repeat((rng.random(groups) < spec.done_prob).astype(np.float32), spec.agents, axis=0)
    if spec.done_pattern == "edges":
        dones[0, 0] = dones[1, 1] = dones[2, -1] = 1.0
        dones[3, 2:6] = 1.0
        dones[4, :] = 1.0
    truncateds = np.repeat(rng.random(groups) < 0.1, spec.agents, axis=0)
    truncateds = (truncateds & (dones == 0)).astype(np.float32)
    if spec.done_pattern == "resets":  # 8 rows: each reset position once, row 7 never resets
        if st[0] != 8:
            raise MettaError(f"case spec {spec.name!r}: done_pattern 'resets' is written for 8 segments, got {st[0]}")
        dones[0, 0] = dones[1, 3] = dones[2, -1] = 1.0
        dones[3, 2:6] = 1.0
        truncateds[0:4] = 0.0
        truncateds[4, 0] = truncateds[5, 4] = 1.0
        truncateds[6, 2:5] = 1.0
        dones[4:6, :2] = 0.0
        dones[6, 6] = 1.0
        dones[7] = truncateds[7] = 0.0
        truncateds *= 1.0 - dones
    return dones, truncateds


def _last_actions(rng: np.random.Generator, action: Mapping[str, Any], st: tuple[int, int], dones: np.ndarray,
                  truncateds: np.ndarray) -> np.ndarray:
    """Random previous actions, independent of ``actions`` (a runner must read the stored field, not
    shift the actions), not 0 where ``dones or truncateds`` (Metta keeps the last action across an
    episode end: a runner that zeroes it there, as a per-episode previous-action buffer does, gets
    other numbers). Discrete: ``[S, T]`` indices, ``1 .. n-1`` at the resets; continuous:
    ``[S, T, dim]`` floats."""
    if action["kind"] == "continuous":
        return rng.normal(0.0, 0.8, (*st, action["dim"])).astype(np.float32)
    reset = (dones + truncateds) > 0
    anywhere = rng.integers(0, action["n"], st)
    non_zero = rng.integers(1, action["n"], st)
    return np.where(reset, non_zero, anywhere).astype(np.int64)


def _spec_arrays(spec: CaseSpec, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Data and initial weights from ``spec.seed`` (NumPy's PCG64; stored log-probs/values off the policy's)."""
    rng = np.random.default_rng(spec.seed)
    policy = config["policy"]
    weights = {}
    for name, shape in parameter_shapes(policy).items():
        if name == "log_std":
            weights[name] = rng.normal(spec.log_std_mean, 0.2, shape).astype(np.float32)
        else:
            fan_in = shape[-1] if name.endswith("weight") else 1
            weights[name] = (rng.normal(0.0, 1.0, shape) / math.sqrt(fan_in)).astype(np.float32)
    n = reference.sizes(config["trainer"])
    st = (n["segments"], config["trainer"]["bptt_horizon"])
    obs = rng.normal(size=(*st, spec.obs_dim)).astype(np.float32)
    action = policy["action"]
    if action["kind"] == "discrete":
        actions = rng.integers(0, action["n"], st).astype(np.int64)
    else:
        actions = rng.normal(0.0, 0.8, (*st, action["dim"])).astype(np.float32)
    # random, non-zero stored states at every column: only column 0's may be read (SPEC §6)
    policy_inputs = {key: rng.normal(0.0, 0.5, (*st, spec.num_layers, spec.hidden_size)).astype(np.float32)
                     for key in reference.state_keys(policy)}
    dones, truncateds = _flags(spec, rng, st)
    if spec.condition_on_last_action:
        policy_inputs[LAST_ACTIONS_KEY] = _last_actions(rng, action, st, dones, truncateds)
    # in float64, rounded once to float32 below: a float32 matmul rounds differently on different
    # CPUs (BLAS kernels), and the stored data must be the same bytes on every machine
    params = {k: torch.from_numpy(v).double() for k, v in weights.items()}
    with torch.no_grad():
        if spec.kind == "mlp":
            flat_actions = torch.from_numpy(actions).reshape(st[0] * st[1], *actions.shape[2:])
            logprob, _, value = reference.policy_forward(
                params, policy, torch.from_numpy(obs).double().reshape(-1, spec.obs_dim),
                flat_actions if action["kind"] == "discrete" else flat_actions.double())
        else:
            rows = {k: torch.from_numpy(v) for k, v in {"env_obs": obs, "actions": actions, "dones": dones,
                                                        "truncateds": truncateds, **policy_inputs}.items()}
            rows = {k: v.double() if v.is_floating_point() else v for k, v in rows.items()}
            logprob, _, value = reference.recurrent_policy_forward(params, policy, rows)
    data = {
        "env_obs": obs,
        "actions": actions,
        "act_log_prob": (logprob.numpy().reshape(st) + rng.normal(0.0, spec.logprob_noise, st)).astype(np.float32),
        "values": (value.numpy().reshape(st) + rng.normal(0.0, spec.value_noise, st)).astype(np.float32),
        "rewards": rng.normal(size=st).astype(np.float32),
        "dones": dones,
        "truncateds": truncateds,
        **policy_inputs,
    }
    out = {f"data/{k}": v for k, v in data.items()}
    out.update({f"weights/{k}": v for k, v in weights.items()})
    return out


def _expected(config: Mapping[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run the reference; add the minibatch and expected arrays to ``arrays``; return the JSON block."""
    data = {f: torch.from_numpy(arrays[f"data/{f}"]) for f in (*DATA_FIELDS, *policy_data_keys(config["policy"]))}
    weights = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("weights/")}
    ppo, trainer = config["ppo"], config["trainer"]
    n = reference.sizes(trainer)
    first = reference.first_pass(ppo, data)
    idx, prio_w = reference.sample_segments(
        first, n["minibatch_segments"], ppo["prioritized_experience_replay"]["prio_alpha"],
        reference.beta(ppo, trainer, config["trainer_epoch"]), torch.Generator().manual_seed(config["sample_seed"]))
    arrays["minibatch/idx"] = idx.numpy().astype(np.int64)
    arrays["minibatch/prio_weights"] = prio_w.numpy().astype(np.float32)
    try:
        step = reference.one_step(config, data, weights, idx, prio_w)
        stats, params, counts = reference.training_phase(config, data, weights)
    except reference.SpecInputError as exc:
        return {"error": exc.match}
    for group, values in (("grads", step.grads), ("params_after_step", step.params_after_step),
                          ("params_after_phase", params)):
        arrays.update({f"expected/{group}/{k}": v for k, v in values.items()})
    return {"error": None, "terms": step.terms, "phase_stats": stats, "phase_counts": counts}


def _dump_json(doc: Mapping[str, Any]) -> str:
    """Indented, key-sorted JSON with lists of numbers (shapes, betas, widths) kept on one line."""
    text = json.dumps(doc, indent=1, sort_keys=True)
    text = re.sub(r"\[\s*([-+.\deE]+(?:,\s*[-+.\deE]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    return text + "\n"


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an ``.npz`` with fixed member timestamps, so equal arrays give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())
    path.write_bytes(buffer.getvalue())


def generate(out_dir: str | Path = CASES_DIR, names: list[str] | None = None) -> list[Path]:
    """Write the canonical cases (all of ``CASE_SPECS``, or ``names``) to ``out_dir``; return the JSON paths.

    Deterministic: the same code writes the same data and weights, byte for byte, on every machine
    (seeded NumPy, the policy's stored log-probs and values computed in float64), and on one machine
    byte-identical files (a seeded torch generator for the segment sampling, single-threaded torch).
    The expected values are float32 computations (SPEC): another CPU's BLAS kernels may round them
    differently, by about 1e-8 to 2e-7, far below the conformance tolerances.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = {s.name: s for s in CASE_SPECS}
    unknown = sorted(set(names or ()) - set(specs))
    if unknown:
        raise MettaError(f"unknown case name(s) {unknown}; canonical cases are {sorted(specs)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    written = []
    try:
        for name in names or list(specs):
            spec = specs[name]
            config = _spec_config(spec)
            arrays = _spec_arrays(spec, config)
            expected = _expected(config, arrays)
            doc = {"format": FORMAT, "name": spec.name, "description": spec.description, **config,
                   "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(arrays.items())},
                   "expected": expected}
            path = out_dir / f"{spec.name}.json"
            path.write_text(_dump_json(doc))
            write_npz(path.with_suffix(".npz"), arrays)
            written.append(path)
    finally:
        torch.set_num_threads(threads)
    return written


def quick_names() -> list[str]:
    """Names of the cases of the default (quick) run."""
    return [s.name for s in CASE_SPECS if s.quick]
