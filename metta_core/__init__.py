"""metta_core: Metta's PPO semantics, framework-neutral (imports neither Ray nor TorchRL).

- ``advantage``: ``compute_advantage`` (V-trace-clipped GAE, SPEC §2), ``normalize_advantage`` (§3)
- ``ppo_math``: ``anneal_beta``, ``prioritized_sample``, ``ppo_minibatch_loss`` (§4) and its pieces
  (``importance_ratio``, ``clipped_surrogate_pg_loss``, ``clipped_value_loss``, ``entropy_loss``,
  ``approx_kl``, ``clip_fraction``): the pure math, imported from here only
- ``config``: ``PPOConfig``, ``VTraceConfig``, ``PrioritizedExperienceReplayConfig``, ``TrainerConfig``
- ``loss``, ``ppo``, ``experience``, ``loop``: the ``Loss`` lifecycle, ``PPO``, ``Experience``,
  ``CoreTrainingLoop`` (§5)
- ``recurrent``, ``recurrent_policy``: the stored-state BPTT rule (``unroll``, §6) and
  ``RecurrentActorCritic`` (LSTM/GRU)
- ``policy``, ``gym_env``, ``cartpole_no_velocity``, ``run``, ``runlog``: the ``Policy`` contract,
  env adapter, ``CartPoleNoVel-v1`` and the training run behind ``metta-bridges train --framework core``
- ``envs``, ``cnn_policy``: training environments by name (gymnasium ids, ``mettagrid:<preset>``
  arenas with agents as rows, ``envs.mettagrid``) and ``GridCNN`` for their grid observations

Nothing is imported here: ``import metta_core.advantage`` loads only what it needs.
"""
