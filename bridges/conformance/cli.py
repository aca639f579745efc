"""``metta-bridges conformance``: run the canonical cases through core, TorchRL and RLlib.

    metta-bridges conformance                      # quick: a few cases, every framework
    metta-bridges conformance --all                # the whole matrix
    metta-bridges conformance --case horizon_2 --framework torchrl
    metta-bridges conformance --all --markdown docs/conformance.md
    metta-bridges conformance --regenerate         # rewrite the package's golden cases first
    metta-bridges conformance --regenerate --case horizon_2   # rewrite (and run) only these
    metta-bridges conformance --native --native-markdown docs/native_equivalence.md

Prints a table (case x framework -> max abs diff per quantity, PASS/FAIL/ERROR) and writes
``report.json``, ``report.md`` and ``heatmap.png`` to ``--out-dir`` (or the paths given).
``--native`` adds the native equivalence matrix (``bridges.conformance.native``) as ``native.md``.
Exit status: 0 when every row passes (and every native equivalence row agrees), 1 otherwise,
2 for bad arguments or a missing case directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from bridges.conformance.runners import FRAMEWORKS

DEFAULT_OUT_DIR = Path("runs/conformance")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``conformance`` subcommand to ``subparsers`` (``metta-bridges``'s subparsers)."""
    p = subparsers.add_parser("conformance", help="check core, TorchRL and RLlib against the canonical cases",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="run every case (default: the quick subset)")
    p.add_argument("--case", action="append", dest="cases", metavar="NAME", help="run this case (repeatable)")
    p.add_argument("--framework", action="append", dest="frameworks", choices=FRAMEWORKS,
                   help="run this framework (repeatable; default: all)")
    p.add_argument("--cases-dir", type=Path, default=None,
                   help="directory of <name>.json/.npz case files (default: the golden cases shipped in "
                        "the package, bridges/conformance/golden)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where report.json, report.md, heatmap.png go")
    p.add_argument("--json", type=Path, default=None, help="JSON report path (default: OUT_DIR/report.json)")
    p.add_argument("--markdown", type=Path, default=None, help="Markdown report path (default: OUT_DIR/report.md)")
    p.add_argument("--heatmap", type=Path, default=None, help="PNG heatmap path (default: OUT_DIR/heatmap.png)")
    p.add_argument("--native", action="store_true",
                   help="also run the native equivalence matrix (TorchRL ClipPPOLoss, RLlib PPOTorchLearner)")
    p.add_argument("--native-markdown", type=Path, default=None,
                   help="native matrix Markdown path (default: OUT_DIR/native.md)")
    p.add_argument("--regenerate", action="store_true",
                   help="regenerate the canonical case files (those of --case, else all) in the cases directory "
                        "before running")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from bridges.cli import add_debug_flag

    add_debug_flag(p)
    return p


def run(ns: argparse.Namespace) -> int:
    """Run the command for parsed arguments ``ns``; returns the exit status."""
    from tqdm import tqdm

    from bridges.conformance import cases, report
    from metta_core.errors import MettaError
    from metta_core.run import require_writable_dir

    directory = ns.cases_dir or cases.CASES_DIR
    try:
        for path, flag in _output_paths(ns):  # pre-flight: no run ends unable to write its report
            if path.is_dir():
                raise MettaError(f"{flag}: {path} is a directory; give a file path")
            require_writable_dir(path.parent, flag, what=f"the folder of {path}")
        if ns.cases_dir is not None and not ns.regenerate and not ns.cases_dir.is_dir():
            raise MettaError(f"--cases-dir {ns.cases_dir} is not a folder; give the folder of <name>.json/.npz cases")
        if ns.regenerate:
            cases.generate(directory, ns.cases)
        if ns.cases:
            paths = cases.case_paths(directory, ns.cases)
            unknown = [p.stem for p in paths if not p.exists()]
            if unknown:
                known = sorted(p.stem for p in cases.case_paths(directory))
                raise MettaError(f"--case {', '.join(unknown)}: no such case in {directory}; known cases: {', '.join(known)}")
        else:
            paths = cases.case_paths(directory)
            quick = set(cases.quick_names())
            if not ns.all and any(p.stem in quick for p in paths):
                paths = [p for p in paths if p.stem in quick]
        if not paths:
            raise MettaError(f"no case files (*.json) in {directory}; generate them with --regenerate")
    except MettaError as exc:
        print(f"metta-bridges conformance: error: {exc}", file=sys.stderr)
        return 2
    frameworks = ns.frameworks or list(FRAMEWORKS)
    with tqdm(total=len(paths) * len(frameworks), desc="conformance", unit="run", disable=ns.no_progress,
              file=sys.stderr) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update()

        results = report.run_cases(paths, frameworks, progress)
    print(report.table(results))
    written = report.write_reports(
        results,
        json_path=ns.json or ns.out_dir / "report.json",
        markdown_path=ns.markdown or ns.out_dir / "report.md",
        heatmap_path=ns.heatmap or ns.out_dir / "heatmap.png",
    )
    native_ok = True
    if ns.native:
        native_ok, path = _native(directory, ns.native_markdown or ns.out_dir / "native.md")
        written.append(path)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0 if all(r.passed for r in results) and native_ok else 1


def _output_paths(ns: argparse.Namespace) -> list[tuple[Path, str]]:
    """The files this run writes (the same defaults as below), each with the flag that chose it:
    report.json, report.md, heatmap.png, and native.md with ``--native``."""
    def chosen(value: Path | None, default: str, name: str) -> tuple[Path, str]:
        return (value, name) if value is not None else (ns.out_dir / default, "--out-dir")

    paths = [chosen(ns.json, "report.json", "--json"), chosen(ns.markdown, "report.md", "--markdown"),
             chosen(ns.heatmap, "heatmap.png", "--heatmap")]
    if ns.native:
        paths.append(chosen(ns.native_markdown, "native.md", "--native-markdown"))
    return paths


NATIVE_CASES = ("defaults_discrete_mlp", "continuous_mlp", "lstm_discrete_dones_truncations")
"""Cases the native equivalence matrix is built from."""


def _native(directory: Path, path: Path) -> tuple[bool, Path]:
    """Run the native matrix, print and write it; ``ok`` is False if an equivalence row fails."""
    from bridges.conformance import native
    from bridges.conformance.cases import load_case

    rows = [row for name in NATIVE_CASES for row in native.matrix(load_case(directory / f"{name}.json"))]
    text = native.native_markdown(rows)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    ok = all(not r.error and r.size <= native.EQUIVALENCE_TOLERANCE for r in rows if r.equivalent)
    return ok, path


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m bridges.conformance``), same arguments as the subcommand."""
    parser = argparse.ArgumentParser(prog="metta-bridges")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "conformance":
        args = ["conformance", *args]
    return run(parser.parse_args(args))
