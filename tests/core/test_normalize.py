"""normalize_advantage: both SPEC §3 paths, the mask, and two gloo processes; the single-process path
over devices (CPU; CUDA when present) and dtypes (it is dtype-generic)."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metta_core.advantage import normalize_advantage
from metta_core.errors import MettaError
from tests.devices import FLOAT_DTYPES, get_default_devices
from tests.reference import normalize_global, normalize_single

DEVICES = pytest.mark.parametrize("device", get_default_devices())
DTYPES = pytest.mark.parametrize("dtype", FLOAT_DTYPES)
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}


@DEVICES
@DTYPES
def test_single_process_matches_reference(device, dtype):
    adv = torch.randn(7, 9, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3 + 1
    out = normalize_advantage(adv.to(device))
    assert out.device.type == device.type and out.dtype == dtype
    np.testing.assert_allclose(out.cpu().numpy(), normalize_single(adv.numpy()), atol=ATOL[dtype])


def test_disabled_is_identity():
    adv = torch.randn(3, 4)
    assert normalize_advantage(adv, enabled=False) is adv


def test_flags_are_keyword_only():
    with pytest.raises(TypeError, match="positional argument"):
        normalize_advantage(torch.randn(3, 4), False)


@DEVICES
@DTYPES
def test_mask_uses_valid_elements_only_and_zeroes_the_rest(device, dtype):
    adv = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2:, 4:] = False
    out = normalize_advantage(adv.to(device), mask=mask.to(device)).cpu()
    expected = normalize_single(adv[mask].numpy())
    np.testing.assert_allclose(out[mask].numpy(), expected, atol=ATOL[dtype])
    assert torch.all(out[~mask] == 0)


@DEVICES
def test_too_few_elements_is_an_error_not_nan(device):
    with pytest.raises(MettaError, match="at least 2 elements, got 1"):
        normalize_advantage(torch.ones(1, 1, device=device))


def test_bad_mask():
    with pytest.raises(MettaError, match="mask must be a bool tensor of shape"):
        normalize_advantage(torch.ones(2, 2), mask=torch.ones(2, 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, shards, masks, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = normalize_advantage(shards[rank], mask=masks[rank])
        out[rank] = result
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_global_result():
    g = torch.Generator().manual_seed(2)
    shards = [torch.randn(3, 5, generator=g) * 2, torch.randn(6, 5, generator=g) + 4]
    masks = [torch.ones(3, 5, dtype=torch.bool), torch.ones(6, 5, dtype=torch.bool)]
    masks[1][4:, 2:] = False  # padding on one rank
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(_free_port(), shards, masks, out), nprocs=2, start_method="spawn", join=True)
        results = [out[0], out[1]]
    expected = normalize_global([shards[0][masks[0]].numpy(), shards[1][masks[1]].numpy()])
    for rank in range(2):
        np.testing.assert_allclose(results[rank][masks[rank]].numpy(), expected[rank], atol=1e-5)
        assert torch.all(results[rank][~masks[rank]] == 0)
    # and it differs from normalizing each shard alone (population std, global mean)
    alone = normalize_single(shards[0].numpy())
    assert np.abs(results[0].numpy() - alone).max() > 0.1
