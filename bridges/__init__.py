"""Adapters that run metta_core's PPO inside other RL frameworks (``bridges.rllib``, ``bridges.torchrl``)."""
