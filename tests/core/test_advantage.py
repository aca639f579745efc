"""compute_advantage against the slow reference loop (SPEC §2), on random and adversarial inputs."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metta_core import advantage as adv_mod
from metta_core.advantage import compute_advantage
from metta_core.errors import MettaError
from metta_core.kernels.scan import advantage_scan, reverse_linear_recurrence
from tests.reference import advantage_loop, gae_loop

BACKENDS = ["compiled", "scan"]


def run(backend, values, rewards, dones, ratio, **kw):
    if backend == "compiled":
        return compute_advantage(values, rewards, dones, ratio, **kw)
    return advantage_scan(values, rewards, dones.float(), ratio, kw["gamma"], kw["gae_lambda"],
                          kw.get("rho_clip", 1.0), kw.get("c_clip", 1.0))


@st.composite
def advantage_case(draw):
    segments = draw(st.integers(1, 6))
    horizon = draw(st.integers(1, 40))
    shape = (segments, horizon)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g) * draw(st.sampled_from([0.0, 1.0, 100.0]))
    rewards = torch.randn(shape, generator=g) * draw(st.sampled_from([0.0, 1.0, 10.0]))
    done_kind = draw(st.sampled_from(["none", "all", "random", "runs"]))
    if done_kind == "none":
        dones = torch.zeros(shape)
    elif done_kind == "all":
        dones = torch.ones(shape)
    elif done_kind == "random":
        dones = (torch.rand(shape, generator=g) < 0.2).float()
    else:
        dones = torch.zeros(shape)
        dones[:, horizon // 3 : 2 * horizon // 3 + 1] = 1.0
    ratio_kind = draw(st.sampled_from(["one", "zero", "huge", "spread"]))
    ratio = {
        "one": torch.ones(shape),
        "zero": torch.zeros(shape),
        "huge": torch.full(shape, 1e4),
        "spread": torch.exp(torch.randn(shape, generator=g) * 2),
    }[ratio_kind]
    kw = dict(
        gamma=draw(st.sampled_from([0.0, 0.5, 0.977, 1.0])),
        gae_lambda=draw(st.sampled_from([0.0, 0.891477, 1.0])),
        rho_clip=draw(st.sampled_from([0.3, 1.0, 2.5, 1e6])),
        c_clip=draw(st.sampled_from([0.3, 1.0, 2.5])),  # c compounds over time: 1e4**40 overflows float32
    )
    return values, rewards, dones, ratio, kw


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None)
@given(case=advantage_case())
def test_matches_reference_loop(backend, case):
    values, rewards, dones, ratio, kw = case
    expected = advantage_loop(values, rewards, dones, ratio, **kw)
    got = run(backend, values, rewards, dones, ratio, **kw).numpy()
    scale = max(1.0, float(np.abs(expected).max()))
    if backend == "compiled":  # same float32 operations in the same order as the loop
        np.testing.assert_array_equal(got, expected)
    else:  # the scan sums in another order: a few ulp per doubling step
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * scale)


def test_compiled_kernel_is_bit_identical_to_the_sequential_loop():
    g = torch.Generator().manual_seed(0)
    shape = (37, 19)  # not a multiple of the kernel's 4-row blocks
    values, rewards = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    dones = (torch.rand(shape, generator=g) < 0.1).float()
    ratio = torch.exp(torch.randn(shape, generator=g))
    kw = dict(gamma=0.977, gae_lambda=0.891477, rho_clip=0.9, c_clip=1.2)
    got = compute_advantage(values, rewards, dones, ratio, **kw).numpy()
    np.testing.assert_array_equal(got, advantage_loop(values, rewards, dones, ratio, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_one_is_gae_on_shifted_rewards(backend):
    g = torch.Generator().manual_seed(1)
    shape = (5, 12)
    values, rewards = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    dones = (torch.rand(shape, generator=g) < 0.25).float()
    got = run(backend, values, rewards, dones, torch.ones(shape), gamma=0.9, gae_lambda=0.8, rho_clip=1.0, c_clip=3.0)
    # the framework layout: reward and terminal flag at the index of the action that caused them
    next_rewards, next_dones = rewards[:, 1:].numpy(), dones[:, 1:].numpy()
    expected = gae_loop(values.numpy(), np.pad(next_rewards, ((0, 0), (0, 1))), np.pad(next_dones, ((0, 0), (0, 1))), 0.9, 0.8)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_hand_computed_two_steps():
    values = torch.tensor([[1.0, 2.0, 3.0]])
    rewards = torch.tensor([[9.0, 0.5, 1.0]])  # rewards[:, 0] is never read
    dones = torch.tensor([[1.0, 0.0, 1.0]])  # dones[:, 0] is never read
    ratio = torch.tensor([[2.0, 0.5, 7.0]])
    a = compute_advantage(values, rewards, dones, ratio, gamma=0.5, gae_lambda=0.5, rho_clip=1.0, c_clip=1.0)
    # t=1: nnt = 1 - dones[2] = 0, rho = min(0.5, 1) -> 0.5 * (1.0 + 0 - 2.0) = -0.5
    # t=0: nnt = 1, rho = c = min(2, 1) = 1: delta = 0.5 + 0.5*2 - 1 = 0.5; A = 0.5 + 0.25 * 1 * -0.5
    torch.testing.assert_close(a, torch.tensor([[0.375, -0.5, 0.0]]))


def test_returns_new_tensor_without_grad():
    values = torch.randn(3, 4, requires_grad=True)
    ratio = torch.ones(3, 4, requires_grad=True)
    a = compute_advantage(values, torch.randn(3, 4), torch.zeros(3, 4), ratio, gamma=0.9, gae_lambda=0.9)
    assert not a.requires_grad and a.grad_fn is None
    assert a.data_ptr() not in {values.data_ptr(), ratio.data_ptr()}


def test_bool_dones_equal_float_dones():
    g = torch.Generator().manual_seed(2)
    values, rewards = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    dones = torch.rand(4, 8, generator=g) < 0.3
    kw = dict(gamma=0.9, gae_lambda=0.9)
    torch.testing.assert_close(
        compute_advantage(values, rewards, dones, torch.ones(4, 8), **kw),
        compute_advantage(values, rewards, dones.float(), torch.ones(4, 8), **kw),
    )


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    big = [torch.randn(8, 20, generator=g) for _ in range(2)]
    values, rewards = big[0][:, ::2], big[1][::2].T[:10, :8].T.contiguous().T.T  # strided views
    values = values[:8, :10]
    rewards = torch.randn(10, 8, generator=g).T
    dones, ratio = torch.zeros(8, 10), torch.ones(8, 10)
    got = compute_advantage(values, rewards, dones, ratio, gamma=0.9, gae_lambda=0.7)
    np.testing.assert_array_equal(got.numpy(), advantage_loop(values, rewards, dones, ratio, 0.9, 0.7))


def test_torch_backend_env_switch(monkeypatch):
    monkeypatch.setenv("METTA_ADVANTAGE_BACKEND", "torch")
    g = torch.Generator().manual_seed(4)
    values, rewards = torch.randn(6, 33, generator=g), torch.randn(6, 33, generator=g)
    got = compute_advantage(values, rewards, torch.zeros(6, 33), torch.ones(6, 33), gamma=0.99, gae_lambda=0.95)
    np.testing.assert_allclose(got.numpy(), advantage_loop(values, rewards, torch.zeros(6, 33), torch.ones(6, 33), 0.99, 0.95), atol=1e-5)


def test_fallback_warns_without_numba(monkeypatch):
    monkeypatch.setattr(adv_mod, "_advantage_cpu", None)
    monkeypatch.setattr(adv_mod, "_warned_fallback", False)
    values = torch.randn(2, 5)
    with pytest.warns(RuntimeWarning, match="numba is unavailable"):
        got = compute_advantage(values, torch.randn(2, 5), torch.zeros(2, 5), torch.ones(2, 5), gamma=0.9, gae_lambda=0.9)
    assert got.shape == (2, 5)


def test_reverse_linear_recurrence_matches_loop():
    g = torch.Generator().manual_seed(5)
    x, k = torch.randn(3, 17, generator=g, dtype=torch.float64), torch.rand(3, 17, generator=g, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for t in range(16, -1, -1):
        expected[:, t] = x[:, t] + (k[:, t] * expected[:, t + 1] if t < 16 else 0)
    torch.testing.assert_close(reverse_linear_recurrence(x, k), expected)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda v: {"values": v[0]}, r"values must be \[segments, horizon\]"),
        (lambda v: {"rewards": torch.zeros(3, 5)}, r"rewards has shape \(3, 5\)"),
        (lambda v: {"values": v.double()}, r"values must be float32, got torch.float64"),
        (lambda v: {"importance_sampling_ratio": v.half()}, "importance_sampling_ratio must be float32"),
        (lambda v: {"dones": torch.zeros(2, 4, dtype=torch.int32)}, "dones must be bool or float"),
        (lambda v: {"rewards": [[0.0]]}, "rewards must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    v = torch.zeros(2, 4)
    kwargs = {"values": v, "rewards": v, "dones": v, "importance_sampling_ratio": torch.ones(2, 4)}
    kwargs.update(change(v))
    with pytest.raises(MettaError, match=match):
        compute_advantage(**kwargs, gamma=0.9, gae_lambda=0.9)
