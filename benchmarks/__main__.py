"""Every benchmark in one command; each prints its table and writes ``<out>/<name>.json``.

    python -m benchmarks [--busy] [--out runs/benchmarks] [--only advantage overhead ...] [--sample-efficiency]

advantage          the advantage kernel vs a C -O3 loop, TorchRL GAE, RLlib value targets
trainer            the core trainer vs a plain CleanRL-style PyTorch loop (rollout and phase)
overhead           bridge loss/update cost vs the core and vs the native PPO losses
throughput         end-to-end env steps/s, Metta vs native, in TorchRL and RLlib
memory             peak RSS of a training phase and RSS growth over 50 phases
recurrent          the SPEC §6 unroll vs nn.LSTM stepped per column in plain PyTorch
recurrent_phase    a recurrent minibatch: MettaPPOLoss vs ClipPPOLoss on LSTMModule networks, and the core
sample_efficiency  env steps to return 475 on CartPole-v1, 3 seeds x 5 learners (about 20 minutes
                   on 2 cores, 11 with ``python -m benchmarks.sample_efficiency --jobs 2``, so only
                   with --sample-efficiency or --only sample_efficiency)

Times are medians of interleaved repeats and are reported as ratios against anchors measured in
the same run; nothing here asserts on speed. ``--busy`` runs every benchmark beside one spinning
process per core (started and stopped here, ``benchmarks.busy``) and writes
``<out>/<name>-busy.json``: the ratios a shared machine gets.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from benchmarks.busy import busy_machine, load_label

QUICK = ["advantage", "trainer", "overhead", "throughput", "memory", "recurrent", "recurrent_phase"]
ALL = [*QUICK, "sample_efficiency"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--only", nargs="+", choices=ALL, default=None)
    parser.add_argument("--sample-efficiency", action="store_true", help="also run the (long) sample-efficiency runs")
    parser.add_argument("--busy", action="store_true", help="one spinning process per core beside every timing")
    args = parser.parse_args(argv)
    names = args.only or (ALL if args.sample_efficiency else QUICK)
    suffix = "-busy" if args.busy else ""
    for name in names:
        with busy_machine(enabled=args.busy):
            print(f"\n=== benchmarks.{name}, {load_label()} ===", flush=True)
            importlib.import_module(f"benchmarks.{name}").main(["--json", str(args.out / f"{name}{suffix}.json")])


if __name__ == "__main__":
    main()
