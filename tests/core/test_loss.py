"""The Loss lifecycle: scheduling, tracker, state_dict round trip and strict loading."""

from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict

from metta_core.config import LossSchedule, PPOConfig
from metta_core.errors import MettaError
from metta_core.loss import Loss


class CountingLoss(Loss):
    def __init__(self, schedule=None):
        cfg = PPOConfig(schedule=schedule or LossSchedule())
        super().__init__(policy=SimpleNamespace(), trainer_cfg=None, env=None, device="cpu", instance_name="count", loss_config=cfg)
        self.calls = 0
        self.weight = torch.tensor([1.0, 2.0])
        self.register_state_attr("calls", "weight")

    def run_train(self, shared, context, mb_idx):
        self.calls += 1
        self.phase_stats.track({"value": float(self.calls)})
        return torch.tensor(5.0), shared, False


def test_train_outside_schedule_returns_zero_loss():
    loss = CountingLoss(LossSchedule(start_epoch=1, end_epoch=3))
    shared = TensorDict({}, batch_size=[])
    results = [loss.train(shared, SimpleNamespace(epoch=e), 0)[0].item() for e in range(5)]
    assert results == [0.0, 5.0, 5.0, 0.0, 0.0] and loss.calls == 2


def test_missing_context_is_explained():
    with pytest.raises(MettaError, match="attach_context"):
        CountingLoss().train(TensorDict({}, batch_size=[]), None, 0)


def test_stats_are_means_and_tracker_clears():
    loss = CountingLoss()
    ctx = SimpleNamespace(epoch=0)
    for _ in range(3):
        loss.train(TensorDict({}, batch_size=[]), ctx, 0)
    assert loss.stats() == {"value": 2.0}
    loss.zero_loss_tracker()
    assert loss.stats() == {}


def test_state_dict_round_trip():
    a = CountingLoss()
    ctx = SimpleNamespace(epoch=0)
    for _ in range(2):
        a.train(TensorDict({}, batch_size=[]), ctx, 0)
    a.weight += 1
    state = a.state_dict()
    assert list(state) == ["loss_tracker", "calls", "weight"]
    b = CountingLoss()
    assert b.load_state_dict(state) == ([], [])
    assert b.calls == 2 and torch.equal(b.weight, torch.tensor([2.0, 3.0])) and b.stats() == {"value": 1.5}
    state["weight"][0] = 100.0  # the snapshot is a copy
    assert a.weight[0] == 2.0


def test_strict_load_lists_missing_and_unexpected():
    state = CountingLoss().state_dict()
    del state["calls"]
    state["bogus"] = 1
    with pytest.raises(MettaError, match=r"missing keys \['calls'\], unexpected keys \['bogus'\]"):
        CountingLoss().load_state_dict(state)
    b = CountingLoss()
    assert b.load_state_dict(state, strict=False) == (["calls"], ["bogus"])


def test_rollout_start_resets_policy_memory():
    resets = []
    loss = CountingLoss()
    loss.policy = SimpleNamespace(reset_memory=lambda: resets.append(1))
    loss.on_rollout_start()
    assert resets == [1]
