"""Recurrent policies in the TorchRL bridge (SPEC §6): LSTMModule / GRUModule under MettaPPOLoss.

The TorchRL modules are built from the core's ``RecurrentActorCritic`` (same weights), so every
number is checked against the core's own training forward on the same rows: log-probs, entropy,
values, and the loss terms of ``ppo_minibatch_loss`` with their gradients.
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from tensordict import TensorDict
from torchrl.modules import set_recurrent_mode

from bridges.torchrl.layout import TIME_DIM_NAME
from bridges.torchrl.loss import MettaPPOLoss
from bridges.torchrl.recurrent import from_recurrent_actor_critic, prepare_rows, recurrent_modules
from metta_core.config import PPOConfig
from metta_core.errors import MettaError
from metta_core.ppo_math import ppo_minibatch_loss
from metta_core.recurrent_policy import RecurrentActorCritic

OBS, ACTIONS, HIDDEN = 4, 3, 8
B, T = 5, 7


def make_core(cell: str = "lstm", shared: bool = False, layers: int = 1, seed: int = 0,
              last_action: bool = False) -> RecurrentActorCritic:
    torch.manual_seed(seed)
    return RecurrentActorCritic(
        gym.spaces.Box(-1, 1, (OBS,)), gym.spaces.Discrete(ACTIONS), HIDDEN, num_layers=layers, cell=cell,
        shared_core=shared, condition_on_last_action=last_action,
    )


def make_rows(core: RecurrentActorCritic, resets: torch.Tensor, seed: int = 1) -> tuple[TensorDict, TensorDict]:
    """The same ``[B, T]`` rows in the core's layout and in TorchRL's (``is_init`` = ``dones or truncateds``).

    Stored states are random and nonzero everywhere, also at reset columns (SPEC §6 zeroes them there)."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(B, T, OBS, generator=g)
    action = torch.randint(0, ACTIONS, (B, T), generator=g)
    states = {k: torch.randn(B, T, *core.state_shape, generator=g) for k in core.state_keys}
    dones = (resets & (torch.rand(B, T, generator=g) < 0.5)).float()
    truncateds = (resets & (dones == 0)).float()
    core_rows = TensorDict({"env_obs": obs, "dones": dones, "truncateds": truncateds, **states}, [B, T])
    next_terminated = torch.zeros(B, T, 1, dtype=torch.bool)
    next_terminated[:, :-1, 0] = dones[:, 1:].bool()
    next_truncated = torch.zeros(B, T, 1, dtype=torch.bool)
    next_truncated[:, :-1, 0] = truncateds[:, 1:].bool()
    torchrl_rows = TensorDict(
        {
            "observation": obs, "action": action, "is_init": resets.unsqueeze(-1), **states,
            "action_log_prob": torch.randn(B, T, generator=g) * 0.1 - 1.1,
            "state_value": torch.randn(B, T, 1, generator=g),
            "next": {
                "reward": torch.randn(B, T, 1, generator=g), "terminated": next_terminated,
                "truncated": next_truncated, "done": next_terminated | next_truncated,
            },
        },
        [B, T],
    )
    if core.condition_on_last_action:  # any previous actions: the rows only have to carry them
        shape = (B, T, *core.action_shape)
        last = torch.randn(shape, generator=g) if core.continuous else torch.randint(0, ACTIONS, shape, generator=g)
        core_rows["last_actions"] = torchrl_rows["last_actions"] = last
    torchrl_rows.names = [None, TIME_DIM_NAME]
    return core_rows, torchrl_rows


RESETS = {
    "none": torch.zeros(B, T, dtype=torch.bool),
    "column_0": torch.zeros(B, T, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True),
    "mid_row": torch.tensor([[0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1],
                             [0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool),
    "every_column": torch.ones(B, T, dtype=torch.bool),
}


@pytest.mark.parametrize("resets", list(RESETS), ids=list(RESETS))
@pytest.mark.parametrize("cell,shared,layers,last_action", [
    ("lstm", False, 1, False), ("gru", False, 1, False), ("lstm", True, 1, False), ("gru", True, 2, False),
    ("lstm", False, 1, True), ("gru", True, 1, True),
])
def test_modules_reproduce_the_core_training_forward(cell, shared, layers, last_action, resets):
    core = make_core(cell, shared, layers, last_action=last_action)
    actor, critic = from_recurrent_actor_critic(core)
    core_rows, rows = make_rows(core, RESETS[resets])
    expected = core(core_rows.clone(), action=rows["action"])
    prepared = prepare_rows(rows, recurrent_modules(actor, critic), "test")
    with set_recurrent_mode(True):
        out = actor(prepared.clone())
        dist = actor.get_dist(prepared.clone())
        values = critic(out)["state_value"].squeeze(-1)
    torch.testing.assert_close(dist.log_prob(rows["action"]), expected["act_log_prob"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist.entropy(), expected["entropy"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values, expected["values"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shared,last_action", [(False, False), (True, False), (False, True)],
                         ids=["separate", "shared_backbone", "last_action"])
def test_loss_terms_and_gradients_equal_the_core(shared, last_action):
    core = make_core("lstm", shared, last_action=last_action)
    actor, critic = from_recurrent_actor_critic(core)
    core_rows, rows = make_rows(core, RESETS["mid_row"])
    cfg = PPOConfig()
    loss = MettaPPOLoss(actor, critic, cfg)
    out = loss(rows)
    params = list(core.parameters())  # the TorchRL modules hold these same tensors
    grads = torch.autograd.grad(out["loss_objective"] + out["loss_critic"] + out["loss_entropy"], params)

    # the core: the policy's training forward, then ppo_minibatch_loss on Metta's layout
    first_rows = rows.clone()
    with torch.no_grad():
        loss.first_pass(first_rows)
    expected = core(core_rows.clone(), action=rows["action"])
    rewards = torch.zeros(B, T)
    rewards[:, 1:] = rows["next", "reward"][:, :-1, 0]
    dones = core_rows["dones"].clone()
    dones[:, 0] = 0
    terms = ppo_minibatch_loss(
        cfg, old_logprob=rows["action_log_prob"], new_logprob=expected["act_log_prob"], entropy=expected["entropy"],
        new_values=expected["values"], values=rows["state_value"][..., 0], rewards=rewards, dones=dones,
        advantages=first_rows["advantage"][..., 0],
    )
    for name in ("policy_loss", "value_loss", "entropy"):
        torch.testing.assert_close(out[name], getattr(terms, name).detach(), rtol=1e-5, atol=1e-6)
    core_grads = torch.autograd.grad(terms.loss, params)
    assert all(g.abs().sum() > 0 for g in grads)
    for got, want in zip(grads, core_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("last_action", [False, True], ids=["plain", "last_action"])
def test_box_actions_get_the_cores_diagonal_normal(last_action):
    torch.manual_seed(0)
    core = RecurrentActorCritic(gym.spaces.Box(-1, 1, (OBS,)), gym.spaces.Box(-1, 1, (2,)), HIDDEN,
                                condition_on_last_action=last_action)
    actor, critic = from_recurrent_actor_critic(core)
    core_rows, rows = make_rows(core, RESETS["mid_row"])
    action = torch.randn(B, T, 2)
    expected = core(core_rows.clone(), action=action)
    with set_recurrent_mode(True):
        dist = actor.get_dist(prepare_rows(rows, recurrent_modules(actor), "test"))
    torch.testing.assert_close(dist.log_prob(action), expected["act_log_prob"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist.entropy(), expected["entropy"], rtol=1e-5, atol=1e-6)


# --- bad input: MettaError naming the key / setting and the fix ------------------------------------------


@pytest.fixture
def lstm_loss_and_rows():
    core = make_core("lstm")
    actor, critic = from_recurrent_actor_critic(core)
    _, rows = make_rows(core, RESETS["mid_row"])
    return MettaPPOLoss(actor, critic), rows


def test_missing_stored_state_is_refused(lstm_loss_and_rows):
    loss, rows = lstm_loss_and_rows
    with pytest.raises(MettaError, match=r"no stored state 'actor_lstm_c' of LSTMModule.*make_tensordict_primer"):
        loss(rows.exclude("actor_lstm_c"))


def test_missing_is_init_is_refused(lstm_loss_and_rows):
    loss, rows = lstm_loss_and_rows
    with pytest.raises(MettaError, match=r"no 'is_init' entry.*InitTracker"):
        loss(rows.exclude("is_init"))


def test_state_of_another_size_is_refused(lstm_loss_and_rows):
    loss, rows = lstm_loss_and_rows
    rows["critic_lstm_h"] = torch.zeros(B, T, 2, HIDDEN)
    with pytest.raises(MettaError, match=r"'critic_lstm_h' has shape \(5, 7, 2, 8\), expected .* \(5, 7, 1, 8\)"):
        loss(rows)


def test_rows_cut_with_a_horizon_that_does_not_follow_the_envs_are_refused(lstm_loss_and_rows):
    loss, rows = lstm_loss_and_rows
    traj = torch.arange(B).unsqueeze(1).expand(B, T).clone()
    traj[:, 2:] += 10 * rows["is_init"][:, 2:, 0].long().cumsum(1)  # new ids only where an episode starts
    rows["collector", "traj_ids"] = traj
    loss(rows)  # consistent: accepted
    traj[1, 4:] += 100  # row 1 switches trajectory at column 4 with no is_init there
    with pytest.raises(MettaError, match=r"row 1 jumps .* at column 4 .* horizon T=7 must divide"):
        loss(rows)


def test_last_action_conditioned_modules_without_last_actions_are_refused():
    core = make_core("lstm", last_action=True)
    actor, critic = from_recurrent_actor_critic(core)
    _, rows = make_rows(core, RESETS["mid_row"])
    with pytest.raises(MettaError, match=r"the actor network reads \['last_actions'\], missing from the input"):
        MettaPPOLoss(actor, critic)(rows.exclude("last_actions"))


# --- the collector pipeline and the CLI run -------------------------------------------------------------

TINY = dict(framework="torchrl", env="CartPoleNoVel-v1", num_envs=4, batch_size=128, bptt_horizon=16,
            minibatch_size=64, update_epochs=2, hidden_size=8, progress=False, target_return=None)


def test_run_starts_from_the_core_runs_weights(tmp_path):
    from bridges.torchrl.train import TorchRLRun
    from metta_core.run import CoreRun, TrainArgs

    args = TrainArgs(**{**TINY, "framework": "core"}, policy="lstm", out_dir=tmp_path, total_timesteps=128, seed=5)
    core = CoreRun(args)
    run = TorchRLRun(TrainArgs(**TINY, policy="lstm", out_dir=tmp_path, total_timesteps=128, seed=5))
    ours = [p.detach() for p in run.policy.parameters()]
    theirs = [p.detach() for p in core.policy.parameters()]
    assert len(ours) == len(theirs)
    assert all(any(q.shape == p.shape and torch.equal(q, p) for q in theirs) for p in ours)
    run.close()


def test_collected_rows_store_metta_states():
    """Stored states: zero where is_init (the primer resets them) and, with the carried state zeroed
    between batches (Metta's rollout start), zero in every env's first column of the next batch."""
    from bridges.torchrl.train import TorchRLRun
    from metta_core.run import TrainArgs

    run = TorchRLRun(TrainArgs(**TINY, policy="lstm", total_timesteps=10_000, seed=0))
    first = next(run._batches)
    carried = next(run._batches)  # the collector's own behaviour: the state carries into the batch
    keys = ["actor_lstm_h", "actor_lstm_c", "critic_lstm_h", "critic_lstm_c"]
    assert all(carried[k][:, 0].abs().sum() > 0 for k in keys)
    run.iteration()  # collects and zeroes the carried state, as every iteration does
    zeroed = next(run._batches)
    for data in (first, carried, zeroed):
        init = data["is_init"][..., 0]
        # is_init is Metta's reset flag: the previous step of the env ended (terminated or truncated)
        assert torch.equal(init[:, 1:], data["next", "done"][:, :-1, 0])
        assert all(data[k][init].abs().sum() == 0 for k in keys)
        assert all(data[k][~init].abs().sum() > 0 for k in keys)
    assert all(zeroed[k][:, 0].abs().sum() == 0 for k in keys)
    run.close()


def test_recurrent_resume_continues_exactly_and_another_policy_is_refused(tmp_path):
    from bridges.torchrl.train import TorchRLRun, train
    from metta_core.run import TrainArgs

    args = TrainArgs(**TINY, policy="gru", out_dir=tmp_path, total_timesteps=10_000, seed=3)
    straight = TorchRLRun(args)
    straight.iteration()
    straight.save(tmp_path / "ckpt.pt")
    rows = [straight.iteration(), straight.iteration()]
    expected = [p.detach().clone() for p in straight.loss.parameters()]
    straight.close()
    resumed = TorchRLRun(args)
    resumed.load(tmp_path / "ckpt.pt", trust=True)
    again = [resumed.iteration(), resumed.iteration()]
    resumed.close()
    for a, b in zip(rows, again):
        a.pop("steps_per_second"), b.pop("steps_per_second")
        assert a == b
    assert all(torch.equal(p, q) for p, q in zip(expected, resumed.loss.parameters()))
    with pytest.raises(MettaError, match="checkpoint was made with"):
        train(TrainArgs(**TINY, policy="lstm", out_dir=tmp_path, total_timesteps=512, resume=tmp_path / "ckpt.pt"))


@pytest.mark.slow
def test_lstm_run_on_cartpole_improves(tmp_path):
    from bridges.torchrl.train import train
    from metta_core.run import TrainArgs

    # ~25 s on an idle 2-core machine (measured: mean return 20.2 after the first batch, 42.6 at the end)
    args = TrainArgs(framework="torchrl", env="CartPole-v1", policy="lstm", num_envs=8, batch_size=512,
                     bptt_horizon=16, minibatch_size=128, update_epochs=4, hidden_size=32, total_timesteps=12_288,
                     progress=False, target_return=None, seed=0, out_dir=tmp_path)
    train(args)
    import json
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["episode_return_mean"] > 1.5 * rows[0]["episode_return_mean"], rows


def test_native_comparison_trains_the_recurrent_network_on_whole_rows(tmp_path):
    import json
    import math

    from bridges.torchrl.train import train
    from metta_core.run import TrainArgs

    summary = train(TrainArgs(**TINY, policy="lstm", out_dir=tmp_path, total_timesteps=256, compare_native=True))
    rows = [json.loads(line) for line in (tmp_path / "native" / "metrics.jsonl").read_text().splitlines()]
    assert summary["native"]["framework"] == "torchrl-native" and len(rows) == 2
    assert math.isfinite(rows[-1]["loss_objective"]) and math.isfinite(rows[-1]["loss_critic"])


def test_shared_backbone_collects_and_trains_in_a_collector_loop():
    """One LSTMModule feeding both heads: the collector records the value from the actor's features,
    the phase trains on whole rows, the shared cell gets gradients from both losses."""
    import math

    from tensordict.nn import TensorDictSequential
    from torchrl.collectors import Collector

    import metta_core.cartpole_no_velocity  # noqa: F401  (registers CartPoleNoVel-v1)
    from bridges.torchrl import MettaPPOPhase, MettaSegmentSampler
    from bridges.torchrl.recurrent import add_recurrent_transforms, zero_carried_state
    from bridges.torchrl.train import make_env

    env = make_env("CartPoleNoVel-v1", 4, 0)
    torch.manual_seed(0)
    venv = env.base_env._env
    core = RecurrentActorCritic(venv.single_observation_space, venv.single_action_space, HIDDEN, shared_core=True)
    actor, critic = from_recurrent_actor_critic(core, env.full_action_spec)
    modules = recurrent_modules(actor, critic)
    assert len(modules) == 1
    add_recurrent_transforms(env, actor, critic)
    collector = Collector(env, TensorDictSequential(actor, critic), frames_per_batch=128, total_frames=-1)
    loss = MettaPPOLoss(actor, critic)
    phase = MettaPPOPhase(loss, torch.optim.Adam(loss.parameters(), lr=1e-3),
                          MettaSegmentSampler(loss, minibatch_segments=4, total_timesteps=1024))
    before = modules[0].lstm.weight_hh_l0.detach().clone()
    data = next(iter(collector))
    zero_carried_state(collector, modules)
    assert {"lstm_h", "lstm_c", "is_init", "state_value"} <= set(data.keys())
    stats = phase(data.reshape(-1, 16), epoch=0)
    assert math.isfinite(stats["policy_loss"]) and math.isfinite(stats["value_loss"])
    assert not torch.equal(before, core.trunks[0].core.weight_hh_l0)  # the core's own cell trained
    collector.shutdown()


def test_recurrent_policy_with_mettagrid_is_refused_by_name(tmp_path):
    pytest.importorskip("mettagrid")
    from bridges.torchrl.train import TorchRLRun
    from metta_core.run import TrainArgs

    args = TrainArgs(framework="torchrl", env="mettagrid:arena-8", policy="lstm", num_envs=1, batch_size=256,
                     bptt_horizon=32, minibatch_size=256, progress=False, out_dir=tmp_path)
    with pytest.raises(MettaError, match="--policy lstm: the torchrl bridge trains --env mettagrid:arena-8 with the grid"):
        TorchRLRun(args)


def test_last_action_transform_follows_metta_across_episode_ends_and_batches():
    """``last_actions[t]`` is the env's action of step ``t - 1``: zero before the first step, kept
    across episode ends (is_init) and into the collector's next batch (Metta does not reset it)."""
    from tensordict.nn import TensorDictSequential
    from torchrl.collectors import Collector

    import metta_core.cartpole_no_velocity  # noqa: F401  (registers CartPoleNoVel-v1)
    from bridges.torchrl.last_action import LastAction
    from bridges.torchrl.recurrent import add_recurrent_transforms
    from bridges.torchrl.train import make_env

    env = make_env("CartPoleNoVel-v1", 3, 0)
    torch.manual_seed(0)
    venv = env.base_env._env
    core = RecurrentActorCritic(venv.single_observation_space, venv.single_action_space, HIDDEN,
                                condition_on_last_action=True)
    actor, critic = from_recurrent_actor_critic(core, env.full_action_spec)
    add_recurrent_transforms(env, actor, critic)
    assert sum(isinstance(t, LastAction) for t in env.transform) == 1
    collector = Collector(env, TensorDictSequential(actor, critic), frames_per_batch=3 * 40, total_frames=-1)
    batches = iter(collector)
    first, second = next(batches), next(batches)
    collector.shutdown()
    assert bool(first["is_init"].any()) or bool(second["is_init"].any())  # an episode ended on the way
    actions = torch.cat([first["action"], second["action"]], dim=1)
    last = torch.cat([first["last_actions"], second["last_actions"]], dim=1)
    assert torch.equal(last[:, 0], torch.zeros(3, dtype=last.dtype))
    assert torch.equal(last[:, 1:], actions[:, :-1])
