"""Every ``metta-bridges train`` setting is honoured or refused by every run, as docs/settings.md says.

The table in docs/settings.md is the registry: a ``TrainArgs``, ``PPOConfig`` or ``RLlibSettings``
field without a row (or a row without a cell for every run) fails here, and every cell that says
"refused" must have a case in ``REFUSALS`` that raises the ``MettaError`` at run construction.
Behaviour tests below cover the settings this audit made honoured (``--ppo schedule.*`` in TorchRL,
RLlib's native ``vf_coef`` and ``clip_vloss``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.run import CoreRun, TrainArgs, checkpoint_header, flag, phase_learning_rate, preflight

TABLE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
COLUMNS = ("core", "torchrl", "rllib", "torchrl native", "rllib native")
VERDICTS = ("yes", "refused", "n/a", "unused", "as torchrl", "as rllib", "cpu only", "below", "off", "lstm/gru")
"""How a cell may start: honoured (``yes``, ``as ...``, a condition such as ``off: refused``), refused,
not applicable, or ``unused`` (``l2_*``: accepted and unused, as in Metta)."""
GRID = "mettagrid:arena-8"
TINY = dict(num_envs=2, batch_size=256, bptt_horizon=16, minibatch_size=128, update_epochs=1, hidden_size=16,
            progress=False, target_return=None)


def table() -> dict[str, dict[str, str]]:
    """docs/settings.md's rows: ``{setting: {column: cell}}``."""
    lines = [line for line in TABLE.read_text().splitlines() if line.startswith("| `")]
    rows = {}
    for line in lines:
        setting, *cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"docs/settings.md row {setting}: {len(cells)} cells, expected {COLUMNS}"
        rows[setting.strip("`")] = dict(zip(COLUMNS, cells))
    return rows


def ppo_leaves(model=PPOConfig, prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        nested = info.annotation if isinstance(info.annotation, type) and hasattr(info.annotation, "model_fields") else None
        out.extend(ppo_leaves(nested, f"{prefix}{name}.") if nested else [prefix + name])
    return out


def rllib_settings_fields() -> list[str]:
    from bridges.rllib.settings import RLlibSettings

    return [f.name for f in dataclasses.fields(RLlibSettings)]


def test_every_setting_has_a_row_with_a_verdict_for_every_run():
    rows = table()
    expected = [flag(f.name) for f in dataclasses.fields(TrainArgs) if f.name != "ppo"]
    expected += [flag(name) for name in rllib_settings_fields()]
    expected += sorted({f"--ppo {leaf}" if "." not in leaf else f"--ppo {leaf.split('.')[0]}.*" for leaf in ppo_leaves()})
    missing = [name for name in expected if name not in rows]
    assert not missing, f"docs/settings.md has no row for {missing}: say what every run does with it"
    assert not set(rows) - set(expected), f"rows for settings that do not exist: {set(rows) - set(expected)}"
    for setting, cells in rows.items():
        for column, cell in cells.items():
            assert cell.startswith(VERDICTS), f"{setting} / {column}: {cell!r} starts with none of {VERDICTS}"
            assert "ignored" not in cell.lower(), f"{setting} / {column}: {cell!r}"


# -- the refusals ---------------------------------------------------------------------------------------

def validate(**kw):
    TrainArgs(**kw).validate()


def torchrl_run(native=False, **kw):
    from bridges.torchrl.train import TorchRLRun

    TorchRLRun(TrainArgs(framework="torchrl", **{**TINY, **kw}), native=native).close()


def rllib_config(settings=None, **kw):
    from bridges.rllib.train import build_config

    build_config(TrainArgs(framework="rllib", **{**TINY, **kw}), settings)


def rllib_native(**kw):
    from bridges.rllib.train import build_native_config

    build_native_config(TrainArgs(framework="rllib", **{**TINY, **kw}))


def cli_settings(framework, *argv):
    from bridges.cli import build_parser, parse_framework_settings

    parse_framework_settings(build_parser().parse_args(["train", "--framework", framework, *argv]), framework)


def rllib_resume_untrusted(tmp_path):
    from bridges.rllib.train import HEADER_FILE, verify_rllib_checkpoint

    args = TrainArgs(framework="rllib", resume=tmp_path)
    (tmp_path / HEADER_FILE).write_text(json.dumps(checkpoint_header("rllib", args)))
    verify_rllib_checkpoint(tmp_path, args)


def runners(n):
    from bridges.rllib.settings import RLlibSettings

    return RLlibSettings(num_env_runners=n)


NATIVE_PPO = "not read by {}.*drop --compare-native"
TORCHRL_NATIVE = NATIVE_PPO.format(r"TorchRL's ClipPPOLoss \+ GAE \(--compare-native\)")
RLLIB_NATIVE = NATIVE_PPO.format(r"RLlib's own PPO \(--compare-native\)")
SCHEDULE = {"schedule.start_epoch": 1}

REFUSALS = {
    ("--env", "torchrl"): (
        lambda tmp: preflight(TrainArgs(framework="torchrl", env="Pendulum-v1", out_dir=tmp)),
        r"--env 'Pendulum-v1' has action space Box.*--framework torchrl needs Discrete"),
    ("--env", "torchrl native"): (
        lambda tmp: torchrl_run(native=True, env=GRID), "--compare-native is not available for --env mettagrid"),
    ("--env", "rllib native"): (
        lambda tmp: rllib_native(env=GRID), "--compare-native with --env mettagrid:arena-8.*drop --compare-native"),
    ("--num-envs", "rllib"): (
        lambda tmp: rllib_config(runners(3), num_envs=8),
        r"--num-envs 8 with --num-env-runners 3.*would step 6.*multiple of --num-env-runners, e.g. 6 or 9"),
    ("--max-minibatch-size", "rllib native"): (
        lambda tmp: rllib_native(max_minibatch_size=64),
        "--max-minibatch-size 64 < --minibatch-size 128 with --compare-native: RLlib's own PPO has no gradient"),
    ("--hidden-size", "core"): (
        lambda tmp: validate(framework="core", env=GRID, hidden_size=32),
        "--hidden-size 32 with --env mettagrid:arena-8: the MettaGrid policy is the core's GridCNN.*drop --hidden-size"),
    ("--hidden-size", "torchrl"): (
        lambda tmp: validate(framework="torchrl", env=GRID, hidden_size=32), "--hidden-size 32 with --env mettagrid"),
    ("--hidden-size", "rllib"): (
        lambda tmp: validate(framework="rllib", env=GRID, hidden_size=32), "--hidden-size 32 with --env mettagrid"),
    ("--policy", "torchrl"): (
        lambda tmp: torchrl_run(env=GRID, policy="lstm", hidden_size=64), "--policy lstm: .*use --policy mlp"),
    ("--policy", "rllib"): (
        lambda tmp: rllib_config(env=GRID, policy="gru", hidden_size=64), "--policy gru with --env mettagrid.*use --policy mlp"),
    ("--device", "torchrl"): (
        lambda tmp: validate(framework="torchrl", device="meta"), "--device 'meta': the torchrl framework runs on CPU"),
    ("--device", "rllib"): (
        lambda tmp: validate(framework="rllib", device="meta"),
        "--device 'meta': the rllib framework places its learners itself.*use --device cpu"),
    ("--compare-native", "core"): (
        lambda tmp: validate(framework="core", compare_native=True), "--compare-native compares with TorchRL's or RLlib's"),
    ("--trust-checkpoint", "rllib"): (rllib_resume_untrusted, "RLlib restores its checkpoints by unpickling.*--trust-checkpoint"),
    ("--ppo vf_clip_coef", "rllib native"): (lambda tmp: rllib_native(ppo={"vf_clip_coef": 0.2}), "--ppo vf_clip_coef=0.2: " + RLLIB_NATIVE),
    ("--ppo norm_adv", "rllib native"): (lambda tmp: rllib_native(ppo={"norm_adv": False}), "--ppo norm_adv=False: " + RLLIB_NATIVE),
    ("--ppo target_kl", "torchrl native"): (lambda tmp: torchrl_run(native=True, ppo={"target_kl": 0.02}), "--ppo target_kl=0.02: " + TORCHRL_NATIVE),
    ("--ppo target_kl", "rllib native"): (lambda tmp: rllib_native(ppo={"target_kl": 0.02}), "--ppo target_kl=0.02: " + RLLIB_NATIVE),
    ("--ppo vtrace.*", "torchrl native"): (
        lambda tmp: torchrl_run(native=True, ppo={"vtrace": {"rho_clip": 0.8}}), "--ppo vtrace.rho_clip=0.8: " + TORCHRL_NATIVE),
    ("--ppo vtrace.*", "rllib native"): (lambda tmp: rllib_native(ppo={"vtrace.c_clip": 2.0}), "--ppo vtrace.c_clip=2.0: " + RLLIB_NATIVE),
    ("--ppo prioritized_experience_replay.*", "torchrl native"): (
        lambda tmp: torchrl_run(native=True, ppo={"prioritized_experience_replay.prio_alpha": 0.6}),
        "--ppo prioritized_experience_replay.prio_alpha=0.6: " + TORCHRL_NATIVE),
    ("--ppo prioritized_experience_replay.*", "rllib native"): (
        lambda tmp: rllib_native(ppo={"prioritized_experience_replay.prio_beta0": 0.4}),
        "--ppo prioritized_experience_replay.prio_beta0=0.4: " + RLLIB_NATIVE),
    ("--ppo schedule.*", "rllib"): (
        lambda tmp: rllib_config(ppo=SCHEDULE),
        "--ppo schedule.start_epoch=1: not read by RLlib's MettaPPOLearner .*--framework core or torchrl"),
    ("--ppo schedule.*", "torchrl native"): (lambda tmp: torchrl_run(native=True, ppo=SCHEDULE), "--ppo schedule.start_epoch=1: " + TORCHRL_NATIVE),
    ("--ppo schedule.*", "rllib native"): (lambda tmp: rllib_native(ppo=SCHEDULE), "--ppo schedule.start_epoch=1: " + RLLIB_NATIVE),
    **{(flag(name), framework): (
        lambda tmp, framework=framework, name=name: cli_settings(framework, flag(name), *(["x:1"] if name == "address" else ["1"] if name.startswith("num") else [])),
        f"{flag(name)}: rllib setting\\(s\\), not read by --framework {framework}; drop them or use --framework rllib")
       for name in ("address", "num_learners", "num_env_runners") for framework in ("core", "torchrl")},
    **{("--restart-failed-env-runners", framework): (
        lambda tmp, framework=framework: cli_settings(framework, "--no-restart-failed-env-runners"),
        f"--restart-failed-env-runners: rllib setting\\(s\\), not read by --framework {framework}")
       for framework in ("core", "torchrl")},
}
"""``(row, column)`` of docs/settings.md -> (a call that builds that run with the setting, the error it must raise)."""


def test_every_refused_cell_has_a_refusal_case_and_every_case_a_cell():
    refused = {(setting, column) for setting, cells in table().items() for column, cell in cells.items()
               if "refused" in cell}
    assert refused == set(REFUSALS), (f"refused in docs/settings.md but no case here: {refused - set(REFUSALS)}; "
                                      f"a case here but not refused in the table: {set(REFUSALS) - refused}")


@pytest.mark.parametrize("cell", sorted(REFUSALS), ids=lambda cell: f"{cell[0]}|{cell[1]}")
def test_refused_at_construction_with_a_message_naming_the_flag_and_the_fix(cell, tmp_path):
    build, message = REFUSALS[cell]
    with pytest.raises(MettaError, match=message):
        build(tmp_path)


# -- behaviour of the settings made honoured --------------------------------------------------------------

def trained_per_iteration(run, iterations: int) -> list[bool]:
    """Whether each iteration changed the policy's parameters."""
    params = run.policy.parameters
    changed = []
    for _ in range(iterations):
        before = [p.detach().clone() for p in params()]
        run.iteration()
        changed.append(any(not torch.equal(a, b) for a, b in zip(before, params())))
    run.close()
    return changed


@pytest.mark.parametrize("schedule, expected", [
    ({"schedule.start_epoch": 1, "schedule.end_epoch": 3}, [False, True, True, False]),
    ({"schedule": {"cycle_length": 2, "active_in_cycle": [2]}}, [False, True, False, True]),
])
def test_torchrl_trains_only_in_the_epochs_of_the_loss_schedule_as_the_core_does(schedule, expected, tmp_path):
    from bridges.torchrl.train import TorchRLRun

    args = dict(**TINY, out_dir=tmp_path, ppo=schedule)
    assert trained_per_iteration(CoreRun(TrainArgs(framework="core", **args)), 4) == expected
    assert trained_per_iteration(TorchRLRun(TrainArgs(framework="torchrl", **args)), 4) == expected


def test_torchrl_outside_the_schedule_runs_no_phase(tmp_path):
    """An inactive epoch (the core: a zero loss, no gradient) draws no minibatch and steps no optimizer."""
    from bridges.torchrl.train import TorchRLRun

    run = TorchRLRun(TrainArgs(framework="torchrl", **TINY, out_dir=tmp_path, ppo={"schedule.start_epoch": 1}))
    generator = run.generator.get_state()
    first = run.iteration()
    assert torch.equal(run.generator.get_state(), generator) and not run.optimizer.state_dict()["state"]
    second = run.iteration()
    run.close()
    assert "policy_loss" not in first and "policy_loss" in second
    assert not torch.equal(run.generator.get_state(), generator)
    assert int(run.optimizer.state_dict()["state"][0]["step"]) == 2  # the 2 minibatches of epoch 1 only


def test_torchrl_native_refusal_comes_before_the_metta_run(tmp_path):
    from bridges.torchrl.train import train

    with pytest.raises(MettaError, match="--ppo target_kl=0.02: " + TORCHRL_NATIVE):
        train(TrainArgs(framework="torchrl", **TINY, total_timesteps=256, out_dir=tmp_path, compare_native=True,
                        ppo={"target_kl": 0.02}))
    assert not list(tmp_path.iterdir())  # no metrics: the Metta run never started


def test_rllib_refusals_come_before_ray_starts(tmp_path, monkeypatch):
    import bridges.rllib.train as rllib_train

    monkeypatch.setattr(rllib_train, "join_ray", lambda address: pytest.fail("Ray started before the refusal"))
    with pytest.raises(MettaError, match="--ppo target_kl=0.02: " + RLLIB_NATIVE):
        rllib_train.train(TrainArgs(framework="rllib", **TINY, out_dir=tmp_path, compare_native=True,
                                    ppo={"target_kl": 0.02}))
    with pytest.raises(MettaError, match="--ppo schedule.start_epoch=1: not read by RLlib's MettaPPOLearner"):
        rllib_train.train(TrainArgs(framework="rllib", **TINY, out_dir=tmp_path, ppo=SCHEDULE))


@pytest.mark.parametrize("clip_vloss", [True, False])
def test_rllib_native_weighs_the_value_loss_as_metta_and_unclips_it_with_clip_vloss_off(clip_vloss):
    """RLlib's ``vf_loss`` is the mean squared error (no 1/2): ``vf_loss_coeff = vf_coef / 2``, as
    TorchRL's native ``critic_coeff`` and docs/native_equivalence.md's mapping."""
    from ray.rllib.algorithms.ppo import PPOConfig as RLlibPPOConfig

    from bridges.rllib.train import build_native_config

    config = build_native_config(TrainArgs(framework="rllib", **TINY, ppo={"vf_coef": 0.8, "clip_vloss": clip_vloss}))
    assert config.vf_loss_coeff == pytest.approx(0.4)
    assert config.vf_clip_param == (RLlibPPOConfig().vf_clip_param if clip_vloss else float("inf"))


def test_rllib_env_runners_share_num_envs_exactly():
    from bridges.rllib.train import build_config

    config = build_config(TrainArgs(framework="rllib", **{**TINY, "num_envs": 6}), runners(3))
    assert config.num_envs_per_env_runner * config.num_env_runners == 6


def test_hidden_size_still_sizes_a_recurrent_policy_on_mettagrid_in_the_core():
    validate(framework="core", env=GRID, policy="lstm", hidden_size=32)  # refused only with the fixed GridCNN


def test_refused_ppo_settings_are_those_changed_from_their_defaults():
    """Defaults a native run cannot express are listed (docs), not refused: the native run still trains."""
    rllib_native(ppo={"norm_adv": True, "target_kl": None, "vtrace.rho_clip": 1.0})
    with pytest.raises(MettaError, match=re.escape("--ppo target_kl=0.1, vtrace.rho_clip=0.5")):
        rllib_native(ppo={"target_kl": 0.1, "vtrace.rho_clip": 0.5})


def test_rllib_learner_refuses_a_schedule_put_into_the_config_after_it_was_built():
    from bridges.rllib import metta_ppo_config, metta_settings

    config = metta_ppo_config("CartPole-v1")
    config.learner_config_dict["metta"]["ppo"]["schedule"]["end_epoch"] = 2
    with pytest.raises(MettaError, match=r"PPOConfig.schedule \({'end_epoch': 2}\): MettaPPOLearner"):
        metta_settings(config)


def test_a_schedule_cycle_is_given_as_one_value_or_as_dotted_halves():
    """The overrides are validated together, so the pair cycle_length / active_in_cycle can be given as
    two dotted keys; one half alone is refused naming what was given and the rule."""
    cycle = {"cycle_length": 2, "active_in_cycle": [2]}
    dotted = {f"schedule.{k}": v for k, v in cycle.items()}
    for ppo in ({"schedule": cycle}, dotted):
        assert TrainArgs(ppo=ppo).ppo_config().schedule.model_dump(include=set(cycle)) == cycle
    with pytest.raises(MettaError, match=r"--ppo schedule.cycle_length=2: cycle_length and active_in_cycle must be set "
                                         r"together \(PPOConfig.schedule: "):
        validate(ppo={"schedule.cycle_length": 2})


def test_rllib_anneals_a_mettagrid_rate_over_the_agent_step_budget():
    """RLlib's lr schedule reads env steps; a MettaGrid budget counts agent-steps, so the schedule ends at
    total_timesteps / agents env steps and the rate after S env steps is the core's after S * agents."""
    pytest.importorskip("mettagrid", reason="needs the mettagrid extra")
    from bridges.rllib.mettagrid_env import MettaGridMultiAgentEnv
    from bridges.rllib.train import build_config
    from ray.rllib.utils.schedules.scheduler import Scheduler

    args = TrainArgs(framework="rllib", env=GRID, anneal_lr=True, learning_rate=0.002, total_timesteps=64_000)
    probe = MettaGridMultiAgentEnv({"env": GRID})
    agents = len(probe.possible_agents)
    probe.close()
    assert agents > 1
    schedule = Scheduler(build_config(args).lr)
    env_steps = 1000
    assert schedule.update(timestep=env_steps) == pytest.approx(phase_learning_rate(args, env_steps * agents))


@pytest.mark.parametrize("learners", [0, 1, 2])
def test_rllib_anneals_beta_over_the_runs_iterations_with_any_number_of_learners(learners):
    """N learners train ``batch_size`` steps each per iteration: beta reaches 1 at the run's last
    iteration, total_timesteps / (N * batch_size), as the core's does at total_timesteps / batch_size."""
    from bridges.rllib.settings import RLlibSettings
    from bridges.rllib.train import build_config
    from metta_core.ppo_math import anneal_beta

    args = TrainArgs(framework="rllib", batch_size=256, bptt_horizon=16, minibatch_size=128, total_timesteps=8192,
                     ppo={"prioritized_experience_replay.prio_alpha": 1.0})
    metta = build_config(args, RLlibSettings(num_learners=learners)).learner_config_dict["metta"]
    iterations = args.total_timesteps // (max(1, learners) * args.batch_size)
    assert anneal_beta(iterations, total_timesteps=metta["total_timesteps"], batch_size=args.batch_size,
                       prio_alpha=1.0, prio_beta0=0.6) == pytest.approx(1.0)


def test_rllib_metta_ppo_config_refuses_a_schedule_for_library_users():
    from bridges.rllib import metta_ppo_config

    with pytest.raises(MettaError, match=r"PPOConfig.schedule \({'start_epoch': 1}\): MettaPPOLearner .*core\|torchrl"):
        metta_ppo_config("CartPole-v1", **SCHEDULE)
