"""Metta's PPO inside TorchRL: a ``LossModule``, a value estimator and a segment sampler.

    loss = MettaPPOLoss(actor, critic)                   # PPOConfig defaults
    sampler = MettaSegmentSampler(loss, minibatch_segments=8, total_timesteps=500_000,
                                  generator=torch.Generator().manual_seed(0))
    for data in collector:                               # [B, T] batches
        for mb_idx, mb in sampler.phase(data, epoch=i):
            sum(v for k, v in loss(mb).items() if k.startswith("loss_")).backward()
"""

from bridges.torchrl.estimator import MettaAdvantage
from bridges.torchrl.loss import MettaPPOLoss
from bridges.torchrl.sampler import MettaSegmentSampler

__all__ = ["MettaAdvantage", "MettaPPOLoss", "MettaSegmentSampler"]
