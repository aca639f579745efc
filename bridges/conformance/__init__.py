"""Conformance suite: canonical cases checked through the core, TorchRL and RLlib (issue 5).

- ``golden/``: the canonical cases themselves and their format (``README.md``), shipped as package data;
- ``cases``: the case file format, validated loading and the deterministic generator;
- ``reference``: the separate slow re-statement of SPEC §1-§4 and §6 that produces expected values;
- ``runners``: one small adapter per framework, each reporting a ``Measurement``;
- ``report``: comparison (max abs diff per quantity), table, JSON, Markdown and heatmap;
- ``native``: the native equivalence matrix (TorchRL ``ClipPPOLoss``, RLlib ``PPOTorchLearner``);
- ``cli``: ``metta-bridges conformance``.
"""
