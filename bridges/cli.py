"""``metta-bridges``: train with Metta's PPO in the core, TorchRL or RLlib.

    metta-bridges train --framework core --env CartPole-v1
    metta-bridges train --framework torchrl --seed 1 --save-checkpoint runs/ckpt.pt
    metta-bridges train --framework rllib --num-learners 2
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence, get_type_hints

from metta_core.errors import MettaError
from metta_core.run import TrainArgs

FRAMEWORK_TRAINERS = {
    "core": "metta_core.run",
    "torchrl": "bridges.torchrl.train",
    "rllib": "bridges.rllib.train",
}

__all__ = ["TrainArgs", "main", "parse_train_args"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the examples in the description as written and show every default."""


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--ppo expects KEY=VALUE (e.g. vtrace.rho_clip=0.8), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an agent with Metta's PPO", description=__doc__,
                       formatter_class=HelpFormatter)
    hints = get_type_hints(TrainArgs)
    defaults = TrainArgs()
    for f in dataclasses.fields(TrainArgs):
        if f.name == "ppo":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata.get("help"))
            continue
        base = {int: int, float: float, str: str, Path: Path}
        convert = next((t for t in base if kind in (t, t | None)), str)
        kwargs: dict[str, Any] = {"type": convert, "default": default, "help": f.metadata.get("help")}
        if f.name == "framework":
            kwargs["choices"] = sorted(FRAMEWORK_TRAINERS)
        if f.name == "metrics_format":
            kwargs["choices"] = ["jsonl", "csv"]
        p.add_argument(flag, **kwargs)
    p.add_argument("--ppo", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                   help="PPOConfig override by dotted path, repeatable (e.g. --ppo vtrace.rho_clip=0.8)")


def parse_train_args(ns: argparse.Namespace) -> TrainArgs:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs) if f.name != "ppo"}
    return TrainArgs(**values, ppo=dict(ns.ppo))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metta-bridges", description="Metta's PPO in the core, TorchRL and RLlib.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    importlib.import_module("bridges.conformance.cli").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "conformance":
            return importlib.import_module("bridges.conformance.cli").run(ns)
        if ns.command == "train":
            args = parse_train_args(ns)
            args.ppo_config()  # validate overrides before anything starts
            trainer = importlib.import_module(FRAMEWORK_TRAINERS[args.framework])
            summary = trainer.train(args)
            print(json.dumps(summary, indent=2, default=str))
            return 0
    except (MettaError, ValueError) as exc:
        print(f"metta-bridges: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
