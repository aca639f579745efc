"""Metta's PPO inside TorchRL: a ``LossModule``, a value estimator, a segment sampler and the phase.

    loss = MettaPPOLoss(actor, critic)                   # PPOConfig defaults
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3, eps=1e-12)
    sampler = MettaSegmentSampler(loss, minibatch_segments=8, total_timesteps=500_000, update_epochs=4,
                                  generator=torch.Generator().manual_seed(0))
    train_phase = MettaPPOPhase(loss, optimizer, sampler)
    for epoch, data in enumerate(collector):
        stats = train_phase(data.reshape(-1, 32), epoch=epoch)   # [B, T] rows; clip, step, target KL

``MettaPPOPhase`` runs Metta's whole training phase (SPEC §4); calling ``loss(minibatch)`` yourself
gives the ``loss_*`` terms of one minibatch, and the rest (clipping, accumulation, the target-KL
stop) is then yours to do.

Multi-agent batches: TorchRL's group layout (``("agents", key)`` entries of batch ``[B, T, agents]``)
is folded into rows ``b * agents + a`` by the loss and the sampler (``as_rows``); MettaGrid runs as
``bridges.torchrl.mettagrid.MettaGridEnv``, a batch row per agent (``docs/torchrl_conventions.md``).

``MettaPPOLoss`` keeps ``ClipPPOLoss``'s API conventions (arguments, keys, composite one-head actors,
shared trunks, the keyword call, TorchRL's value estimators); the ones Metta's semantics refuse
raise an error naming the reason: ``docs/torchrl_conventions.md``. Recurrent actors and critics
(``LSTMModule`` / ``GRUModule``, SPEC §6) train as they are; ``bridges.torchrl.recurrent`` maps
TorchRL's ``is_init`` and primer states to Metta's rule and builds the core's recurrent network.
"""

from bridges.torchrl.estimator import MettaAdvantage
from bridges.torchrl.layout import as_rows
from bridges.torchrl.loss import MettaPPOLoss
from bridges.torchrl.phase import MettaPPOPhase
from bridges.torchrl.sampler import MettaSegmentSampler

__all__ = ["as_rows", "MettaAdvantage", "MettaPPOLoss", "MettaPPOPhase", "MettaSegmentSampler"]
