"""``metta-bridges``: train with Metta's PPO in the core, TorchRL or RLlib.

    metta-bridges train --framework core --env CartPole-v1
    metta-bridges train --framework torchrl --seed 1 --save-checkpoint runs/ckpt.pt
    metta-bridges train --framework rllib --num-learners 2
    metta-bridges train --framework rllib --address 127.0.0.1:6379 --num-env-runners 2

A user error (a bad flag value, an unusable path, a checkpoint that does not fit) ends with one line
on stderr and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence, get_type_hints

import gymnasium as gym

from metta_core.errors import MettaError
from metta_core.run import POLICIES, TrainArgs

FRAMEWORK_TRAINERS = {
    "core": "metta_core.run",
    "torchrl": "bridges.torchrl.train",
    "rllib": "bridges.rllib.train",
}

FRAMEWORK_SETTINGS = {"rllib": "bridges.rllib.settings:RLlibSettings"}
"""Settings only one framework reads (``module:dataclass``, importable without the framework);
passed to its ``train(args, settings)``."""

__all__ = ["TrainArgs", "main", "parse_framework_settings", "parse_train_args"]


USER_ERRORS = (MettaError, ValueError, gym.error.Error)
"""Exceptions that are the user's input (reported in one line, exit 2), not a bug (a traceback)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the examples in the description as written and show every default."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with a one-line error (no usage block): ``prog: error: message (see prog --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--ppo expects KEY=VALUE (e.g. vtrace.rho_clip=0.8), got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _add_fields(group, cls, *, dest_prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (``num_envs`` -> ``--num-envs``), with its help and default."""
    hints = get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = hints[f.name]
        kwargs: dict[str, Any] = {"default": default, "help": f.metadata.get("help"), "dest": dest_prefix + f.name}
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        base = {int: int, float: float, str: str, Path: Path}
        kwargs["type"] = next((t for t in base if kind in (t, t | None)), str)
        kwargs["metavar"] = f.name.upper()
        if f.name == "framework":
            kwargs["choices"] = sorted(FRAMEWORK_TRAINERS)
        if f.name == "metrics_format":
            kwargs["choices"] = ["jsonl", "csv"]
        if f.name == "policy":
            kwargs["choices"] = list(POLICIES)
        group.add_argument(flag, **kwargs)


def _framework_settings(framework: str):
    """The settings dataclass only ``framework`` reads, or ``None``."""
    if framework not in FRAMEWORK_SETTINGS:
        return None
    module, _, name = FRAMEWORK_SETTINGS[framework].partition(":")
    return getattr(importlib.import_module(module), name)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an agent with Metta's PPO", description=__doc__,
                       formatter_class=HelpFormatter)
    _add_fields(p, TrainArgs, skip=("ppo",))
    p.add_argument("--ppo", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                   help="PPOConfig override by dotted path, repeatable (e.g. --ppo vtrace.rho_clip=0.8)")
    for framework in FRAMEWORK_SETTINGS:
        group = p.add_argument_group(f"{framework} settings", f"read only with --framework {framework}")
        _add_fields(group, _framework_settings(framework), dest_prefix=f"{framework}__")
    add_debug_flag(p)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on a subcommand (``metta-bridges --debug train`` works too)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")


def parse_train_args(ns: argparse.Namespace) -> TrainArgs:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs) if f.name != "ppo"}
    return TrainArgs(**values, ppo=dict(ns.ppo))


def parse_framework_settings(ns: argparse.Namespace, framework: str):
    """The chosen framework's settings from the parsed flags (``None`` if it has none).

    Raises ``MettaError`` if a flag of another framework was changed from its default: that run
    would not read it.
    """
    for other in FRAMEWORK_SETTINGS:
        if other == framework:
            continue
        cls = _framework_settings(other)
        defaults = cls()
        changed = [f.name for f in dataclasses.fields(cls) if getattr(ns, f"{other}__{f.name}") != getattr(defaults, f.name)]
        if changed:
            flags = ", ".join("--" + name.replace("_", "-") for name in changed)
            raise MettaError(f"{flags}: {other} setting(s), not read by --framework {framework}; "
                             f"drop them or use --framework {other}")
    cls = _framework_settings(framework)
    if cls is None:
        return None
    return cls(**{f.name: getattr(ns, f"{framework}__{f.name}") for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="metta-bridges", description="Metta's PPO in the core, TorchRL and RLlib.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
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
            settings = parse_framework_settings(ns, args.framework)
            trainer = importlib.import_module(FRAMEWORK_TRAINERS[args.framework])
            # every trainer starts with metta_core.run.preflight(args): nothing runs before the checks
            summary = trainer.train(args) if settings is None else trainer.train(args, settings)
            print(json.dumps(summary, indent=2, default=str))
            return 0
    except USER_ERRORS as exc:
        if ns.debug:
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"metta-bridges: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metta-bridges: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
