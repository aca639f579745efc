"""Two learners (gloo, no Ray) give the single learner's numbers on the same data (SPEC §3, §4.8).

Each rank holds half of a batch's segments, computes the Metta loss on it (the advantage
normalization all-reduces ``[sum, sum of squares, count]``) and averages its gradients with the
other rank (what DDP does). The single learner holds the whole batch in a one-process group, so
it normalizes with the same (population) statistics: SPEC §3's distributed formula. A learner
outside ``torch.distributed`` (``num_learners`` 0 or 1) uses the Bessel-corrected std instead,
so its normalized advantages are larger by ``sqrt(n / (n - 1))`` (checked at the end).
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

SEGMENTS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(rank: int, world: int, port: int, out: str) -> None:
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.columns import Columns

    from bridges.rllib.loss import metta_loss_terms
    from tests.rllib.conftest import HORIZON, build, layout_batch, make_config

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        learner = build(make_config())
        batch = layout_batch(learner, seed=7, segments=SEGMENTS)
        batch[Columns.LOSS_MASK] = torch.ones_like(batch[Columns.LOSS_MASK])  # equal valid counts per rank
        rows = SEGMENTS // world * HORIZON
        shard = {c: v[rank * rows:(rank + 1) * rows] for c, v in batch.items()}
        module = learner.module[DEFAULT_MODULE_ID].unwrapped()
        fwd = module.forward_train(shard)
        terms = metta_loss_terms(module, shard, fwd, learner._metta_ppo, HORIZON)
        terms.loss.backward()
        grads = [p.grad.detach().clone() for p in module.parameters()]
        for g in grads:  # DDP's average
            torch.distributed.all_reduce(g)
            g /= world
        np.savez(f"{out}/w{world}r{rank}.npz", advantages=terms.advantages.detach().reshape(-1).numpy(),
                 *[g.numpy() for g in grads])
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_learners_normalize_and_step_like_one(tmp_path):
    for world in (1, 2):
        mp.start_processes(_shard, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                           start_method="spawn")
    one = np.load(tmp_path / "w1r0.npz")
    two = [np.load(tmp_path / f"w2r{r}.npz") for r in range(2)]
    np.testing.assert_allclose(np.concatenate([t["advantages"] for t in two]), one["advantages"], rtol=0, atol=2e-6)
    grads = sorted(k for k in one.files if k.startswith("arr_"))
    assert grads
    for k in grads:
        for t in two:
            np.testing.assert_allclose(t[k], one[k], rtol=0, atol=2e-6, err_msg=k)

    # global statistics, not per rank: over all slots, population mean 0 and std 1 (SPEC §3)
    adv = np.concatenate([t["advantages"] for t in two]).astype(np.float64)
    assert abs(adv.mean()) < 1e-6 and abs(adv.std() - 1.0) < 1e-5
    assert any(abs(t["advantages"].astype(np.float64).std() - 1.0) > 1e-3 for t in two)  # a rank alone is not
