"""Recurrent unroll benchmark: ``metta_core.recurrent.unroll`` vs ``nn.LSTM`` stepped in plain PyTorch.

    python -m benchmarks.recurrent [--repeats 15] [--threads 1] [--clock cpu] [--json runs/bench_recurrent.json]

One sample = forward + backward of ``sum(y**2)`` over a ``[rows, horizon]`` minibatch of an
``nn.LSTM(hidden, hidden)`` with Metta's init, inputs ``[rows, horizon, hidden]``, a stored state
for column 0 and resets (``dones or truncateds``) with probability ``--reset-prob`` per step:

- ``plain loop`` (the anchor): Metta's ``LstmTrainStep`` written in plain PyTorch: for each column,
  ``masked_fill`` the state where the column resets, call the ``nn.LSTM`` on that column.
- ``unroll per column``: ``unroll(..., fused=False)``, the same stepping through metta_core.
- ``unroll fused``: ``unroll(..., fused=True)`` (the default of ``RecurrentActorCritic``): one
  ``nn.LSTM`` call per stretch of columns with no reset in any row.

Times are medians of interleaved repeats, in process CPU time by default (the machine is shared;
``--clock wall`` for wall time); ratios are against the plain loop (lower is faster; the goal of
issue 12 is <= 1.0 for the per-column unroll). No assertion on time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks import write_json
from metta_core.recurrent import init_lstm_like_metta, unroll

SHAPES = [(16, 32, 64), (64, 64, 128), (256, 64, 128)]
"""``(rows, horizon, hidden)``: the CLI's default minibatch, a mid size, Metta's default minibatch."""


def plain_loop(cell: nn.LSTM, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], resets: torch.Tensor) -> torch.Tensor:
    """Metta's ``LstmTrainStep``: zero where the column resets, then one ``nn.LSTM`` call per column."""
    h, c = (s.detach() for s in state)
    x_tm = x.transpose(0, 1)
    outputs = []
    for t in range(x_tm.shape[0]):
        mask = resets[:, t].view(1, -1, 1)
        h, c = h.masked_fill(mask, 0.0), c.masked_fill(mask, 0.0)
        y, (h, c) = cell(x_tm[t : t + 1], (h, c))
        outputs.append(y)
    return torch.cat(outputs, dim=0).transpose(0, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--reset-prob", type=float, default=1 / 50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    cases = {
        "plain loop": plain_loop,
        "unroll per column": lambda cell, x, s, r: unroll(cell, x, s, r, fused=False)[0],
        "unroll fused": lambda cell, x, s, r: unroll(cell, x, s, r, fused=True)[0],
    }
    rows_out = []
    for rows, horizon, hidden in SHAPES:
        torch.manual_seed(0)
        cell = nn.LSTM(hidden, hidden)
        init_lstm_like_metta(cell)
        x = torch.randn(rows, horizon, hidden, generator=gen, requires_grad=True)
        state = (torch.randn(1, rows, hidden, generator=gen), torch.randn(1, rows, hidden, generator=gen))
        resets = torch.rand(rows, horizon, generator=gen) < args.reset_prob
        ref = plain_loop(cell, x, state, resets)
        for name, fn in cases.items():  # same numbers before timing
            torch.testing.assert_close(fn(cell, x, state, resets), ref, rtol=1e-5, atol=1e-6)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                cell.zero_grad()
                x.grad = None
                started = clock()
                fn(cell, x, state, resets).square().sum().backward()
                samples[name].append(clock() - started)
        anchor = statistics.median(samples["plain loop"])
        for name in cases:
            median = statistics.median(samples[name])
            row = {"shape": [rows, horizon, hidden], "case": name, "ms": median * 1e3, "ratio": median / anchor}
            rows_out.append(row)
            print(f"[{rows:>3}, {horizon:>2}] hidden {hidden:>3}  {name:<18} {median * 1e3:9.2f} ms  x{median / anchor:.2f}", flush=True)
    result = {"clock": args.clock, "threads": args.threads, "reset_prob": args.reset_prob, "rows": rows_out}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
