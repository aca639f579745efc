"""compute_advantage and the torch scan against the slow reference loop (SPEC §2), on random and
adversarial inputs, over devices (CPU; CUDA when present) and dtypes.

Dtypes: ``compute_advantage`` takes float32 only (the SPEC's numbers are float32, and the compiled
CPU kernel is float32) and refuses anything else with a message saying how to convert; the torch
scan under it is dtype-generic and is tested in float32 and float64.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metta_core import advantage as adv_mod
from metta_core.advantage import compute_advantage
from metta_core.errors import MettaError
from metta_core.kernels.scan import advantage_scan, reverse_linear_recurrence
from tests.devices import FLOAT_DTYPES, get_default_devices
from tests.reference import advantage_loop, gae_loop

BACKENDS = ["compute_advantage", "scan"]
"""``compute_advantage`` dispatches (compiled kernel on CPU, the scan elsewhere); ``scan`` calls the scan."""
DEVICES = pytest.mark.parametrize("device", get_default_devices())
DTYPES = pytest.mark.parametrize("dtype", FLOAT_DTYPES)


def run(backend, device, values, rewards, dones, ratio, **kw):
    """The backend on ``device``; the result back on the CPU as NumPy."""
    values, rewards, dones, ratio = (x.to(device) for x in (values, rewards, dones, ratio))
    if backend == "compute_advantage":
        out = compute_advantage(values, rewards, dones, ratio, **kw)
    else:
        out = advantage_scan(values, rewards, dones.to(values.dtype), ratio, kw["gamma"], kw["gae_lambda"],
                             kw.get("rho_clip", 1.0), kw.get("c_clip", 1.0))
    assert out.device.type == device.type and out.dtype == values.dtype
    return out.cpu().numpy()


def bit_identical(backend, device) -> bool:
    """Only the compiled CPU kernel runs the loop's float32 operations in the loop's order."""
    return backend == "compute_advantage" and device.type == "cpu"


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


@DEVICES
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None)
@given(case=advantage_case())
def test_matches_reference_loop(device, backend, case):
    values, rewards, dones, ratio, kw = case
    expected = advantage_loop(values, rewards, dones, ratio, **kw)
    got = run(backend, device, values, rewards, dones, ratio, **kw)
    scale = max(1.0, float(np.abs(expected).max()))
    if bit_identical(backend, device):  # same float32 operations in the same order as the loop
        np.testing.assert_array_equal(got, expected)
    else:  # the scan sums in another order: a few ulp per doubling step
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * scale)


@DEVICES
@settings(max_examples=60, deadline=None)
@given(case=advantage_case())
def test_scan_in_float64_matches_the_float64_loop(device, case):
    values, rewards, dones, ratio, kw = (*(x.double() for x in case[:4]), case[4])
    expected = advantage_loop(values, rewards, dones, ratio, **kw, dtype=np.float64)
    got = run("scan", device, values, rewards, dones, ratio, **kw)
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-11 * max(1.0, float(np.abs(expected).max())))


def test_compiled_kernel_is_bit_identical_to_the_sequential_loop():
    g = torch.Generator().manual_seed(0)
    shape = (37, 19)  # not a multiple of the kernel's 4-row blocks
    values, rewards = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    dones = (torch.rand(shape, generator=g) < 0.1).float()
    ratio = torch.exp(torch.randn(shape, generator=g))
    kw = dict(gamma=0.977, gae_lambda=0.891477, rho_clip=0.9, c_clip=1.2)
    got = compute_advantage(values, rewards, dones, ratio, **kw).numpy()
    np.testing.assert_array_equal(got, advantage_loop(values, rewards, dones, ratio, **kw))


@DEVICES
@pytest.mark.parametrize("backend, dtype", [("compute_advantage", torch.float32), ("scan", torch.float32),
                                            ("scan", torch.float64)], ids=["compute_advantage-float32",
                                                                           "scan-float32", "scan-float64"])
def test_ratio_one_is_gae_on_shifted_rewards(device, backend, dtype):
    g = torch.Generator().manual_seed(1)
    shape = (5, 12)
    values, rewards = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
    dones = (torch.rand(shape, generator=g) < 0.25).to(dtype)
    ones = torch.ones(shape, dtype=dtype)
    got = run(backend, device, values, rewards, dones, ones, gamma=0.9, gae_lambda=0.8, rho_clip=1.0, c_clip=3.0)
    # the framework layout: reward and terminal flag at the index of the action that caused them
    next_rewards, next_dones = rewards[:, 1:].numpy(), dones[:, 1:].numpy()
    expected = gae_loop(values.numpy(), np.pad(next_rewards, ((0, 0), (0, 1))), np.pad(next_dones, ((0, 0), (0, 1))), 0.9, 0.8)
    np.testing.assert_allclose(got, expected, atol=1e-5 if dtype == torch.float32 else 1e-12)


@DEVICES
@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_two_steps(device, backend):
    values = torch.tensor([[1.0, 2.0, 3.0]])
    rewards = torch.tensor([[9.0, 0.5, 1.0]])  # rewards[:, 0] is never read
    dones = torch.tensor([[1.0, 0.0, 1.0]])  # dones[:, 0] is never read
    ratio = torch.tensor([[2.0, 0.5, 7.0]])
    a = run(backend, device, values, rewards, dones, ratio, gamma=0.5, gae_lambda=0.5, rho_clip=1.0, c_clip=1.0)
    # t=1: nnt = 1 - dones[2] = 0, rho = min(0.5, 1) -> 0.5 * (1.0 + 0 - 2.0) = -0.5
    # t=0: nnt = 1, rho = c = min(2, 1) = 1: delta = 0.5 + 0.5*2 - 1 = 0.5; A = 0.5 + 0.25 * 1 * -0.5
    np.testing.assert_allclose(a, [[0.375, -0.5, 0.0]], rtol=1e-6)


@DEVICES
def test_returns_new_tensor_without_grad(device):
    values = torch.randn(3, 4, device=device, requires_grad=True)
    ratio = torch.ones(3, 4, device=device, requires_grad=True)
    rewards, dones = torch.randn(3, 4, device=device), torch.zeros(3, 4, device=device)
    a = compute_advantage(values, rewards, dones, ratio, gamma=0.9, gae_lambda=0.9)
    assert not a.requires_grad and a.grad_fn is None and a.device.type == device.type
    assert a.data_ptr() not in {values.data_ptr(), ratio.data_ptr()}


def test_each_call_returns_its_own_writable_tensor():
    """The output is freshly allocated per call (never a buffer kept between calls)."""
    values, rewards = torch.randn(8, 16), torch.randn(8, 16)
    dones, ratio = torch.zeros(8, 16), torch.ones(8, 16)
    first = compute_advantage(values, rewards, dones, ratio, gamma=0.9, gae_lambda=0.9)
    second = compute_advantage(values, rewards, dones, ratio, gamma=0.9, gae_lambda=0.9)
    assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()
    before = second.clone()
    first += 1.0
    assert torch.equal(second, before) and first.is_contiguous() and first.dtype == torch.float32


@DEVICES
def test_bool_dones_equal_float_dones(device):
    g = torch.Generator().manual_seed(2)
    values, rewards = torch.randn(4, 8, generator=g).to(device), torch.randn(4, 8, generator=g).to(device)
    dones = (torch.rand(4, 8, generator=g) < 0.3).to(device)
    ones = torch.ones(4, 8, device=device)
    kw = dict(gamma=0.9, gae_lambda=0.9)
    assert torch.equal(
        compute_advantage(values, rewards, dones, ones, **kw),
        compute_advantage(values, rewards, dones.float(), ones, **kw),
    )


@DEVICES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["values", "rewards", "importance_sampling_ratio"])
def test_other_dtypes_are_refused(device, dtype, name):
    kwargs = {k: torch.zeros(2, 4, device=device) for k in ("values", "rewards", "dones")}
    kwargs["importance_sampling_ratio"] = torch.ones(2, 4, device=device)
    kwargs[name] = kwargs[name].to(dtype)
    with pytest.raises(MettaError, match=rf"{name} must be float32, got {dtype}; convert with \.float\(\)"):
        compute_advantage(**kwargs, gamma=0.9, gae_lambda=0.9)


@DEVICES
def test_inputs_on_different_devices_are_refused(device):
    other = torch.device("meta")  # a second device that every machine has
    kwargs = {k: torch.zeros(2, 4, device=device) for k in ("values", "rewards", "dones", "importance_sampling_ratio")}
    kwargs["rewards"] = kwargs["rewards"].to(other)
    with pytest.raises(MettaError, match=f"rewards is on {other} but values is on {device}"):
        compute_advantage(**kwargs, gamma=0.9, gae_lambda=0.9)


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


@DEVICES
@DTYPES
@pytest.mark.parametrize("n", [1, 2, 16, 17])
def test_reverse_linear_recurrence_matches_loop(device, dtype, n):
    g = torch.Generator().manual_seed(5)
    x, k = torch.randn(3, n, generator=g, dtype=dtype), torch.rand(3, n, generator=g, dtype=dtype)
    expected = torch.zeros_like(x)
    for t in range(n - 1, -1, -1):
        expected[:, t] = x[:, t] + (k[:, t] * expected[:, t + 1] if t < n - 1 else 0)
    got = reverse_linear_recurrence(x.to(device), k.to(device))
    assert got.device.type == device.type and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), expected)


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


# --- thread policy of the compiled kernel (metta_core.kernels.cpu.kernel_threads) ---

from metta_core.kernels import cpu as cpu_kernel  # noqa: E402

BIG = (1031, 67)  # above PARALLEL_MIN_ELEMENTS and not a multiple of the 4-row blocks


def _big_case(seed=6):
    g = torch.Generator().manual_seed(seed)
    values, rewards = torch.randn(BIG, generator=g), torch.randn(BIG, generator=g)
    dones = (torch.rand(BIG, generator=g) < 0.05).float()
    ratio = torch.exp(torch.randn(BIG, generator=g))
    return values, rewards, dones, ratio


@pytest.mark.parametrize(
    "segments, horizon, budget, pool, expected",
    [
        (64, 32, 8, 8, 1),  # small: one thread whatever the budget
        (1024, 63, 8, 8, 1),  # one element short of the crossover
        (1024, 64, 8, 8, 8),
        (1024, 64, 1, 8, 1),  # never more than the caller's budget
        (1024, 64, 2, 8, 2),
        (1024, 64, 8, 3, 3),  # nor than numba's pool
        (8, 16384, 8, 8, 2),  # nor than 4-row blocks
    ],
)
def test_kernel_threads_policy(segments, horizon, budget, pool, expected):
    assert segments * horizon >= cpu_kernel.PARALLEL_MIN_ELEMENTS or expected == 1
    assert cpu_kernel.kernel_threads(segments, horizon, budget, pool) == expected


@pytest.mark.parametrize("n_threads", [1, 2, 3, 7])
def test_serial_and_parallel_entry_points_are_bit_identical_to_the_loop(n_threads):
    import numba

    values, rewards, dones, ratio = _big_case()
    kw = dict(gamma=0.977, gae_lambda=0.891477, rho_clip=0.9, c_clip=1.2)
    expected = advantage_loop(values, rewards, dones, ratio, **kw)
    arrays = [x.numpy() for x in (values, rewards, dones, ratio)]
    scalars = [np.float32(x) for x in kw.values()]
    serial = np.empty_like(arrays[0])
    cpu_kernel.advantage_serial(*arrays, *scalars, serial)
    np.testing.assert_array_equal(serial, expected)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
    try:  # n_threads is the number of chunks; more chunks than threads must not change a bit
        parallel = np.empty_like(arrays[0])
        cpu_kernel.advantage_parallel(*arrays, *scalars, parallel, n_threads)
    finally:
        numba.set_num_threads(previous)
    np.testing.assert_array_equal(parallel, expected)


@pytest.mark.parametrize("budget, shape", [(1, BIG), (2, BIG), (2, (64, 32))])
def test_dispatch_follows_the_torch_budget_and_restores_settings(monkeypatch, budget, shape):
    import numba

    calls = []
    serial, parallel = cpu_kernel.advantage_serial, cpu_kernel.advantage_parallel
    monkeypatch.setattr(cpu_kernel, "advantage_serial", lambda *a: (calls.append(1), serial(*a)))
    monkeypatch.setattr(
        cpu_kernel, "advantage_parallel",
        lambda *a: (calls.append((a[-1], numba.get_num_threads())), parallel(*a)),
    )
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(budget)
    try:
        g = torch.Generator().manual_seed(7)
        values = torch.randn(shape, generator=g)
        dones, ratio = torch.zeros(shape), torch.ones(shape)
        got = compute_advantage(values, values, dones, ratio, gamma=0.9, gae_lambda=0.8)
        assert torch.get_num_threads() == budget  # torch's setting is never changed
    finally:
        torch.set_num_threads(torch_threads)
    np.testing.assert_array_equal(got.numpy(), advantage_loop(values, values, dones, ratio, 0.9, 0.8))
    expected = cpu_kernel.kernel_threads(*shape, budget, numba.config.NUMBA_NUM_THREADS)
    assert calls == ([1] if expected == 1 else [(expected, expected)])
    assert numba.get_num_threads() == numba_threads  # numba's mask is restored


def test_starting_numba_threads_keeps_the_callers_torch_budget():
    """numba's OpenMP layer sets OpenMP's thread count to its pool size when it starts; run in a
    fresh process where the pool (3) is larger than the budget (2) so the reset would show."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from metta_core.advantage import compute_advantage\n"
        "x = torch.randn(2048, 64)\n"
        "compute_advantage(x, x, torch.zeros_like(x), torch.ones_like(x), gamma=0.9, gae_lambda=0.9)\n"
        "import numba\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "3"]


# --- value checks (inside the compiled kernel on CPU, one torch reduction otherwise) ---

_BAD_VALUES = [
    ("values", float("nan"), r"values holds 1 non-finite value\(s\)"),
    ("values", float("inf"), r"values holds 1 non-finite value\(s\)"),
    ("rewards", float("-inf"), r"rewards holds 1 non-finite value\(s\)"),
    ("importance_sampling_ratio", float("nan"), r"importance_sampling_ratio holds 1 non-finite value\(s\)"),
    ("importance_sampling_ratio", -0.5, r"importance_sampling_ratio holds 1 negative value\(s\)"),
    ("dones", 0.5, r"dones holds 1 value\(s\) that are not terminal flags"),
    ("dones", float("nan"), r"dones holds 1 value\(s\) that are not terminal flags"),
]


@pytest.mark.parametrize("backend", ["compiled", "torch"])
@pytest.mark.parametrize("shape", [(5, 7), BIG, (3, 1)])  # serial kernel, parallel kernel, horizon 1
@pytest.mark.parametrize("key, bad, match", _BAD_VALUES)
def test_bad_values_are_refused_wherever_they_are(monkeypatch, backend, shape, key, bad, match):
    """Every element is checked, also those the formula never reads (rewards and dones at t=0,
    the ratio at t=H-1), on both the serial and the parallel kernel path."""
    if backend == "torch":
        monkeypatch.setenv("METTA_ADVANTAGE_BACKEND", "torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # BIG then runs the parallel entry point
    try:
        for row, col in ((0, 0), (shape[0] - 1, shape[1] - 1), (shape[0] // 2, shape[1] // 2)):
            inputs = {"values": torch.zeros(shape), "rewards": torch.zeros(shape), "dones": torch.zeros(shape),
                      "importance_sampling_ratio": torch.ones(shape)}
            inputs[key][row, col] = bad
            with pytest.raises(MettaError, match=match):
                compute_advantage(**inputs, gamma=0.9, gae_lambda=0.9)
            compute_advantage(**inputs, gamma=0.9, gae_lambda=0.9, check_values=False)  # no check asked: no error
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("backend", ["compiled", "torch"])
def test_overflowing_result_is_refused(monkeypatch, backend):
    if backend == "torch":
        monkeypatch.setenv("METTA_ADVANTAGE_BACKEND", "torch")
    values = torch.zeros(6, 40)
    rewards = torch.full((6, 40), 3e38)
    rewards[:, :20] = 0  # finite advantages in the second half, overflow only where rewards add up
    ratio = torch.ones(6, 40)
    with pytest.raises(MettaError, match="the advantage overflows float32 although every input is finite"):
        compute_advantage(values, rewards, torch.zeros(6, 40), ratio, gamma=1.0, gae_lambda=1.0)


def test_float64_dones_are_checked_before_the_float32_copy():
    """1 + 1e-12 rounds to 1.0 in float32: the flag check must see the float64 value."""
    dones = torch.zeros(4, 5, dtype=torch.float64)
    dones[1, 2] = 1 + 1e-12
    with pytest.raises(MettaError, match=r"dones holds 1 value\(s\) that are not terminal flags"):
        compute_advantage(torch.zeros(4, 5), torch.zeros(4, 5), dones, torch.ones(4, 5), gamma=0.9, gae_lambda=0.9)


def test_kernel_check_is_zero_for_valid_inputs_and_counts_bad_rows():
    values, rewards, dones, ratio = _big_case()
    arrays = [x.numpy().copy() for x in (values, rewards, dones, ratio)]
    scalars = [np.float32(x) for x in (0.977, 0.891477, 1.0, 1.0)]
    out = np.empty_like(arrays[0])
    assert cpu_kernel.advantage_serial(*arrays, *scalars, out) == 0
    assert cpu_kernel.advantage_parallel(*arrays, *scalars, out, 2) == 0
    arrays[1][7, 0] = np.nan  # a column the formula never reads
    arrays[3][1030, 66] = -1.0  # last row (the 3-row tail block), last column
    assert cpu_kernel.advantage_serial(*arrays, *scalars, out) > 0
    assert cpu_kernel.advantage_parallel(*arrays, *scalars, out, 2) > 0
